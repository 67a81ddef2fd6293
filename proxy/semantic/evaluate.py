"""`herd eval`: run decide() over labelled pairs and report what it would merge.

    herd eval [--datasets questions,conversations,herd] [--pairs FILE.jsonl ...] [--explain]

Datasets:

* ``questions``: fow-cache's 600 question pairs (installed package ``fow_cache``), by
  category: near_repeat and paraphrase should merge; negation, entity_swap, number_date
  and scope are traps. Pairs marked ambiguous count as traps by default (--ambiguous).
* ``conversations``: fow-cache's 240 conversation pairs. herd's rule applies: everything
  but the final user message must be identical, or there is no semantic merge at all.
* ``herd``: herd's own hand-written pairs (HERD_PAIRS below), per kind and language.
* ``scrambled``: word-order traps made here from fow-cache's questions: each question
  against itself with two of its words (4+ letters, different) swapped. Not every swap
  changes the answer, but none is neutral by herd's tables, so all count as traps.
* ``--pairs FILE.jsonl``: anyone's pairs, one JSON object a line::

      {"a": "...", "b": "...", "label": "same" | "different", "kind": "paraphrase", "lang": "en"}

  ``a``/``b`` are strings or chat message lists (the history rule then applies);
  ``kind`` and ``lang`` are optional (default "pair" and "?"); ``id`` is optional.

Every pair goes through :func:`proxy.semantic.decide` once; a threshold sweep re-reads its
Decision (Decision.at), so the sweep costs nothing and agrees with decide() by construction.
Prints a table per dataset (per kind, per language), the sweep, and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embeddings.embedder import DEFAULT_PRECISION, PRECISIONS
from proxy.semantic.decide import DEFAULT_THRESHOLD, Decision, MatchConfig
from proxy.semantic.matcher import Matcher

DEFAULT_JSON = Path("benchmarks/out/semantic-eval.json")  # run from a herd checkout
INSTALLED_JSON = Path("herd-bench/semantic-eval.json")  # anywhere else (herd installed from a wheel)
DEFAULT_SWEEP = "0.30:0.95:0.05"
TARGET_TRAPS = 0.01  # questions: at most 1% of traps merged
TARGET_SERVED = 0.75  # questions: at least 75% of should-merge pairs served

# (kind, should_merge, a, b): herd's own pairs, written here, not taken from any benchmark.
# Kinds other than paraphrase/typo/near_repeat are traps that must not merge. "topic" pairs
# ask two different questions about one subject.
_ENGLISH: list[tuple[Any, ...]] = [
    ("paraphrase", True, "How do I reset my password?", "how can I reset my password"),
    ("paraphrase", True, "What is the capital of France?", "what's the capital city of france"),
    ("paraphrase", True, "How do I change my email address?", "How can I update my email address?"),
    ("paraphrase", True, "Where can I find my order history?", "Where do I find my order history?"),
    ("paraphrase", True, "Can I get a refund for a damaged item?",
                          "Is it possible to get a refund for a damaged item?"),
    ("paraphrase", True, "How long does shipping to Canada take?", "How long does shipping to Canada usually take?"),
    ("paraphrase", True, "What are your opening hours on Saturday?", "What are your Saturday opening hours?"),
    ("paraphrase", True, "Explain how photosynthesis works", "Can you explain how photosynthesis works?"),
    ("paraphrase", True, "How do I delete my account?", "How can I remove my account?"),
    ("paraphrase", True, "What's the best way to learn Python?", "What is the best way to learn Python?"),
    ("paraphrase", True, "Do you ship to Germany?", "Hi, do you ship to Germany?"),
    ("paraphrase", True, "How do I cancel my subscription?", "How can I cancel my subscription please?"),
    ("paraphrase", True, "Who wrote Pride and Prejudice?", "who wrote pride and prejudice"),
    ("paraphrase", True, "How do I fix a flat tyre on my bike?", "How do I repair a flat tyre on my bike?"),
    ("paraphrase", True, "What is the boiling point of water at sea level?",
                          "What's the boiling point of water at sea level?"),
    ("paraphrase", True, "Translate 'good morning' into Spanish", "translate 'good morning' into spanish please"),
    ("paraphrase", True, "How do I export my contacts?", "How can I export my contacts?"),
    ("paraphrase", True, "Summarise the plot of Hamlet", "Can you summarise the plot of Hamlet?"),
    ("typo", True, "How do I recieve my tax refund?", "How do I receive my tax refund?"),
    ("typo", True, "What is the diference between RAM and ROM?", "What is the difference between RAM and ROM?"),
    ("typo", True, "How do I set up my new printer?", "How do I set up my new priner?"),
    ("numbers", False, "What is 15% of 80?", "What is 25% of 80?"),
    ("numbers", False, "Book a table for 4 people", "Book a table for 6 people"),
    ("numbers", False, "How many calories are in 100g of rice?", "How many calories are in 200g of rice?"),
    ("numbers", False, "Convert 5 miles to kilometres", "Convert 5 kilometres to miles"),
    ("numbers", False, "Is a 3 year warranty included?", "Is a three month warranty included?"),
    ("numbers", False, "What's the price in dollars?", "What's the price in euros?"),
    ("dates", False, "What's on at the cinema tonight?", "What's on at the cinema tomorrow night?"),
    ("dates", False, "Is the shop open on Monday?", "Is the shop open on Tuesday?"),
    ("dates", False, "Set an alarm for 6am", "Set an alarm for 6pm"),
    ("dates", False, "What happened in the news yesterday?", "What happened in the news today?"),
    ("dates", False, "Show me my calendar for next week", "Show me my calendar for this week"),
    ("identifiers", False, "What does error E1234 mean?", "What does error E1243 mean?"),
    ("identifiers", False, "Why does `user.name` return None?", "Why does `user.email` return None?"),
    ("identifiers", False, "Is version 2.3.1 compatible with Windows?", "Is version 2.4.0 compatible with Windows?"),
    ("identifiers", False, "Check the status of ticket ABC-1042", "Check the status of ticket ABC-1024"),
    ("entities", False, "Who is the prime minister of Canada?", "Who is the prime minister of Australia?"),
    ("entities", False, "How do I get to the Louvre?", "How do I get to the Colosseum?"),
    ("entities", False, "Summarise the plot of Hamlet", "Summarise the plot of Macbeth"),
    ("entities", False, "What is Tesla's stock price?", "What is Nvidia's stock price?"),
    ("negation", False, "Should I take this medicine with food?", "Should I not take this medicine with food?"),
    ("negation", False, "Why is my phone charging?", "Why isn't my phone charging?"),
    ("negation", False, "Which fruits are high in sugar?", "Which fruits are never high in sugar?"),
    ("polarity", False, "How do I enable notifications?", "How do I disable notifications?"),
    ("polarity", False, "Which countries allow dual citizenship?", "Which countries ban dual citizenship?"),
    ("polarity", False, "Is the museum open on bank holidays?", "Is the museum closed on bank holidays?"),
    ("polarity", False, "How do I import my bookmarks?", "How do I export my bookmarks?"),
    ("polarity", False, "What are the advantages of solar panels?", "What are the disadvantages of solar panels?"),
    ("polarity", False, "Is this water safe to drink?", "Is this water unsafe to drink?"),
    ("polarity", False, "How do I log in to my account?", "How do I log out of my account?"),
    ("scope", False, "Delete the emails from last week", "Delete all the emails"),
    ("scope", False, "List some uses of vinegar", "List all uses of vinegar"),
    ("scope", False, "Which of my files are shared?", "Which of my files are only shared with me?"),
    ("scope", False, "Show the top 5 results", "Show the top 10 results"),
    ("comparatives", False, "What's the cheapest flight to Rome?", "What's a cheap flight to Rome?"),
    ("comparatives", False, "Which phone has the best battery?", "Which phone has a better battery than the iPhone?"),
    ("comparatives", False, "Which laptop is lighter?", "Which laptop is heavier?"),
    ("format", False, "List the planets as JSON", "List the planets as a table"),
    ("format", False, "Give me a short summary of the article", "Give me a detailed summary of the article"),
    ("format", False, "Write a poem about autumn", "Write an essay about autumn"),
    ("language", False, "Translate this sentence into French", "Translate this sentence into German"),
    ("language", False, "Write a function to reverse a string in Python",
                         "Write a function to reverse a string in JavaScript"),
    ("roles", False, "How do I move files from my laptop to my phone?",
                          "How do I move files from my phone to my laptop?"),
    ("roles", False, "Is Python faster than Java?", "Is Java faster than Python?"),
    ("wording", False, "How do I train my puppy?", "How do I train my parrot?"),
    ("wording", False, "How long should I boil an egg?", "How long should I boil a potato?"),
    ("wording", False, "What wine goes with fish?", "What wine goes with steak?"),
    ("wording", False, "How do I clean a leather sofa?", "How do I clean a velvet sofa?"),
    ("wording", False, "What are the symptoms of diabetes?", "What are the symptoms of diabetes in dogs?"),
    # different questions about the same thing: what a low threshold would merge
    ("topic", False, 'How do I reset my password?', 'How do I change my username?'),
    ("topic", False, 'Where is my order?', 'Can I return my order?'),
    ("topic", False, 'What are your opening hours?', 'Where are you located?'),
    ("topic", False, 'How much does shipping cost?', 'How long does shipping take?'),
    ("topic", False, 'Can I pay with PayPal?', 'Can I get a refund to my PayPal account?'),
    ("topic", False, 'What is Python used for?', 'Who created Python?'),
    ("topic", False, 'Explain recursion', 'Give me an example of recursion in code'),
    ("topic", False, 'Summarise this article for me', 'Translate this article for me'),
    ("topic", False, 'How do I cancel my subscription?', 'Why was I charged for my subscription?'),
    ("topic", False, "What's the return policy?", 'How do I track my parcel?'),
    ("topic", False, 'How do I contact customer support?', "What are customer support's opening hours?"),
    ("topic", False, 'Is breakfast included in the room rate?', 'What time is breakfast served?'),
    ("topic", False, 'How do I update my billing address?', 'Why did my payment fail?'),
    ("topic", False, 'Do you deliver on weekends?', 'How much is weekend delivery?'),
    ("topic", False, 'How do I make a cup of tea?', 'How do I make a cup of coffee?'),
    ("topic", False, 'What causes headaches?', 'How do I get rid of a headache?'),
    ("topic", False, 'How many calories should I eat a day?', 'What foods are high in protein?'),
    ("topic", False, "What's the weather like in Paris?", "What's the best time of year to visit Paris?"),
    ("topic", False, 'How do I open a bank account?', 'What documents do I need to open a bank account?'),
    ("topic", False, 'How do I apply for a mortgage?', 'How much can I borrow for a mortgage?'),
    ("topic", False, 'Why is my internet slow?', 'How do I restart my router?'),
    ("topic", False, "What's the difference between a Roth IRA and a traditional IRA?",
                      'How much can I put into a Roth IRA?'),
    ("topic", False, 'Tell me a joke about cats', 'Tell me a fun fact about cats'),
    ("topic", False, 'How do I learn to play guitar?', 'What guitar should a beginner buy?'),
    ("topic", False, 'What is machine learning?', 'How do I get a job in machine learning?'),
    ("topic", False, 'How do I report a bug?', 'How do I request a new feature?'),
    ("topic", False, 'Can I change my flight date?', 'Can I add a bag to my flight?'),
    ("topic", False, 'What are the side effects of ibuprofen?', 'What is the maximum dose of ibuprofen?'),
    ("topic", False, 'How do I install the app?', 'How do I uninstall the app?'),
    ("topic", False, 'Is parking available at the hotel?', 'Is there a shuttle from the airport to the hotel?'),
]

# Traps of the classes the rule must refuse (swapped roles, ranges, ordinals, antonyms...), and pairs
# in other languages (written for herd).
_ADVERSARIAL: list[tuple[Any, ...]] = [
    ("role_swap", False, "How do I gain fat and lose muscle?", "How do I lose fat and gain muscle?"),
    ("role_swap", False, "Why does my cat chase the dog?", "Why does my dog chase the cat?"),
    ("role_swap", False, "Is tea healthier than coffee?", "Is coffee healthier than tea?"),
    ("role_swap", False, "Cheap trains from Leeds to York", "Cheap trains from York to Leeds"),
    ("role_swap", False, "Should the tenant pay the landlord for repairs?",
                          "Should the landlord pay the tenant for repairs?"),
    ("role_swap", False, "Write an email from a manager to an intern", "Write an email from an intern to a manager"),
    ("role_swap", False, "Does salt dissolve faster in hot water or cold water?",
                          "Does salt dissolve faster in cold water or hot water?"),
    ("range", False, "Count from 1 to 10", "Count from 10 to 1"),
    ("range", False, "List the years between 1990 and 2000 in order from 2000 to 1990",
                      "List the years between 1990 and 2000 in order from 1990 to 2000"),
    ("range", False, "Sort the numbers from 5 down to 2", "Sort the numbers from 2 down to 5"),
    ("ordinal", False, "Who was the second person on the moon?", "Who was the first person on the moon?"),
    ("ordinal", False, "What is the 3rd planet from the sun?", "What is the 4th planet from the sun?"),
    ("antonym_both", False, "Turn left after the bank and right at the church",
                             "Turn right after the bank and left at the church"),
    ("antonym_both", False, "Should I import before I export the data?", "Should I export before I import the data?"),
    ("antonym_both", False, "Why do rich countries lend to poor countries?",
                             "Why do poor countries lend to rich countries?"),
    ("antonym_both", False, "Is it better to buy high and sell low?", "Is it better to buy low and sell high?"),
    ("antonym_both", False, "Open the window before you close the door", "Close the window before you open the door"),
    ("long_one_word", False, "{LONG} Recommend three children's books for the trip.",
                              "{LONG} Recommend three cookbooks for the trip."),
    ("long_one_word", False, "{LONG} Should I keep the changes?", "{LONG} Should I discard the changes?"),
    ("long_one_word", False, "{LONG} What was the return rate last quarter?",
                              "{LONG} What were the shipping costs last quarter?"),
    ("long_added_instruction", False, "{LONG} Summarise the plan.", "{LONG} Summarise the plan. Answer as a table."),
    ("long_added_instruction", False, "{LONG} List the risks.", "{LONG} List the risks in French."),
    ("long_paraphrase", True, "{LONG} Can you summarise the plan, please?", "{LONG} Summarize the plan."),
    ("script", False, "启用通知", "禁用通知", "zh"),
    ("script", False, "如何重置我的密码", "如何取消我的订阅", "zh"),
    ("script", False, "मेरा पासवर्ड रीसेट करें", "फ्रांस की राजधानी क्या है", "hi"),
    ("script", False, "आज मौसम कैसा है", "मेरा ऑर्डर कहाँ है", "hi"),
    ("script", False, "通知を有効にする方法", "通知を無効にする方法", "ja"),
    ("script", False, "Как включить уведомления?", "Как отключить уведомления?", "ru"),
    ("script", False, "كيف أعيد تعيين كلمة المرور", "ما هي عاصمة فرنسا", "ar"),
    ("script", False, "วิธีรีเซ็ตรหัสผ่าน", "วิธียกเลิกการสมัครสมาชิก", "th"),
    ("script", False, "알림을 켜는 방법", "알림을 끄는 방법", "ko"),
    ("script", False, "Πώς ανοίγω τις ειδοποιήσεις;", "Πώς κλείνω τις ειδοποιήσεις;", "el"),
    ("script", False, "איך מאפסים סיסמה", "איך מבטלים מנוי", "he"),
    ("negation", False, "Le magasin est ouvert le dimanche ?", "Le magasin n'est pas ouvert le dimanche ?", "fr"),
    ("negation", False, "Je veux annuler ma commande", "Je ne veux pas annuler ma commande", "fr"),
    ("polarity", False, "¿Cómo dejo el modo activo?", "¿Cómo dejo el modo desactivo?", "es"),
    ("polarity", False, "¿La tienda está abierta hoy?", "¿La tienda está cerrada hoy?", "es"),
    ("polarity", False, "Wie schalte ich die Benachrichtigungen ein?",
                         "Wie schalte ich die Benachrichtigungen aus?", "de"),
    ("near_repeat", True, "Wie setze ich mein Passwort zurück?", "wie setze ich mein passwort zurück", "de"),
    ("near_repeat", True, "¿Cómo restablezco mi contraseña?", "¿cómo restablezco mi contraseña", "es"),
    ("near_repeat", True, "如何重置我的密码？", "如何重置我的密码", "zh"),
    ("language", False, "¿Cómo restablezco mi contraseña?", "How do I reset my password?", "es"),
    ("case", True, "How deep is the river Thames?", "how deep is the River Thames"),
    ("quoted", True, 'What does "serendipity" mean?', "What does 'serendipity' mean?"),
    ("quoted", False, 'What does "affect" mean?', 'What does "effect" mean?'),
    ("conjuncts", True, "Compare the US and the UK", "Compare the UK and the US"),
    ("letter", False, "Which foods are rich in vitamin A?", "Which foods are rich in vitamins?"),
]

#: A long message of herd's own (about 170 words): the long_* pairs append to it.
LONG = (
    "Background for the quarterly review. Our team runs a small online shop that sells handmade "
    "furniture, lamps and kitchen goods to customers in four countries. Over the last three months we "
    "moved our warehouse to a larger building, hired two new packers, switched our courier for heavy "
    "parcels and started a loyalty scheme that gives returning customers a ten percent discount on their "
    "second order. Sales grew in the first two months and fell slightly in the third, mostly because a "
    "supplier delivered the oak for our best-selling table six weeks late. Customer reviews stayed "
    "positive overall, although several people mentioned that delivery updates were confusing and that "
    "the new courier left parcels outside without knocking. We also tested a new product page layout with "
    "larger photos and a clearer size guide, and the share of visitors who added something to their basket "
    "rose from four to five percent. Next quarter we plan to hire a part-time customer service assistant "
    "and to review our return policy."
)
HERD_PAIRS: list[tuple[str, bool, str, str, str]] = [
    (kind, same, a.replace("{LONG}", LONG), b.replace("{LONG}", LONG), rest[0] if rest else "en")
    for kind, same, a, b, *rest in [*_ENGLISH, *_ADVERSARIAL]
]


@dataclass
class Row:
    id: str
    kind: str
    lang: str
    should_merge: bool
    decision: Decision
    history_equal: bool = True
    a: str = ""
    b: str = ""

    def merged(self, threshold: float, history_rule: bool = True) -> bool:
        if history_rule and not self.history_equal:
            return False
        return self.decision.at(threshold)


@dataclass
class Dataset:
    name: str
    rows: list[Row] = field(default_factory=list)
    history_rule: bool = True

    def rates(self, threshold: float, history_rule: bool | None = None,
              rows: list[Row] | None = None) -> dict[str, Any]:
        hr = self.history_rule if history_rule is None else history_rule
        rows = self.rows if rows is None else rows
        pos = [r for r in rows if r.should_merge]
        neg = [r for r in rows if not r.should_merge]
        served = sum(r.merged(threshold, hr) for r in pos)
        wrong = sum(r.merged(threshold, hr) for r in neg)
        return {
            "should_merge": len(pos), "served": served, "served_rate": served / len(pos) if pos else None,
            "traps": len(neg), "traps_merged": wrong, "trap_rate": wrong / len(neg) if neg else None,
        }

    def by(self, attr: str, threshold: float) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for value in sorted({getattr(r, attr) for r in self.rows}):
            out[value] = self.rates(threshold, rows=[r for r in self.rows if getattr(r, attr) == value])
        return out


# -- loading ------------------------------------------------------------------------------


FOW_DATASETS = ("questions", "conversations", "scrambled")
#: How to get fow-cache's labelled pairs ("herd" on PyPI is another project: no extras there).
FOW_HINT = "pip install fow-cache==0.1.0 (in a herd checkout: pip install -e '.[eval]')"


def has_fow() -> bool:
    return importlib.util.find_spec("fow_cache") is not None


def _fow():
    try:
        from fow_cache import data
    except ImportError as exc:  # pragma: no cover
        raise SystemExit(f"the {', '.join(FOW_DATASETS)} datasets need fow-cache: {FOW_HINT}") from exc
    return data


def _label(item: dict, ambiguous: str) -> bool | None:
    if item.get("ambiguous"):
        return {"different": False, "same": True, "skip": None}[ambiguous]
    return bool(item["same_answer"])


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Labelled pairs from a JSON-lines file (format in the module docstring)."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                label = obj["label"]
                if label not in ("same", "different"):
                    raise ValueError(f"label must be 'same' or 'different', not {label!r}")
                a, b = obj["a"], obj["b"]
                if not all(isinstance(x, (str, list)) for x in (a, b)):
                    raise ValueError("a and b must be strings or message lists")
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: {exc}") from exc
            items.append({"id": str(obj.get("id", f"{Path(path).stem}-{n}")), "kind": str(obj.get("kind", "pair")),
                          "lang": str(obj.get("lang", "?")), "should_merge": label == "same", "a": a, "b": b})
    return items


def load_items(name: str, ambiguous: str = "different", limit: int | None = None,
               split: str | None = None) -> list[dict[str, Any]]:
    """[{id, kind, lang, should_merge, a, b}] where a/b are strings or message lists.

    `split` "even" / "odd" keeps the pairs at even / odd positions of the dataset (0-based,
    before `limit`): calibrate on one half, report the other."""
    items: list[dict[str, Any]] = []
    if name == "questions":
        for q in _fow().load_questions():
            lab = _label(q, ambiguous)
            if lab is not None:
                items.append({"id": q["id"], "kind": q.get("ambiguous") or q["category"], "lang": "en",
                              "should_merge": lab, "a": q["a"], "b": q["b"]})
    elif name == "conversations":
        for c in _fow().load_conversations():
            lab = _label(c, ambiguous)
            if lab is not None:
                items.append({"id": c["id"], "kind": c.get("ambiguous") or c["subtype"], "lang": "en",
                              "should_merge": lab, "a": c["a"], "b": c["b"]})
    elif name == "scrambled":
        items = scrambled(_fow().load_questions())
    elif name == "herd":
        for i, (kind, lab, a, b, lang) in enumerate(HERD_PAIRS):
            items.append({"id": f"herd-{i:03d}", "kind": kind, "lang": lang, "should_merge": lab, "a": a, "b": b})
    elif name.endswith(".jsonl"):
        items = read_pairs(name)
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
            if per.get(it["kind"], 0) < limit:
                per[it["kind"]] = per.get(it["kind"], 0) + 1
                kept.append(it)
        items = kept
    return items


def scrambled(questions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each distinct question with its first and last long words swapped (deterministic)."""
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for q in questions:
        for text in (q["a"], q["b"]):
            words = text.split()
            long_ = [i for i, w in enumerate(words) if sum(ch.isalpha() for ch in w) >= 4]
            if text in seen or len(long_) < 2:
                continue
            i, j = long_[0], long_[-1]
            wi, wj = words[i].strip("?.,!").lower(), words[j].strip("?.,!").lower()
            if wi == wj:
                continue
            seen.add(text)
            swapped = list(words)
            tail_i, tail_j = words[i][len(words[i].rstrip("?.,!")):], words[j][len(words[j].rstrip("?.,!")):]
            swapped[i] = words[j].strip("?.,!") + tail_i
            swapped[j] = words[i].strip("?.,!") + tail_j
            items.append({"id": f"scrambled-{len(items):03d}", "kind": "order_swap", "lang": "en",
                          "should_merge": False, "a": text, "b": " ".join(swapped)})
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
            d = Decision(False, "final message is not a user text")
            rows.append(Row(it["id"], it["kind"], it["lang"], it["should_merge"], d, False, ta or "", tb or ""))
            continue
        d = matcher.decide(probes[ta], probes[tb])
        rows.append(Row(it["id"], it["kind"], it["lang"], it["should_merge"], d, hist_eq, ta, tb))
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


