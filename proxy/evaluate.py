"""`herd eval`: run the semantic matcher over labelled pairs and report what it would merge.

Datasets:

* ``questions``: fow-cache's 600 question pairs (installed package ``fow_cache``), by
  category: near_repeat and paraphrase should merge; negation, entity_swap, number_date
  and scope are traps. Pairs marked ambiguous count as traps by default (--ambiguous).
* ``conversations``: fow-cache's 240 conversation pairs. herd's rule applies: everything
  but the final user message must be identical, or there is no semantic merge at all.
  The report also shows what the final messages alone would do, to show what that rule
  is worth.
* ``herd``: herd's own hand-written pairs, a few per guard class (HERD_PAIRS below).

For each pair the similarity and every refusing guard are computed once; thresholds and
guard switches are then applied to those, so the sweep and the ablation cost nothing.

Prints a table per dataset (should-merge served, traps merged, per category), a
threshold sweep and a guard ablation, and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embeddings.embedder import DEFAULT_PRECISION, PRECISIONS
from proxy.matcher import DEFAULT_THRESHOLD, GUARDS, MatchConfig, Matcher, parse_guards

DEFAULT_JSON = Path("benchmarks/out/semantic-eval.json")
DEFAULT_SWEEP = "0.60:0.98:0.02"
TARGET_TRAPS = 0.01  # questions: at most 1% of traps merged
TARGET_SERVED = 0.75  # questions: at least 75% of should-merge pairs served

# (category, should_merge, a, b): herd's own pairs, written for the guards, not taken from
# any benchmark. Categories ending in "_trap" must not merge. "topic_trap" pairs ask two
# different questions about one subject: fow-cache's traps are all near-misses, so these
# show what a threshold low enough to serve fow-cache's reworded paraphrases would cost.
HERD_PAIRS: list[tuple[str, bool, str, str]] = [
    ("paraphrase", True, "How do I reset my password?", "how can I reset my password"),
    ("paraphrase", True, "What is the capital of France?", "what's the capital city of france"),
    ("paraphrase", True, "How do I change my email address?", "How can I update my email address?"),
    ("paraphrase", True, "Where can I find my order history?", "Where do I find my order history?"),
    ("paraphrase", True, "Can I get a refund for a damaged item?", "Is it possible to get a refund for a damaged item?"),
    ("paraphrase", True, "How long does shipping to Canada take?", "How long does shipping to Canada usually take?"),
    ("paraphrase", True, "What are your opening hours on Saturday?", "What are your Saturday opening hours?"),
    ("paraphrase", True, "Explain how photosynthesis works", "Can you explain how photosynthesis works?"),
    ("paraphrase", True, "How do I delete my account?", "How can I remove my account?"),
    ("paraphrase", True, "What's the best way to learn Python?", "What is the best way to learn Python?"),
    ("paraphrase", True, "Do you ship to Germany?", "Hi, do you ship to Germany?"),
    ("paraphrase", True, "How do I cancel my subscription?", "How can I cancel my subscription please?"),
    ("paraphrase", True, "Who wrote Pride and Prejudice?", "who wrote pride and prejudice"),
    ("paraphrase", True, "How do I fix a flat tyre on my bike?", "How do I repair a flat tyre on my bike?"),
    ("paraphrase", True, "What is the boiling point of water at sea level?", "What's the boiling point of water at sea level?"),
    ("paraphrase", True, "Translate 'good morning' into Spanish", "translate 'good morning' into spanish please"),
    ("paraphrase", True, "How do I export my contacts?", "How can I export my contacts?"),
    ("paraphrase", True, "Summarise the plot of Hamlet", "Can you summarise the plot of Hamlet?"),
    ("typo", True, "How do I recieve my tax refund?", "How do I receive my tax refund?"),
    ("typo", True, "What is the diference between RAM and ROM?", "What is the difference between RAM and ROM?"),
    ("typo", True, "How do I set up my new printer?", "How do I set up my new priner?"),
    ("numbers_trap", False, "What is 15% of 80?", "What is 25% of 80?"),
    ("numbers_trap", False, "Book a table for 4 people", "Book a table for 6 people"),
    ("numbers_trap", False, "How many calories are in 100g of rice?", "How many calories are in 200g of rice?"),
    ("numbers_trap", False, "Convert 5 miles to kilometres", "Convert 5 kilometres to miles"),
    ("numbers_trap", False, "Is a 3 year warranty included?", "Is a three month warranty included?"),
    ("numbers_trap", False, "What's the price in dollars?", "What's the price in euros?"),
    ("dates_trap", False, "What's on at the cinema tonight?", "What's on at the cinema tomorrow night?"),
    ("dates_trap", False, "Is the shop open on Monday?", "Is the shop open on Tuesday?"),
    ("dates_trap", False, "Set an alarm for 6am", "Set an alarm for 6pm"),
    ("dates_trap", False, "What happened in the news yesterday?", "What happened in the news today?"),
    ("dates_trap", False, "Show me my calendar for next week", "Show me my calendar for this week"),
    ("identifiers_trap", False, "What does error E1234 mean?", "What does error E1243 mean?"),
    ("identifiers_trap", False, "Why does `user.name` return None?", "Why does `user.email` return None?"),
    ("identifiers_trap", False, "Is version 2.3.1 compatible with Windows?", "Is version 2.4.0 compatible with Windows?"),
    ("identifiers_trap", False, "Check the status of ticket ABC-1042", "Check the status of ticket ABC-1024"),
    ("entities_trap", False, "Who is the prime minister of Canada?", "Who is the prime minister of Australia?"),
    ("entities_trap", False, "How do I get to the Louvre?", "How do I get to the Colosseum?"),
    ("entities_trap", False, "Summarise the plot of Hamlet", "Summarise the plot of Macbeth"),
    ("entities_trap", False, "What is Tesla's stock price?", "What is Nvidia's stock price?"),
    ("negation_trap", False, "Should I take this medicine with food?", "Should I not take this medicine with food?"),
    ("negation_trap", False, "Why is my phone charging?", "Why isn't my phone charging?"),
    ("negation_trap", False, "Which fruits are high in sugar?", "Which fruits are never high in sugar?"),
    ("polarity_trap", False, "How do I enable notifications?", "How do I disable notifications?"),
    ("polarity_trap", False, "Which countries allow dual citizenship?", "Which countries ban dual citizenship?"),
    ("polarity_trap", False, "Is the museum open on bank holidays?", "Is the museum closed on bank holidays?"),
    ("polarity_trap", False, "How do I import my bookmarks?", "How do I export my bookmarks?"),
    ("polarity_trap", False, "What are the advantages of solar panels?", "What are the disadvantages of solar panels?"),
    ("polarity_trap", False, "Is this water safe to drink?", "Is this water unsafe to drink?"),
    ("polarity_trap", False, "How do I log in to my account?", "How do I log out of my account?"),
    ("scope_trap", False, "Delete the emails from last week", "Delete all the emails"),
    ("scope_trap", False, "List some uses of vinegar", "List all uses of vinegar"),
    ("scope_trap", False, "Which of my files are shared?", "Which of my files are only shared with me?"),
    ("scope_trap", False, "Show the top 5 results", "Show the top 10 results"),
    ("comparatives_trap", False, "What's the cheapest flight to Rome?", "What's a cheap flight to Rome?"),
    ("comparatives_trap", False, "Which phone has the best battery?", "Which phone has a better battery than the iPhone?"),
    ("comparatives_trap", False, "Which laptop is lighter?", "Which laptop is heavier?"),
    ("format_trap", False, "List the planets as JSON", "List the planets as a table"),
    ("format_trap", False, "Give me a short summary of the article", "Give me a detailed summary of the article"),
    ("format_trap", False, "Write a poem about autumn", "Write an essay about autumn"),
    ("language_trap", False, "Translate this sentence into French", "Translate this sentence into German"),
    ("language_trap", False, "Write a function to reverse a string in Python", "Write a function to reverse a string in JavaScript"),
    ("language_trap", False, "¿Cómo restablezco mi contraseña?", "How do I reset my password?"),
    ("roles_trap", False, "How do I move files from my laptop to my phone?", "How do I move files from my phone to my laptop?"),
    ("roles_trap", False, "Is Python faster than Java?", "Is Java faster than Python?"),
    ("wording_trap", False, "How do I train my puppy?", "How do I train my parrot?"),
    ("wording_trap", False, "How long should I boil an egg?", "How long should I boil a potato?"),
    ("wording_trap", False, "What wine goes with fish?", "What wine goes with steak?"),
    ("wording_trap", False, "How do I clean a leather sofa?", "How do I clean a velvet sofa?"),
    ("wording_trap", False, "What are the symptoms of diabetes?", "What are the symptoms of diabetes in dogs?"),
    # different questions about the same thing: what a low threshold would merge
    ("topic_trap", False, 'How do I reset my password?', 'How do I change my username?'),
    ("topic_trap", False, 'Where is my order?', 'Can I return my order?'),
    ("topic_trap", False, 'What are your opening hours?', 'Where are you located?'),
    ("topic_trap", False, 'How much does shipping cost?', 'How long does shipping take?'),
    ("topic_trap", False, 'Can I pay with PayPal?', 'Can I get a refund to my PayPal account?'),
    ("topic_trap", False, 'What is Python used for?', 'Who created Python?'),
    ("topic_trap", False, 'Explain recursion', 'Give me an example of recursion in code'),
    ("topic_trap", False, 'Summarise this article for me', 'Translate this article for me'),
    ("topic_trap", False, 'How do I cancel my subscription?', 'Why was I charged for my subscription?'),
    ("topic_trap", False, "What's the return policy?", 'How do I track my parcel?'),
    ("topic_trap", False, 'How do I contact customer support?', "What are customer support's opening hours?"),
    ("topic_trap", False, 'Is breakfast included in the room rate?', 'What time is breakfast served?'),
    ("topic_trap", False, 'How do I update my billing address?', 'Why did my payment fail?'),
    ("topic_trap", False, 'Do you deliver on weekends?', 'How much is weekend delivery?'),
    ("topic_trap", False, 'How do I make a cup of tea?', 'How do I make a cup of coffee?'),
    ("topic_trap", False, 'What causes headaches?', 'How do I get rid of a headache?'),
    ("topic_trap", False, 'How many calories should I eat a day?', 'What foods are high in protein?'),
    ("topic_trap", False, "What's the weather like in Paris?", "What's the best time of year to visit Paris?"),
    ("topic_trap", False, 'How do I open a bank account?', 'What documents do I need to open a bank account?'),
    ("topic_trap", False, 'How do I apply for a mortgage?', 'How much can I borrow for a mortgage?'),
    ("topic_trap", False, 'Why is my internet slow?', 'How do I restart my router?'),
    ("topic_trap", False, "What's the difference between a Roth IRA and a traditional IRA?", 'How much can I put into a Roth IRA?'),
    ("topic_trap", False, 'Tell me a joke about cats', 'Tell me a fun fact about cats'),
    ("topic_trap", False, 'How do I learn to play guitar?', 'What guitar should a beginner buy?'),
    ("topic_trap", False, 'What is machine learning?', 'How do I get a job in machine learning?'),
    ("topic_trap", False, 'How do I report a bug?', 'How do I request a new feature?'),
    ("topic_trap", False, 'Can I change my flight date?', 'Can I add a bag to my flight?'),
    ("topic_trap", False, 'What are the side effects of ibuprofen?', 'What is the maximum dose of ibuprofen?'),
    ("topic_trap", False, 'How do I install the app?', 'How do I uninstall the app?'),
    ("topic_trap", False, 'Is parking available at the hotel?', 'Is there a shuttle from the airport to the hotel?'),
]


@dataclass
class Row:
    id: str
    group: str
    should_merge: bool
    score: float | None
    normalized_equal: bool
    fits: bool
    variant: bool
    refused_by: list[str]
    history_equal: bool = True
    a: str = ""
    b: str = ""

    def merged(self, threshold: float, guards: frozenset[str], history_rule: bool = True) -> bool:
        if history_rule and not self.history_equal:
            return False
        if self.normalized_equal:
            return True
        if not self.fits or self.score is None or (self.score < threshold and not self.variant):
            return False
        return not (set(self.refused_by) & guards)


@dataclass
class Dataset:
    name: str
    rows: list[Row] = field(default_factory=list)
    history_rule: bool = True

    def rates(self, threshold: float, guards: frozenset[str], history_rule: bool | None = None) -> dict[str, Any]:
        hr = self.history_rule if history_rule is None else history_rule
        pos = [r for r in self.rows if r.should_merge]
        neg = [r for r in self.rows if not r.should_merge]
        served = sum(r.merged(threshold, guards, hr) for r in pos)
        wrong = sum(r.merged(threshold, guards, hr) for r in neg)
        return {
            "should_merge": len(pos),
            "served": served,
            "served_rate": served / len(pos) if pos else None,
            "traps": len(neg),
            "traps_merged": wrong,
            "trap_rate": wrong / len(neg) if neg else None,
        }

    def by_group(self, threshold: float, guards: frozenset[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in self.rows:
            g = out.setdefault(r.group, {"n": 0, "should_merge": r.should_merge, "merged": 0})
            g["n"] += 1
            g["merged"] += r.merged(threshold, guards, self.history_rule)
        for g in out.values():
            g["rate"] = g["merged"] / g["n"]
        return out


# -- loading ------------------------------------------------------------------------------


def _fow():
    try:
        from fow_cache import data
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("the questions/conversations datasets need fow-cache: pip install 'herd[eval]'") from exc
    return data


def _label(item: dict, ambiguous: str) -> bool | None:
    if item.get("ambiguous"):
        return {"different": False, "same": True, "skip": None}[ambiguous]
    return bool(item["same_answer"])


def load_items(name: str, ambiguous: str = "different", limit: int | None = None,
               split: str | None = None) -> list[dict[str, Any]]:
    """[{id, group, should_merge, a, b}] where a/b are strings (questions, herd) or message lists.

    `split` "even" / "odd" keeps the pairs at even / odd positions of the dataset (0-based,
    before `limit`): calibrate on one half, report the other."""
    items: list[dict[str, Any]] = []
    if name == "questions":
        for q in _fow().load_questions():
            lab = _label(q, ambiguous)
            if lab is not None:
                items.append({"id": q["id"], "group": q.get("ambiguous") or q["category"], "should_merge": lab,
                              "a": q["a"], "b": q["b"]})
    elif name == "conversations":
        for c in _fow().load_conversations():
            lab = _label(c, ambiguous)
            if lab is not None:
                items.append({"id": c["id"], "group": c.get("ambiguous") or c["subtype"], "should_merge": lab,
                              "a": c["a"], "b": c["b"]})
    elif name == "herd":
        for i, (cat, lab, a, b) in enumerate(HERD_PAIRS):
            items.append({"id": f"herd-{i:03d}", "group": cat, "should_merge": lab, "a": a, "b": b})
    else:
        raise ValueError(f"unknown dataset {name!r}")
    if split:
        if split not in ("even", "odd"):
            raise ValueError(f"split must be even or odd, not {split!r}")
        items = items[(split == "odd"):: 2]
    if limit:
        per: dict[str, int] = {}
        kept = []
        for it in items:
            if per.get(it["group"], 0) < limit:
                per[it["group"]] = per.get(it["group"], 0) + 1
                kept.append(it)
        items = kept
    return items


def _final_text(side: Any) -> tuple[str | None, list]:
    """(final user text, history) of a message list, or (text, []) for a plain string."""
    if isinstance(side, str):
        return side, []
    if not side or side[-1].get("role") != "user" or not isinstance(side[-1].get("content"), str):
        return None, list(side)
    return side[-1]["content"], list(side[:-1])


# -- scoring ------------------------------------------------------------------------------


def score_items(items: list[dict[str, Any]], matcher: Matcher, embedder: Any) -> list[Row]:
    finals = []
    for it in items:
        ta, ha = _final_text(it["a"])
        tb, hb = _final_text(it["b"])
        finals.append((ta, tb, ha == hb and ta is not None and tb is not None))
    texts = sorted({t for ta, tb, _ in finals for t in (ta, tb) if t is not None})
    probes = {t: matcher.prepare(t) for t in texts}
    to_embed = [t for t in texts if probes[t].fits]
    if embedder is not None and to_embed:
        vectors = embedder.embed(to_embed)
        for t, v in zip(to_embed, vectors):
            probes[t] = matcher.probe_with_vector(t, v)
    rows = []
    for it, (ta, tb, hist_eq) in zip(items, finals):
        if ta is None or tb is None:
            rows.append(Row(it["id"], it["group"], it["should_merge"], None, False, False, False, ["not-user"], False))
            continue
        pa, pb = probes[ta], probes[tb]
        ex = matcher.explain(pa, pb)
        rows.append(Row(
            id=it["id"], group=it["group"], should_merge=it["should_merge"], score=ex["score"],
            normalized_equal=ex["normalized_equal"], fits=ex["fits"], variant=ex["variant"],
            refused_by=[] if ex["normalized_equal"] else list(ex["refused_by"]),
            history_equal=hist_eq, a=ta, b=tb,
        ))
    return rows


def parse_sweep(spec: str) -> list[float]:
    try:
        lo, hi, step = (float(x) for x in spec.split(":"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--sweep wants LO:HI:STEP, got {spec!r}") from exc
    if step <= 0 or hi < lo:
        raise argparse.ArgumentTypeError("--sweep wants LO <= HI and STEP > 0")
    out, k = [], 0
    while lo + k * step <= hi + 1e-9:
        out.append(round(lo + k * step, 4))
        k += 1
    return out


# -- reporting ----------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def report(ds: Dataset, threshold: float, guards: frozenset[str], sweep: list[float], out=None) -> dict[str, Any]:
    out = out or sys.stdout
    summary = ds.rates(threshold, guards)
    groups = ds.by_group(threshold, guards)
    p = lambda *a: print(*a, file=out)
    p(f"\n== {ds.name}: {len(ds.rows)} pairs, threshold {threshold:.2f}, guards: "
      f"{'all' if guards == frozenset(GUARDS) else ','.join(sorted(guards)) or 'none'}")
    if ds.name == "conversations":
        p("   (semantic rule: all but the final user message identical, else no merge)")
    p(f"   {'category':<28}{'n':>5}{'merged':>8}{'rate':>8}")
    p(f"   should merge: served {summary['served']}/{summary['should_merge']} = {_pct(summary['served_rate'])}")
    for name, g in groups.items():
        if g["should_merge"]:
            p(f"     {name:<26}{g['n']:>5}{g['merged']:>8}{_pct(g['rate']):>8}")
    p(f"   traps: merged {summary['traps_merged']}/{summary['traps']} = {_pct(summary['trap_rate'])}")
    for name, g in groups.items():
        if not g["should_merge"]:
            p(f"     {name:<26}{g['n']:>5}{g['merged']:>8}{_pct(g['rate']):>8}")
    result: dict[str, Any] = {"n": len(ds.rows), "threshold": threshold, **summary, "by_group": groups}

    if ds.name == "conversations":
        hist = sum(r.history_equal for r in ds.rows)
        final_only = ds.rates(threshold, guards, history_rule=False)
        no_guards = ds.rates(threshold, frozenset(), history_rule=False)
        p(f"   pairs whose history is identical: {hist}/{len(ds.rows)}")
        p(f"   final message alone (history rule off): served {_pct(final_only['served_rate'])}, "
          f"traps merged {_pct(final_only['trap_rate'])} ({final_only['traps_merged']}); "
          f"with no guards either: traps merged {_pct(no_guards['trap_rate'])}")
        result["history_equal"] = hist
        result["final_message_only"] = final_only
        result["final_message_only_no_guards"] = no_guards

    rows_sweep = []
    p(f"   {'threshold':>9} {'served':>8} {'traps':>8} {'#traps':>7} | {'no guards: served':>18} {'traps':>8}")
    for t in sweep:
        r = ds.rates(t, guards)
        r0 = ds.rates(t, frozenset())
        rows_sweep.append({"threshold": t, **r, "no_guards": r0})
        mark = " <" if abs(t - threshold) < 1e-9 else ""
        p(f"   {t:>9.2f} {_pct(r['served_rate']):>8} {_pct(r['trap_rate']):>8} {r['traps_merged']:>7} | "
          f"{_pct(r0['served_rate']):>18} {_pct(r0['trap_rate']):>8}{mark}")
    result["sweep"] = rows_sweep

    ablation = {}
    if guards:
        p(f"   guard ablation at {threshold:.2f}: {'guard off':<14}{'served':>8}{'traps':>8}{'#traps':>7}"
          f"  | refused (should-merge / traps, above threshold)")
        for g in GUARDS:
            r = ds.rates(threshold, guards - {g}) if g in guards else None
            above = [x for x in ds.rows if not x.normalized_equal and x.fits and x.score is not None and x.score >= threshold]
            cost = sum(g in x.refused_by for x in above if x.should_merge)
            gain = sum(g in x.refused_by for x in above if not x.should_merge)
            ablation[g] = {"without": r, "refuses_should_merge": cost, "refuses_traps": gain}
            if r is not None:
                p(f"   {'':<34}{g:<14}{_pct(r['served_rate']):>8}{_pct(r['trap_rate']):>8}{r['traps_merged']:>7}  | {cost:>4} / {gain}")
    result["ablation"] = ablation
    return result


def best_threshold(ds: Dataset, guards: frozenset[str], sweep: list[float], max_trap_rate: float) -> dict[str, Any] | None:
    best = None
    for t in sweep:
        r = ds.rates(t, guards)
        ok = r["trap_rate"] is not None and r["trap_rate"] <= max_trap_rate
        if ok and (best is None or (r["served_rate"] or 0) > (best["served_rate"] or 0)):
            best = {"threshold": t, **r}
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="herd eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help=f"similarity threshold (default {DEFAULT_THRESHOLD})")
    ap.add_argument("--sweep", default=DEFAULT_SWEEP, help=f"thresholds LO:HI:STEP (default {DEFAULT_SWEEP})")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write results here (default {DEFAULT_JSON})")
    ap.add_argument("--model", default=None, help="ONNX model path (default: the bundled all-MiniLM-L6-v2 int8)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json path (default: embeddings/assets)")
    ap.add_argument("--guards", default="all", help="guards to enable, comma separated (default all): " + ",".join(GUARDS))
    ap.add_argument("--no-guard", action="append", default=[], metavar="NAME", help="switch one guard off (repeatable)")
    ap.add_argument("--datasets", default="questions,conversations,herd", help="comma separated: questions,conversations,herd")
    ap.add_argument("--ambiguous", choices=("different", "same", "skip"), default="different",
                    help="how to count fow-cache's ambiguous pairs (default: as traps)")
    ap.add_argument("--limit", type=int, default=None, help="at most N pairs per category (quick runs)")
    ap.add_argument("--split", choices=("even", "odd"), default=None,
                    help="only the pairs at even / odd positions of each dataset (held-out checks)")
    ap.add_argument("--items", action="store_true", help="include every pair's result in the JSON")
    ap.add_argument("--show", type=int, default=0, metavar="N", help="print up to N merged traps and N missed pairs")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")
    ap.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                    help=f"the model's matrix products: int8 or fp32 (default {DEFAULT_PRECISION}, as herd runs it)")
    args = ap.parse_args(argv)

    try:
        guards = parse_guards(args.guards)
        off = {n.strip().lower() for n in args.no_guard}
        unknown = off - set(GUARDS)
        if unknown:
            raise ValueError(f"unknown guard(s) {sorted(unknown)}; known: {', '.join(GUARDS)}")
        guards -= off
    except ValueError as exc:
        ap.error(str(exc))
    sweep = parse_sweep(args.sweep)
    if all(abs(t - args.threshold) > 1e-9 for t in sweep):
        sweep = sorted(sweep + [args.threshold])

    from embeddings.embedder import Embedder

    t0 = time.perf_counter()
    embedder = Embedder(model_path=args.model, tokenizer_path=args.tokenizer, intra_op_threads=args.threads,
                        precision=args.precision)
    # Score with every guard on: refusals are recorded per guard and switched off afterwards.
    config = MatchConfig(threshold=args.threshold, guards=frozenset(GUARDS), max_tokens=embedder.max_tokens)
    matcher = Matcher(None, config, fits=embedder.fits)  # the embedder's tokenizer decides the window

    results: dict[str, Any] = {
        "model": embedder.model_path,
        "precision": embedder.precision,
        "threshold": args.threshold,
        "guards": sorted(guards),
        "ambiguous": args.ambiguous,
        "limit": args.limit,
        "split": args.split,
        "datasets": {},
    }
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        items = load_items(name, args.ambiguous, args.limit, args.split)
        ds = Dataset(name, score_items(items, matcher, embedder))
        res = report(ds, args.threshold, guards, sweep)
        if name == "questions":
            best = best_threshold(ds, guards, sweep, TARGET_TRAPS)
            res["best_threshold_at_1pct_traps"] = best
            res["targets"] = {
                "traps_max": TARGET_TRAPS, "served_min": TARGET_SERVED,
                "met": (res["trap_rate"] or 0) <= TARGET_TRAPS and (res["served_rate"] or 0) >= TARGET_SERVED,
            }
            print(f"   targets (traps <= {TARGET_TRAPS:.0%}, served >= {TARGET_SERVED:.0%}): "
                  f"{'met' if res['targets']['met'] else 'NOT met'}"
                  + (f"; best swept threshold at <=1% traps: {best['threshold']:.2f} serves {_pct(best['served_rate'])}" if best else ""))
        if name == "conversations":
            res["targets"] = {"traps_max": 0.0, "met": res["traps_merged"] == 0}
            print(f"   target (no trap merged): {'met' if res['targets']['met'] else 'NOT met'}")
        if args.show:
            wrong = [r for r in ds.rows if not r.should_merge and r.merged(args.threshold, guards, ds.history_rule)]
            missed = [r for r in ds.rows if r.should_merge and not r.merged(args.threshold, guards, ds.history_rule)]
            for title, rows in (("merged traps", wrong), ("missed should-merge", missed)):
                print(f"   -- {title} ({len(rows)}):")
                for r in sorted(rows, key=lambda r: -(r.score or 0))[: args.show]:
                    print(f"      {r.score if r.score is not None else float('nan'):.3f} {r.group:<18} "
                          f"{','.join(r.refused_by) or '-':<20} {r.a[:70]!r} | {r.b[:70]!r}")
        if args.items:
            res["items"] = [
                {"id": r.id, "group": r.group, "should_merge": r.should_merge, "score": r.score,
                 "normalized_equal": r.normalized_equal, "variant": r.variant, "fits": r.fits, "refused_by": r.refused_by,
                 "history_equal": r.history_equal, "merged": r.merged(args.threshold, guards, ds.history_rule)}
                for r in ds.rows
            ]
        results["datasets"][name] = res
    results["seconds"] = round(time.perf_counter() - t0, 3)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