def _table(p, title: str, groups: dict[str, dict[str, Any]]) -> None:
    p(f"   {title:<26}{'pairs':>6}{'served':>14}{'traps merged':>18}")
    for name, g in groups.items():
        served = f"{g['served']}/{g['should_merge']} {_pct(g['served_rate'])}" if g["should_merge"] else "-"
        traps = f"{g['traps_merged']}/{g['traps']} {_pct(g['trap_rate'])}" if g["traps"] else "-"
        p(f"   {name:<26}{g['should_merge'] + g['traps']:>6}{served:>14}{traps:>18}")


def report(ds: Dataset, threshold: float, sweep: list[float], out=None, explain: bool = False) -> dict[str, Any]:
    out = out or sys.stdout

    def p(*a: Any) -> None:
        print(*a, file=out)

    summary = ds.rates(threshold)
    kinds, langs = ds.by("kind", threshold), ds.by("lang", threshold)
    p(f"\n== {ds.name}: {len(ds.rows)} pairs, threshold {threshold:.2f}")
    if ds.name == "conversations":
        p("   (semantic rule: all but the final user message identical, else no merge)")
    p(f"   should merge: served {summary['served']}/{summary['should_merge']} = {_pct(summary['served_rate'])}; "
      f"traps: merged {summary['traps_merged']}/{summary['traps']} = {_pct(summary['trap_rate'])}")
    _table(p, "kind", kinds)
    if len(langs) > 1:
        _table(p, "language", langs)
    result: dict[str, Any] = {"n": len(ds.rows), "threshold": threshold, **summary, "by_kind": kinds, "by_lang": langs}
    if ds.name == "conversations" or any(not r.history_equal for r in ds.rows):
        hist = sum(r.history_equal for r in ds.rows)
        final_only = ds.rates(threshold, history_rule=False)
        p(f"   pairs whose history is identical: {hist}/{len(ds.rows)}; final message alone (history rule "
          f"off): served {_pct(final_only['served_rate'])}, traps merged {_pct(final_only['trap_rate'])}")
        result["history_equal"] = hist
        result["final_message_only"] = final_only
    rows_sweep = []
    p(f"   {'threshold':>9} {'served':>8} {'traps':>8} {'#traps':>7}")
    for t in sweep:
        r = ds.rates(t)
        rows_sweep.append({"threshold": t, **r})
        mark = " <" if abs(t - threshold) < 1e-9 else ""
        p(f"   {t:>9.2f} {_pct(r['served_rate']):>8} {_pct(r['trap_rate']):>8} {r['traps_merged']:>7}{mark}")
    result["sweep"] = rows_sweep
    if explain:
        p("   -- every pair: merged?, label, similarity, why")
        for row in ds.rows:
            d = row.decision
            merged = row.merged(threshold, ds.history_rule)
            why = d.reason if row.history_equal else "history differs: " + d.reason
            flag = "" if merged == row.should_merge else ("  WRONG MERGE" if merged else "  missed")
            score = f"{d.score:.3f}" if d.score is not None else "  -  "
            p(f"   {'MERGE' if merged else 'apart':<6}{'same' if row.should_merge else 'diff':<5}{score:>6}  "
              f"{row.kind}/{row.lang} {row.a[:60]!r} | {row.b[:60]!r}: {why}{flag}")
    return result


def best_threshold(ds: Dataset, sweep: list[float], max_trap_rate: float) -> dict[str, Any] | None:
    """The swept threshold that serves most with at most `max_trap_rate` traps; on a tie the
    highest (the embedding stays the strictest second witness that costs nothing)."""
    best = None
    for t in sorted(sweep):
        r = ds.rates(t)
        ok = r["trap_rate"] is None or r["trap_rate"] <= max_trap_rate
        if ok and (best is None or (r["served_rate"] or 0) >= (best["served_rate"] or 0)):
            best = {"threshold": t, **r}
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="herd eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                    help=f"similarity threshold (default {DEFAULT_THRESHOLD})")
    ap.add_argument("--sweep", default=DEFAULT_SWEEP, help=f"thresholds LO:HI:STEP (default {DEFAULT_SWEEP})")
    ap.add_argument("--json", type=Path, default=None,
                    help=f"write results here (default {DEFAULT_JSON} in a herd checkout, else {INSTALLED_JSON})")
    ap.add_argument("--model", default=None, help="ONNX model path (default: the bundled all-MiniLM-L6-v2 int8)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json path (default: embeddings/assets)")
    ap.add_argument("--languages", default="en", help="languages the model reads, comma separated (default en)")
    ap.add_argument("--datasets", default=None,
                    help="comma separated: questions,conversations,herd,scrambled (with only --pairs: those files)")
    ap.add_argument("--pairs", action="append", default=[], metavar="FILE.jsonl",
                    help='labelled pairs, one JSON object a line: '
                         '{"a", "b", "label": "same"|"different", "kind", "lang"}')
    ap.add_argument("--ambiguous", choices=("different", "same", "skip"), default="different",
                    help="how to count fow-cache's ambiguous pairs (default: as traps)")
    ap.add_argument("--limit", type=int, default=None, help="at most N pairs per kind (quick runs)")
    ap.add_argument("--split", choices=("even", "odd"), default=None,
                    help="only the pairs at even / odd positions of each dataset (held-out checks)")
    ap.add_argument("--items", action="store_true", help="include every pair's result in the JSON")
    ap.add_argument("--explain", action="store_true", help="print every pair: merged or not, and why")
    ap.add_argument("--show", type=int, default=0, metavar="N", help="print up to N merged traps and N missed pairs")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")
    ap.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                    help=f"the model's matrix products: int8 or fp32 (default {DEFAULT_PRECISION}, as herd runs it)")
    args = ap.parse_args(argv)
    if args.json is None:
        args.json = DEFAULT_JSON if Path("benchmarks", "__init__.py").is_file() else INSTALLED_JSON
    if not 0.0 < args.threshold <= 1.0:
        ap.error("--threshold must be in (0, 1]")
    sweep = parse_sweep(args.sweep)
    if all(abs(t - args.threshold) > 1e-9 for t in sweep):
        sweep = sorted(sweep + [args.threshold])
    # default: fow-cache and herd's own; with --pairs alone, only those files
    spec = args.datasets if args.datasets is not None else ("" if args.pairs else "questions,conversations,herd")
    names = [d.strip() for d in spec.split(",") if d.strip()]
    if args.datasets is None and not has_fow():
        names = [n for n in names if n not in FOW_DATASETS]
        print(f"herd eval: fow-cache is not installed, so its labelled pairs are skipped; {FOW_HINT}",
              file=sys.stderr)
    datasets: list[tuple[str, list[dict[str, Any]]]] = []
    try:
        for name in names + args.pairs:
            datasets.append((name, load_items(name, args.ambiguous, args.limit, args.split)))
    except (OSError, ValueError) as exc:
        ap.error(str(exc))

    from embeddings.embedder import Embedder

    t0 = time.perf_counter()
    embedder = Embedder(model_path=args.model, tokenizer_path=args.tokenizer, intra_op_threads=args.threads,
                        precision=args.precision)
    languages = tuple(x.strip() for x in args.languages.split(",") if x.strip())
    config = MatchConfig(threshold=args.threshold, max_tokens=embedder.max_tokens, languages=languages)
    matcher = Matcher(None, config, fits=embedder.fits)  # the embedder's tokenizer decides the window

    results: dict[str, Any] = {
        "model": embedder.model_path, "precision": embedder.precision, "threshold": args.threshold,
        "languages": list(languages), "ambiguous": args.ambiguous, "limit": args.limit, "split": args.split,
        "datasets": {},
    }
    for name, items in datasets:
        ds = Dataset(name, score_items(items, matcher, embedder))
        res = report(ds, args.threshold, sweep, explain=args.explain)
        if name == "questions":
            best = best_threshold(ds, sweep, TARGET_TRAPS)
            res["best_threshold_at_1pct_traps"] = best
            met = (res["trap_rate"] or 0) <= TARGET_TRAPS and (res["served_rate"] or 0) >= TARGET_SERVED
            res["targets"] = {"traps_max": TARGET_TRAPS, "served_min": TARGET_SERVED, "met": met}
            print(f"   targets (traps <= {TARGET_TRAPS:.0%}, served >= {TARGET_SERVED:.0%}): "
                  f"{'met' if met else 'NOT met'}"
                  + (f"; best swept threshold at <=1% traps: {best['threshold']:.2f} serves {_pct(best['served_rate'])}"
                     if best else ""))
        if name == "conversations":
            res["targets"] = {"traps_max": 0.0, "met": res["traps_merged"] == 0}
            print(f"   target (no trap merged): {'met' if res['targets']['met'] else 'NOT met'}")
        if args.show:
            wrong = [r for r in ds.rows if not r.should_merge and r.merged(args.threshold, ds.history_rule)]
            missed = [r for r in ds.rows if r.should_merge and not r.merged(args.threshold, ds.history_rule)]
            for title, shown in (("merged traps", wrong), ("missed should-merge", missed)):
                print(f"   -- {title} ({len(shown)}):")
                for row in shown[: args.show]:
                    s = row.decision.score
                    print(f"      {s if s is not None else float('nan'):.3f} {row.kind:<18} {row.a[:60]!r} | "
                          f"{row.b[:60]!r}: {row.decision.reason[:80]}")
        if args.items:
            res["items"] = [
                {"id": x.id, "kind": x.kind, "lang": x.lang, "should_merge": x.should_merge, "score": x.decision.score,
                 "normalized_equal": x.decision.normalized_equal, "verified": x.decision.verified,
                 "reason": x.decision.reason, "history_equal": x.history_equal,
                 "merged": x.merged(args.threshold, ds.history_rule)}
                for x in ds.rows
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
