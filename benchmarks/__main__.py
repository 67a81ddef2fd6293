"""`herd bench` (or `python -m benchmarks`): load-test herd side by side with its floors.

Scenarios (subcommands; `herd bench` alone runs `compare`):

  compare  one workload at a fixed concurrency (or rate) against every target in turn, in
           interleaved rounds: the simulator directly, a bare passthrough (the physical
           floor of this stack), herd in each coalescing mode, and any other proxy URL.
           Then the same at half of the passthrough's throughput (latency added at half load).
  burst    N identical requests at once: upstream calls, and how long after the leader's
           answer the last follower gets its own (herd, and the floor: a bare single-flight
           coalescing proxy, benchmarks/fanout_floor.py, the least this stack can cost).
  fanout   N stream subscribers of one flight: the gaps between chunks that herd adds (and
           that the floor adds).
  soak     herd's resident memory sampled across many requests after a warm-up.
  list     the workloads.

Every run starts its own simulator, passthrough and herd processes on free loopback ports
(or uses the URLs you give), prints progress on stderr and a table on stdout, and writes
results.json, summary.txt and PNG plots to --out (default benchmarks/out/<timestamp>/).
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import loadgen, report, workloads
from benchmarks.loadgen import Load, Phase, Records
from benchmarks.harness import Proc, ProcError, Stack, chat_calls, sim_reset, sim_stats
from benchmarks.procs import (
    REPO_ROOT,
    finish_profiler,
    machine_busy_seconds,
    prometheus,
    self_cpu_seconds,
    start_profiler,
    wait_for_quiet,
)
from benchmarks.workloads import Options, Request

MODES = ("off", "exact", "semantic")
BUILTIN_TARGETS = ("direct", "passthrough", "floor", "floor-raw", *MODES)
LEADER_KINDS = ("herd", "floor")  # targets whose answers say leader or follower (the x-herd header)
SCHEMA = "herd-bench/1"
DESCRIPTION = """Load-test herd side by side with its floors: the upstream simulator directly, a bare
passthrough (the physical floor of this stack), a bare single-flight coalescing proxy
("floor": the floor of this stack for coalescing), herd in each coalescing mode, and any
other OpenAI-compatible proxy you name.

Each run starts its own simulator, passthrough and herd on free loopback ports (or uses
the URLs you give), shows progress on stderr, prints a table on stdout and writes
results.json, summary.txt and PNG plots to --out (default benchmarks/out/<timestamp>/)."""


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    kind: str  # direct | passthrough | floor | herd | external
    url: str
    proc: Proc | None = None
    headers: dict[str, str] = field(default_factory=dict)  # added to every request


@dataclass
class Bench:
    """What a scenario runs against."""

    args: argparse.Namespace
    stack: Stack
    sim_url: str
    sim: Proc | None
    sim_settings: dict[str, Any]
    targets: list[Target]
    unavailable: dict[str, str]
    out: Path = Path(".")
    profiles: dict[str, Any] = field(default_factory=dict)
    has_sim: bool = field(init=False, default=False)  # the upstream is herd's simulator: its counters are read

    def __post_init__(self) -> None:
        try:
            sim_stats(self.sim_url, log=False)
            self.has_sim = True
        except (OSError, ValueError):
            self.has_sim = False


def _parse_targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        if n not in BUILTIN_TARGETS:
            raise SystemExit(f"herd bench: unknown target {n!r}; choose from {', '.join(BUILTIN_TARGETS)} "
                             "(other proxies: --url NAME=URL)")
    return names


def setup(args: argparse.Namespace, stack: Stack, sim_settings: dict[str, Any], *, cache: bool = False,
          cache_entries: int = 10_000) -> Bench:
    names = _parse_targets(args.targets)
    sim: Proc | None = None
    if args.sim_url:
        sim_url = args.sim_url.rstrip("/").removesuffix("/v1")
        _say(f"upstream: {sim_url} (given)")
    else:
        sim = stack.simulator(**sim_settings)
        sim_url = sim.url
        _say(f"upstream: simulator at {sim_url} ({_settings_text(sim_settings)})")
    targets: list[Target] = []
    unavailable: dict[str, str] = {}
    for name in names:
        try:
            if name == "direct":
                targets.append(Target("direct", "direct", sim_url))
            elif name == "passthrough":
                p = stack.passthrough(sim_url)
                targets.append(Target("passthrough", "passthrough", p.url, p))
            elif name in ("floor", "floor-raw"):
                p = stack.floor(sim_url, server="raw" if name == "floor-raw" else "uvicorn")
                targets.append(Target(name, "floor", p.url, p))
            elif args.herd_url:
                targets.append(Target(f"herd-{name}", "herd", args.herd_url.rstrip("/").removesuffix("/v1"),
                                      headers={"x-herd-coalesce": name}))
            else:
                p = stack.herd(sim_url, name, cache=cache, cache_entries=cache_entries, log_level=args.herd_log_level,
                               overrides=args.herd_option or ())
                targets.append(Target(f"herd-{name}", "herd", p.url, p))
        except ProcError as e:
            if name != "semantic":
                raise
            first = str(e).strip().splitlines()[-1] if str(e).strip() else "did not start"
            unavailable[f"herd-{name}"] = first
            _say(f"herd-{name} is unavailable and left out: {first}")
    for spec in args.url or []:
        label, sep, url = spec.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            raise SystemExit(f"herd bench: --url takes NAME=URL, got {spec!r}")
        targets.append(Target(label, "external", url.rstrip("/").removesuffix("/v1")))
    for t in targets:
        _say(f"target {t.name:<16} {t.url}")
    return Bench(args, stack, sim_url, sim, sim_settings, targets, unavailable, out=args.out_dir)


def _settings_text(s: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items())


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def with_headers(requests: Iterator[Request], extra: dict[str, str]) -> Iterator[Request]:
    """The same requests with `extra` headers (one merged dict per tenant, made once)."""
    if not extra:
        yield from requests
        return
    merged: dict[int, dict[str, str]] = {}
    for r in requests:
        h = merged.get(id(r.headers))
        if h is None:
            h = merged[id(r.headers)] = {**r.headers, **extra}
        yield replace(r, headers=h)


# --------------------------------------------------------------------------- one measured run


@dataclass
class Measured:
    rec: Records
    upstream_calls: int | None
    upstream_max_active: int | None
    cpu_target_s: float | None
    cpu_sim_s: float | None
    metrics_diff: dict[str, float] | None
    background_cores: float = 0.0  # CPU used by processes outside this benchmark meanwhile


def measure(bench: Bench, target: Target, load: Load, requests: Callable[[], Iterator[Request]], *, label: str,
            warmup: Load | None, seed: int, keep_reads: bool = False, ticks: Sequence[Callable] = (),
            procs: int = 1) -> Measured:
    """Warm `target` up, zero the counters, run `load` with `requests`, read the counters."""
    sim_url = bench.sim_url
    snap: dict[str, Any] = {}
    label_slug = label.replace(" ", "_")

    def factory(make: Callable[[], Iterator[Request]]) -> Callable[[int, int], Iterator[Request]]:
        def build(k: int, n: int) -> Iterator[Request]:
            it = with_headers(make(), target.headers)
            return it if n == 1 else itertools.islice(it, k, None, n)

        return build

    warm_opts = Options(model=bench.args.model, max_tokens=1)
    warm_factory = factory(lambda: workloads.warmup_requests(warm_opts, seed))

    def own_cpu() -> float:
        return sum(p.cpu_seconds() for p in bench.stack.procs) + self_cpu_seconds()

    if bench.args.wait_quiet > 0:
        busy = wait_for_quiet(bench.args.wait_quiet)
        if busy > 0.25:
            _say(f"  (the machine is still busy: {busy:.2f} cores in use by other processes; measuring anyway)")

    def before() -> None:
        snap["busy"] = (machine_busy_seconds(), own_cpu(), time.monotonic())
        if bench.args.profile and target.proc is not None:
            seconds = load.duration or bench.args.profile_seconds
            snap["spy"] = start_profiler(target.proc.pid, seconds, bench.out / f"profile_{label_slug}.txt")
        if bench.has_sim:
            sim_reset(sim_url)
        snap["metrics"] = prometheus(target.url) if target.kind == "herd" else None
        snap["cpu_target"] = target.proc.cpu_seconds() if target.proc else None
        snap["cpu_sim"] = bench.sim.cpu_seconds() if bench.sim else None

    def upstream_now() -> int | None:
        return chat_calls(sim_url) if bench.has_sim else None

    rec = loadgen.run(Phase(
        url=target.url, requests=factory(requests), load=load, warmup=warmup, warmup_requests=warm_factory,
        before_measure=before, ticks=list(ticks), label=label, upstream_calls=upstream_now,
        progress=not bench.args.no_progress, timeout=bench.args.timeout, keep_reads=keep_reads, seed=seed,
        procs=procs))
    busy0, own0, t0 = snap["busy"]
    other = max(0.0, (machine_busy_seconds() - busy0) - (own_cpu() - own0))
    background = round(other / max(time.monotonic() - t0, 1e-9), 3)
    if snap.get("spy") is not None:
        bench.profiles[label_slug] = finish_profiler(snap["spy"])
    stats = sim_stats(sim_url, log=False) if bench.has_sim else None
    calls = chat_calls(sim_url) if bench.has_sim else None
    metrics_after = prometheus(target.url) if target.kind == "herd" else None
    diff = None
    if snap.get("metrics") is not None and metrics_after is not None:
        diff = {k: v - snap["metrics"].get(k, 0.0) for k, v in metrics_after.items()}
        if calls is None:  # not a simulator: herd's own count of upstream calls
            calls = int(sum(v for k, v in diff.items() if k.startswith("herd_upstream_calls_total")))
    if calls is None and target.kind == "direct":
        calls = len(rec)
    cpu_t = target.proc.cpu_seconds() - snap["cpu_target"] if target.proc else None
    cpu_s = bench.sim.cpu_seconds() - snap["cpu_sim"] if bench.sim else None
    return Measured(rec, calls, stats.get("max_active") if stats else None, cpu_t, cpu_s, diff, background)


def rotation(targets: Sequence[Target], r: int) -> list[Target]:
    k = r % len(targets) if targets else 0
    return list(targets[k:]) + list(targets[:k])


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 4)


class Pool:
    """One target's measurements over the rounds of a phase."""

    def __init__(self, keep_reads: bool = False) -> None:
        self.rec = Records(keep_reads)
        self.elapsed = 0.0
        self.rounds: list[dict[str, Any]] = []
        self.calls: int | None = 0
        self.max_active = 0
        self.cpu_target: float | None = 0.0
        self.cpu_sim: float | None = 0.0
        self.metrics: dict[str, float] | None = None

    def add(self, m: Measured) -> None:
        self.rec.extend(m.rec)
        self.elapsed += m.rec.elapsed
        self.rec.elapsed = self.elapsed
        ok = sum(1 for s in m.rec.status if s == 200)
        self.rounds.append({"requests": len(m.rec), "req_per_s": round(ok / m.rec.elapsed, 1) if m.rec.elapsed else None,
                            "upstream_calls": m.upstream_calls, "background_cores": m.background_cores})
        self.calls = None if self.calls is None or m.upstream_calls is None else self.calls + m.upstream_calls
        self.max_active = max(self.max_active, m.upstream_max_active or 0)
        self.cpu_target = None if self.cpu_target is None or m.cpu_target_s is None else self.cpu_target + m.cpu_target_s
        self.cpu_sim = None if self.cpu_sim is None or m.cpu_sim_s is None else self.cpu_sim + m.cpu_sim_s
        if m.metrics_diff is not None:
            self.metrics = {k: (self.metrics or {}).get(k, 0.0) + v for k, v in m.metrics_diff.items()}

    def summary(self, target: Target) -> dict[str, Any]:
        s = report.summarize(self.rec)
        n = s["requests"]
        s = {"kind": target.kind, "url": target.url, **s}
        s["req_per_s_rounds"] = [r["req_per_s"] for r in self.rounds]
        s["background_cores_rounds"] = [r["background_cores"] for r in self.rounds]
        s["upstream_calls"] = self.calls
        s["upstream_max_active"] = self.max_active or None
        s["coalesce_ratio"] = round(1.0 - self.calls / n, 4) if self.calls is not None and n else None
        s["cpu_ms_per_req"] = {
            "target": round(self.cpu_target / n * 1000.0, 4) if self.cpu_target is not None and n else None,
            "simulator": round(self.cpu_sim / n * 1000.0, 4) if self.cpu_sim is not None and n else None,
            "loadgen": s.pop("loadgen_cpu_ms_per_req"),
        }
        if self.metrics is not None:
            s["herd_upstream_ms_approx"] = report.histogram_quantiles({}, self.metrics, "herd_upstream_seconds")
            s["herd_upstream_ttft_ms_approx"] = report.histogram_quantiles({}, self.metrics,
                                                                           "herd_upstream_ttft_seconds")
            s["herd_fanout_lag_ms_approx"] = report.histogram_quantiles({}, self.metrics, "herd_fanout_lag_seconds")
        return s


def add_ratios(targets: dict[str, dict[str, Any]]) -> None:
    """Each target's throughput and latency relative to direct and to the passthrough."""
    direct, passthrough = targets.get("direct"), targets.get("passthrough")

    def p(t: dict | None, key: str) -> float | None:
        return None if not t or not t.get("latency_ms") else t["latency_ms"].get(key)

    for t in targets.values():
        vs: dict[str, Any] = {}
        for ref_name, ref in (("passthrough", passthrough), ("direct", direct)):
            if ref and ref.get("req_per_s") and t.get("req_per_s") is not None:
                vs[f"req_per_s_vs_{ref_name}"] = round(t["req_per_s"] / ref["req_per_s"], 4)
            for q in ("p50", "p99"):
                a, b = p(t, q), p(ref, q)
                if a is not None and b is not None:
                    vs[f"{q}_added_ms_vs_{ref_name}"] = round(a - b, 3)
        t["vs"] = vs


# --------------------------------------------------------------------------- compare


def _workload_options(args: argparse.Namespace) -> Options:
    return Options(model=args.model, pool=args.pool, zipf_s=args.zipf_s, burst=args.burst, tenants=args.tenants,
                   merge_share=args.merge_share, stream_share=args.stream_share, max_tokens=args.max_tokens)


def _sim_settings(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for key in ("ttft_ms", "tokens_per_s", "reply_tokens"):
        v = getattr(args, key, None)
        if v is not None:
            out[key] = v
    return out


def run_compare(args: argparse.Namespace, stack: Stack, out: Path) -> dict[str, Any]:
    wl = workloads.get(args.workload)
    opts = _workload_options(args)
    bench = setup(args, stack, _sim_settings(args, {"ttft_ms": 50.0, "tokens_per_s": 0.0, "reply_tokens": 16,
                                                     **wl.sim}), cache=args.cache)
    loads: list[tuple[str, Load]] = []
    if args.rate:
        loads.append((f"rate {args.rate:g}", Load(rate=args.rate, duration=args.duration, requests=args.requests)))
    else:
        loads.append(("throughput", Load(concurrency=args.concurrency, duration=args.duration, requests=args.requests)))
    phases: list[dict[str, Any]] = []
    pools_by_phase: list[dict[str, Pool]] = []
    half_of: list[str | None] = [None]
    i = 0
    while i < len(loads):
        name, load = loads[i]
        _say(f"\n== {name}: {wl.name} workload, {load.describe()}, {args.rounds} round(s)")
        pools = {t.name: Pool() for t in bench.targets}
        for r in range(args.rounds):
            for t in rotation(bench.targets, r):
                seed = args.seed + r
                warm = Load(concurrency=load.concurrency, duration=args.warmup) if load.concurrency else \
                    Load(rate=load.rate, duration=args.warmup)
                m = measure(bench, t, load, lambda s=seed: wl.requests(opts, s), label=f"{t.name} r{r + 1}",
                            warmup=warm if args.warmup > 0 else None, seed=seed * 7919 + i, procs=args.procs)
                pools[t.name].add(m)
        targets = {t.name: pools[t.name].summary(t) for t in bench.targets}
        add_ratios(targets)
        load_text = load.describe() + (f" (half of {half_of[0]}'s req/s above)" if name == "half load" else "")
        phases.append({"name": name, "load": _load_dict(load), "load_text": load_text, "workload": wl.name,
                       "targets": targets, **({"half_of": half_of[0]} if name == "half load" else {})})
        pools_by_phase.append(pools)
        if i == 0 and not args.rate and args.half_load:
            if args.half_of:
                if args.half_of not in targets:
                    raise SystemExit(f"herd bench: --half-of {args.half_of!r} is not a target ({', '.join(targets)})")
                ref_name = args.half_of
            else:  # the slowest proxy: every target then runs at half of its capacity or less
                proxies = [n for n, t in targets.items() if t["kind"] != "direct" and t.get("req_per_s")]
                ref_name = min(proxies, key=lambda n: targets[n]["req_per_s"], default=None)
            if ref_name and targets[ref_name].get("req_per_s"):
                rate = round(targets[ref_name]["req_per_s"] / 2, 1)
                half_of[0] = ref_name
                loads.append(("half load", Load(rate=rate, duration=args.duration, requests=args.requests)))
        i += 1

    plots = []
    for k, (phase, pools) in enumerate(zip(phases, pools_by_phase)):
        prefix = "" if k == 0 else phase["name"].replace(" ", "_") + "_"
        title = f"{phase['workload']} workload, {phase['load_text']}"
        if not args.no_plots:
            plots.append(report.plot_latency_over_time({n: p.rec for n, p in pools.items()},
                                                       out / f"{prefix}latency_over_time.png", "Latency over time: " + title))
            plots.append(report.plot_cdf({n: _ok_latency(p.rec) for n, p in pools.items()},
                                         out / f"{prefix}latency_cdf.png", "Latency CDF: " + title))
            if k == 0:
                plots.append(report.plot_upstream_calls(phase["targets"], out / "upstream_calls.png",
                                                        "Upstream calls vs client requests: " + title))
                itl = {n: np.frombuffer(p.rec.itl, dtype=float) for n, p in pools.items() if len(p.rec.itl)}
                if itl:
                    plots.append(report.plot_cdf(itl, out / "itl_cdf.png", "Inter-chunk gaps of streams: " + title,
                                                 xlabel="gap between reads, ms", ylabel="fraction of gaps at or below"))
    checks = compare_checks(args, phases)
    return {"phases": phases, "checks": checks, "plots": plots, "bench": bench,
            "text": "\n\n".join(report.compare_tables(p) for p in phases)}


def _ok_latency(rec: Records) -> np.ndarray:
    a = report.arrays(rec)
    return a["latency"][a["status"] == 200]


def _load_dict(load: Load) -> dict[str, Any]:
    return {"concurrency": load.concurrency, "rate": load.rate, "duration_s": load.duration,
            "requests": load.requests, "poisson": load.poisson if load.rate else None}


def compare_checks(args: argparse.Namespace, phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    if args.workload != "unique":
        return checks
    first = phases[0]
    t = first["targets"]
    if "herd-exact" in t and "passthrough" in t and first["load"]["concurrency"]:
        ratio = t["herd-exact"]["vs"].get("req_per_s_vs_passthrough")
        c = first["load"]["concurrency"]
        checks.append({
            "name": "all-unique, exact: throughput",
            "goal": f">= 90% of the passthrough's req/s at {c} connections" + ("" if c == 256 else " (goal: 256)"),
            "measured": f"{ratio * 100:.1f}% ({t['herd-exact']['req_per_s']:,} vs {t['passthrough']['req_per_s']:,} req/s)"
            if ratio is not None else "-",
            "value": ratio, "met": None if ratio is None or c != 256 else ratio >= 0.90})
    half = next((p for p in phases if p["name"] == "half load"), None)
    if half and "herd-exact" in half["targets"]:
        vs = half["targets"]["herd-exact"]["vs"]
        added = vs.get("p50_added_ms_vs_direct")
        over_pass = vs.get("p50_added_ms_vs_passthrough")
        checks.append({
            "name": "all-unique, exact: added latency",
            "goal": f"p50 added <= 1 ms at half load ({half['load']['rate']:g} req/s = half of {half['half_of']})",
            "measured": (f"{added:+.2f} ms vs direct" + (f", {over_pass:+.2f} ms vs passthrough"
                                                        if over_pass is not None else "")) if added is not None else "-",
            "value": added, "met": None if added is None else added <= 1.0})
    return checks


# --------------------------------------------------------------------------- burst


def run_burst(args: argparse.Namespace, stack: Stack, out: Path) -> dict[str, Any]:
    n = args.requests
    opts = replace(_workload_options(args), burst=n, stream_share=args.stream_share or 0.0)
    bench = setup(args, stack, _sim_settings(args, {"ttft_ms": 1000.0, "tokens_per_s": 0.0, "reply_tokens": 16}))
    wl = workloads.get("bursts")
    load = Load(concurrency=n, requests=n)
    _say(f"\n== burst: {n:,} identical requests at once, {args.rounds} round(s)")
    pools = {t.name: Pool() for t in bench.targets}
    per: dict[str, dict[str, list]] = {t.name: {"calls": [], "lag_first": [], "lag_leader": [], "first": [],
                                                 "wall": [], "leaders": [], "spread": []} for t in bench.targets}
    for r in range(args.rounds):
        for t in rotation(bench.targets, r):
            seed = args.seed + r
            m = measure(bench, t, load, lambda s=seed: itertools.islice(wl.requests(opts, s), n),
                        label=f"{t.name} r{r + 1}", warmup=Load(concurrency=n, requests=n), seed=seed)
            pools[t.name].add(m)
            a = report.arrays(m.rec)
            ok = a["status"] == 200
            done = a["start"] + a["latency"]
            d = per[t.name]
            d["calls"].append(m.upstream_calls)
            if ok.any():
                first = done[ok].min()
                d["lag_first"].extend((done[ok] - first).tolist())
                d["first"].append(first - a["start"].min())
                d["wall"].append(done[ok].max() - a["start"].min())
                d["spread"].append(a["start"].max() - a["start"].min())
                leaders = np.flatnonzero(ok & (a["role"] == 1))
                d["leaders"].append(int(leaders.size))
                if leaders.size:
                    lead_done = done[leaders].min()
                    followers = ok & (a["role"] == 2)
                    d["lag_leader"].extend((done[followers] - lead_done).tolist())
    targets = {}
    for t in bench.targets:
        s = pools[t.name].summary(t)
        d = per[t.name]
        s["upstream_calls_per_burst"] = d["calls"]
        s["leaders_per_burst"] = d["leaders"] if t.kind in LEADER_KINDS else None
        s["first_answer_ms"] = [round(v * 1000, 2) for v in d["first"]]
        s["burst_wall_ms"] = [round(v * 1000, 2) for v in d["wall"]]
        s["send_spread_ms"] = [round(v * 1000, 2) for v in d["spread"]]
        s["after_first_answer_ms"] = report.dist_ms(d["lag_first"])
        s["follower_after_leader_ms"] = report.dist_ms(d["lag_leader"]) if d["lag_leader"] else None
        targets[t.name] = s
    add_ratios(targets)
    phase = {"name": "burst", "load": _load_dict(load), "load_text": f"{n:,} identical requests at once",
             "workload": "bursts", "targets": targets}
    rows = []
    for name, s in targets.items():
        lag = s["follower_after_leader_ms"] or s["after_first_answer_ms"] or {}
        rows.append([name, s["requests"], ", ".join("-" if c is None else f"{c:,}" for c in s["upstream_calls_per_burst"]),
                     s["errors"], " / ".join(f"{v:,.0f}" for v in s["first_answer_ms"]),
                     "leader" if s["follower_after_leader_ms"] else "first answer",
                     lag.get("p50"), lag.get("p90"), lag.get("p99"), lag.get("max"),
                     " / ".join(f"{v:,.0f}" for v in s["burst_wall_ms"]),
                     " / ".join(f"{v:,.1f}" for v in s["send_spread_ms"])])
    text = report.table(["target", "requests", "upstream calls per burst", "errors", "first answer ms",
                         "lag after", "lag p50", "lag p90", "lag p99", "lag max", "burst wall ms", "send spread ms"],
                        rows,
                        f"burst: {n:,} identical requests at once, {args.rounds} round(s); "
                        "lag = a request's answer after the leader's (herd, floor) or after the first answer "
                        "(others), ms")
    text += report.background_note(targets)
    checks = []
    herd = targets.get("herd-exact")
    fanout = (herd or {}).get("herd_fanout_lag_ms_approx")
    if fanout:
        text += ("\nherd-side fan-out (herd_fanout_lag_seconds, from the flight's end to each answer written, "
                 f"approx.): p50 {fanout['p50']:.1f} ms, p90 {fanout['p90']:.1f} ms, p99 {fanout['p99']:.1f} ms; "
                 "the lags above also hold the load generator's own time to read 1,000 answers on the same cores\n")
    if herd:
        calls = herd["upstream_calls_per_burst"]
        checks.append({"name": f"burst of {n:,}: upstream calls", "goal": "1 per burst",
                       "measured": ", ".join(str(c) for c in calls), "value": calls,
                       "met": all(c == 1 for c in calls) if calls and None not in calls else None})
        lag = herd["follower_after_leader_ms"]
        checks.append({"name": f"burst of {n:,}: last follower", "goal": "p99 within 10 ms of the leader",
                       "measured": f"at the client p99 {lag['p99']:.1f} ms, max {lag['max']:.1f} ms" if lag else "-",
                       "value": lag["p99"] if lag else None, "met": lag["p99"] <= 10.0 if lag else None})
        if fanout:
            checks.append({"name": f"burst of {n:,}: herd's fan-out", "goal": "p99 within 10 ms of the flight's end",
                           "measured": f"p99 {fanout['p99']:.1f} ms (herd_fanout_lag_seconds, approx.)",
                           "value": fanout["p99"], "met": fanout["p99"] <= 10.0})
        floor_lag = (targets.get("floor") or {}).get("follower_after_leader_ms")
        if lag and floor_lag:
            added = round(lag["p99"] - floor_lag["p99"], 3)
            checks.append({"name": f"burst of {n:,}: herd over the floor",
                           "goal": "(for reference: what the stack itself costs)",
                           "measured": f"lag p99 {added:+.1f} ms over the floor's {floor_lag['p99']:.1f} ms "
                                       f"(the floor: {floor_lag['p99'] * 1000 / max(n - 1, 1):.1f} us per follower)",
                           "value": added, "met": None})
    plots = []
    if not args.no_plots:
        plots.append(report.plot_burst({name: np.asarray(per[name]["lag_leader"] or per[name]["lag_first"])
                                        for name in per}, out / "burst_lag.png",
                                       f"Burst of {n:,} identical requests: answers after the first "
                                       "(herd, floor: after the leader)"))
        plots.append(report.plot_cdf({name: _ok_latency(p.rec) for name, p in pools.items()}, out / "latency_cdf.png",
                                     f"Burst of {n:,}: client latency CDF"))
        plots.append(report.plot_upstream_calls(targets, out / "upstream_calls.png",
                                                f"Burst of {n:,}: upstream calls vs client requests ({args.rounds} rounds)"))
    return {"phases": [phase], "checks": checks, "plots": plots, "bench": bench, "text": text}


# --------------------------------------------------------------------------- fanout


def _event_times(reads: list[tuple[float, int]]) -> np.ndarray:
    """The arrival time of each SSE event of one stream (events of one read share its time)."""
    return np.repeat(np.array([t for t, _ in reads], dtype=float), [k for _, k in reads])


def run_fanout(args: argparse.Namespace, stack: Stack, out: Path) -> dict[str, Any]:
    n = args.subscribers
    opts = replace(_workload_options(args), burst=n, stream_share=1.0)
    settings = _sim_settings(args, {"ttft_ms": 200.0, "tokens_per_s": 20.0, "reply_tokens": 40})
    bench = setup(args, stack, settings)
    wl = workloads.get("bursts")
    load = Load(concurrency=n, requests=n)
    nominal = 1000.0 / settings["tokens_per_s"] if settings["tokens_per_s"] else None
    _say(f"\n== fanout: {n:,} stream subscribers of one prompt, {args.rounds} round(s)")
    pools = {t.name: Pool(keep_reads=True) for t in bench.targets}
    lags: dict[str, list[float]] = {t.name: [] for t in bench.targets}
    calls: dict[str, list] = {t.name: [] for t in bench.targets}
    for r in range(args.rounds):
        for t in rotation(bench.targets, r):
            seed = args.seed + r
            m = measure(bench, t, load, lambda s=seed: itertools.islice(wl.requests(opts, s), n),
                        label=f"{t.name} r{r + 1}", warmup=Load(concurrency=n, requests=n), seed=seed, keep_reads=True)
            pools[t.name].add(m)
            calls[t.name].append(m.upstream_calls)
            streams = [_event_times(rd) for rd in (m.rec.reads or []) if rd]
            if streams:
                k = min(s.size for s in streams)
                if k:
                    grid = np.stack([s[:k] for s in streams])
                    lags[t.name].extend((grid - grid.min(axis=0)).ravel().tolist())
    targets = {}
    for t in bench.targets:
        s = pools[t.name].summary(t)
        s["upstream_calls_per_round"] = calls[t.name]
        s["chunk_lag_ms"] = report.dist_ms(lags[t.name])
        targets[t.name] = s
    add_ratios(targets)
    ref = targets.get("direct")
    for s in targets.values():
        if ref and ref.get("itl_ms") and s.get("itl_ms"):
            s["vs"]["itl_p99_added_ms_vs_direct"] = round(s["itl_ms"]["p99"] - ref["itl_ms"]["p99"], 3)
            s["vs"]["itl_p50_added_ms_vs_direct"] = round(s["itl_ms"]["p50"] - ref["itl_ms"]["p50"], 3)
        for ref_name in ("passthrough", "floor"):
            if targets.get(ref_name, {}).get("itl_ms") and s.get("itl_ms"):
                s["vs"][f"itl_p99_added_ms_vs_{ref_name}"] = round(
                    s["itl_ms"]["p99"] - targets[ref_name]["itl_ms"]["p99"], 3)
    phase = {"name": "fanout", "load": _load_dict(load), "load_text": f"{n:,} stream subscribers of one prompt",
             "workload": "bursts (streams)", "targets": targets, "nominal_gap_ms": nominal}
    rows = []
    for name, s in targets.items():
        itl, ttft, lag = s.get("itl_ms") or {}, s.get("ttft_ms") or {}, s.get("chunk_lag_ms") or {}
        rows.append([name, s["requests"], ", ".join("-" if c is None else f"{c:,}" for c in calls[name]), s["errors"],
                     ttft.get("p50"), ttft.get("p99"), itl.get("p50"), itl.get("p90"), itl.get("p99"), itl.get("max"),
                     report._signed(s["vs"].get("itl_p99_added_ms_vs_direct")), lag.get("p50"), lag.get("p99")])
    text = report.table(
        ["target", "streams", "upstream calls", "errors", "TTFT p50", "TTFT p99", "ITL p50", "ITL p90", "ITL p99",
         "ITL max", "+ITL p99 vs direct", "chunk lag p50", "chunk lag p99"], rows,
        f"fanout: {n:,} subscribers, {args.rounds} round(s); simulator sends a chunk every "
        f"{nominal:.0f} ms" if nominal else f"fanout: {n:,} subscribers")
    text += report.background_note(targets)
    text += ("\nITL = gap between reads of one stream; chunk lag = a chunk's arrival at a subscriber after its "
             "first arrival at any subscriber (direct: includes the spread of the streams' own start times)")
    checks = []
    herd = targets.get("herd-exact")
    if herd and "itl_p99_added_ms_vs_direct" in herd["vs"]:
        added = herd["vs"]["itl_p99_added_ms_vs_direct"]
        over_pass = herd["vs"].get("itl_p99_added_ms_vs_passthrough")
        checks.append({"name": f"{n:,} stream subscribers: inter-chunk gap", "goal": "herd adds <= 5 ms at p99",
                       "measured": f"{added:+.2f} ms vs direct" + (f", {over_pass:+.2f} ms vs passthrough"
                                                                  if over_pass is not None else ""),
                       "value": added, "met": added <= 5.0})
    floor = targets.get("floor")
    if herd and floor and "itl_p99_added_ms_vs_floor" in herd["vs"]:
        over_floor = herd["vs"]["itl_p99_added_ms_vs_floor"]
        measured = f"ITL p99 {over_floor:+.2f} ms over the floor's {floor['itl_ms']['p99']:.1f} ms"
        if floor["vs"].get("itl_p99_added_ms_vs_direct") is not None:
            measured += f" (the floor: {floor['vs']['itl_p99_added_ms_vs_direct']:+.2f} ms vs direct)"
        checks.append({"name": f"{n:,} stream subscribers: herd over the floor",
                       "goal": "(for reference: what the stack itself costs)", "measured": measured,
                       "value": over_floor, "met": None})
    plots = []
    if not args.no_plots:
        plots.append(report.plot_cdf({name: np.frombuffer(p.rec.itl, dtype=float) for name, p in pools.items()
                                      if len(p.rec.itl)}, out / "fanout_itl_cdf.png",
                                     f"{n:,} stream subscribers: gaps between chunks (nominal {nominal:.0f} ms)"
                                     if nominal else f"{n:,} stream subscribers: gaps between chunks",
                                     xlabel="gap between reads, ms", ylabel="fraction of gaps at or below"))
        plots.append(report.plot_cdf({name: np.asarray(v) for name, v in lags.items() if v},
                                     out / "fanout_chunk_lag_cdf.png",
                                     f"{n:,} stream subscribers: a chunk's arrival after its first arrival",
                                     xlabel="chunk lag, ms", ylabel="fraction of chunk arrivals at or below"))
        plots.append(report.plot_upstream_calls(targets, out / "upstream_calls.png",
                                                f"{n:,} stream subscribers: upstream calls vs client requests"))
    return {"phases": [phase], "checks": checks, "plots": plots, "bench": bench, "text": text}


# --------------------------------------------------------------------------- soak


def run_soak(args: argparse.Namespace, stack: Stack, out: Path) -> dict[str, Any]:
    wl = workloads.get(args.workload)
    opts = _workload_options(args)
    args.targets = "exact"
    if args.herd_url and not args.herd_pid:
        raise SystemExit("herd bench soak: with --herd-url, give --herd-pid so that its memory can be read")
    bench = setup(args, stack, _sim_settings(args, {"ttft_ms": 20.0, "tokens_per_s": 1000.0, "reply_tokens": 20}),
                  cache=not args.no_cache, cache_entries=args.cache_entries)
    target = bench.targets[0]
    proc = target.proc
    if proc is None:
        proc = Proc("herd", [], 0, Path("/dev/null"))
        proc.popen = type("P", (), {"pid": args.herd_pid, "poll": lambda self: None})()
    samples: list[dict[str, float]] = []
    offset = [0, 0.0]  # requests and seconds of the phases before

    def sample(elapsed: float) -> None:
        samples.append({"t": round(offset[1] + elapsed, 3), "phase_t": elapsed, "base": offset[0],
                        "rss_mib": round(proc.rss_bytes() / 2**20, 2)})

    phases = []
    pools = []
    for name, count in (("warm-up", args.warmup_requests), ("measured", args.requests)):
        load = Load(concurrency=args.concurrency, requests=count, duration=args.max_seconds)
        _say(f"\n== soak {name}: {wl.name} workload, {load.describe()}")
        pool = Pool()
        start_n = len(samples)
        seed = args.seed + len(phases)
        m = measure(bench, target, load, lambda s=seed: wl.requests(opts, s),
                    label=f"{target.name} {name}", warmup=None, seed=args.seed, ticks=[sample], procs=args.procs)
        sample(m.rec.elapsed)
        pool.add(m)
        done = np.sort(report.arrays(m.rec)["start"] + report.arrays(m.rec)["latency"])
        for s in samples[start_n:]:
            s["requests"] = int(offset[0] + np.searchsorted(done, s.pop("phase_t"), side="right"))
            s.pop("base")
        offset[0] += len(m.rec)
        offset[1] += m.rec.elapsed
        summary = pool.summary(target)
        phases.append({"name": name, "load": _load_dict(load), "load_text": load.describe(), "workload": wl.name,
                       "targets": {target.name: summary}})
        pools.append(pool)
    measured = [s["rss_mib"] for s in samples if s["requests"] >= args.warmup_requests]
    head = measured[: max(1, len(measured) // 20)]
    tail = measured[-max(1, len(measured) // 20):]
    base = float(np.median(head)) if head else None
    memory = {
        "baseline_mib": base,
        "end_mib": float(np.median(tail)) if tail else None,
        "max_mib": max(measured) if measured else None,
        "min_mib": min(measured) if measured else None,
        "after_warmup_requests": args.warmup_requests,
        "measured_requests": args.requests,
        "samples": samples,
    }
    if base:
        memory["end_growth_pct"] = round((memory["end_mib"] - base) / base * 100, 2)
        memory["peak_growth_pct"] = round((memory["max_mib"] - base) / base * 100, 2)
    tol = args.tolerance
    checks = [{"name": f"memory across {args.requests:,} requests", "goal": f"flat within {tol:g}% after warm-up",
               "measured": (f"peak {memory['peak_growth_pct']:+.1f}%, end {memory['end_growth_pct']:+.1f}% "
                            f"(baseline {base:.1f} MiB, max {memory['max_mib']:.1f} MiB)") if base else "-",
               "value": memory.get("peak_growth_pct"),
               "met": (memory["peak_growth_pct"] <= tol and memory["end_growth_pct"] >= -tol) if base else None}]
    rows = []
    for p in phases:
        s = p["targets"][target.name]
        lat = s.get("latency_ms") or {}
        rows.append([p["name"], s["requests"], s["req_per_s"], s["upstream_calls"], report._share(s["coalesce_ratio"]),
                     s["cache_hits"], s["errors"], lat.get("p50"), lat.get("p99")])
    text = report.table(["phase", "requests", "req/s", "upstream", "merged", "cache", "errors", "p50 ms", "p99 ms"],
                        rows, f"soak: herd-exact, {wl.name} workload, {args.concurrency} connections, cache "
                              f"{'off' if args.no_cache else f'on ({args.cache_entries:,} entries)'}")
    text += report.background_note({p["name"]: p["targets"][target.name] for p in phases})
    text += "\n\n" + report.table(
        ["herd RSS", "baseline MiB", "end MiB", "max MiB", "end growth", "peak growth"],
        [["after warm-up", base, memory["end_mib"], memory["max_mib"],
          f"{memory.get('end_growth_pct', 0):+.1f}%", f"{memory.get('peak_growth_pct', 0):+.1f}%"]])
    plots = []
    if not args.no_plots and samples:
        plots.append(report.plot_rss(samples, args.warmup_requests, out / "soak_rss.png",
                                     f"herd RSS over {args.warmup_requests + args.requests:,} requests "
                                     f"({wl.name} workload)", tol / 100))
        plots.append(report.plot_latency_over_time({f"{target.name} {p['name']}": pool.rec
                                                    for p, pool in zip(phases, pools)},
                                                   out / "latency_over_time.png", "soak: latency over time", bin_s=2.0))
    return {"phases": phases, "checks": checks, "plots": plots, "bench": bench, "text": text, "memory": memory}


# --------------------------------------------------------------------------- CLI

SCENARIOS: dict[str, Callable[[argparse.Namespace, Stack, Path], dict[str, Any]]] = {
    "compare": run_compare, "burst": run_burst, "fanout": run_fanout, "soak": run_soak,
}

# (normal, --quick) defaults per scenario; a flag given on the command line always wins
DEFAULTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "compare": ({"concurrency": 256, "duration": 5.0, "rounds": 2, "warmup": 1.0, "half_load": True,
                 "targets": "direct,passthrough,off,exact"},
                {"concurrency": 64, "duration": 1.5, "rounds": 1, "warmup": 0.3, "half_load": False}),
    "burst": ({"requests": 1000, "rounds": 3, "targets": "direct,passthrough,floor,exact"},
              {"requests": 200, "rounds": 1, "ttft_ms": 500.0}),
    "fanout": ({"subscribers": 500, "rounds": 3, "targets": "direct,passthrough,floor,exact"},
               {"subscribers": 100, "rounds": 1, "reply_tokens": 20}),
    "soak": ({"requests": 200_000, "warmup_requests": 20_000, "concurrency": 64, "targets": "exact"},
             {"requests": 20_000, "warmup_requests": 5_000}),
}


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="where results.json, summary.txt and the PNGs go "
                   "(default: benchmarks/out/<timestamp>/)")
    g.add_argument("--quick", action="store_true", help="a short run (about 10 s) to check that everything works")
    g.add_argument("--seed", type=int, default=1, help="workload seed: the same seed sends the same requests (default 1)")
    g.add_argument("--procs", type=int, default=1, help="load generator processes (default 1)")
    g.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, s (default 120)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each measured run, wait up to S seconds for the CPUs to be idle (other jobs on a "
                        "shared machine skew results; each run records the CPU others used meanwhile)")
    g.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    g.add_argument("--profile", action="store_true", help="sample each herd/passthrough/floor process with py-spy "
                   "during measured runs (pip install py-spy); writes profile_*.txt (collapsed stacks) and a summary. "
                        "py-spy pauses the process for each sample: the numbers of a profiled run are a little worse")
    g.add_argument("--profile-seconds", type=float, default=4.0, metavar="S",
                   help="how long to sample a run bounded by a request count rather than a duration (default 4)")
    t = p.add_argument_group("targets")
    t.add_argument("--targets", help=f"comma-separated, from {', '.join(BUILTIN_TARGETS)} "
                   "(floor: a bare single-flight coalescing proxy; floor-raw: the same without ASGI/uvicorn, "
                   "not run by default; off/exact/semantic: herd in that coalescing mode)")
    t.add_argument("--url", action="append", metavar="NAME=URL",
                   help="also measure another OpenAI-compatible proxy (point its upstream at the simulator "
                        "URL printed at start, or use --sim-url); repeatable")
    t.add_argument("--sim-url", metavar="URL", help="use this upstream instead of starting the simulator "
                   "(upstream calls are read from its /_sim/stats if it is herd's simulator)")
    t.add_argument("--herd-url", metavar="URL", help="use a running herd instead of starting one per mode "
                   "(modes chosen with the x-herd-coalesce header)")
    t.add_argument("--herd-pid", type=int, help="soak with --herd-url: the pid whose memory to sample")
    t.add_argument("--herd-log-level", default="info", help="the herd processes' [server] log_level (default info, "
                   "herd's own default: one JSON access-log line per request)")
    t.add_argument("--herd-option", action="append", metavar="SECTION.KEY=VALUE",
                   help="set any key of the generated herd config, e.g. server.access_log=false or "
                        "coalesce.threshold=0.8; repeatable")
    s = p.add_argument_group("simulated upstream")
    s.add_argument("--ttft-ms", type=float, help="delay before the first chunk (or the JSON body)")
    s.add_argument("--tokens-per-s", type=float, help="chunks per second after the first (0: all at once)")
    s.add_argument("--reply-tokens", type=int, help="answer length in words (tokens)")
    w = p.add_argument_group("workload")
    w.add_argument("--model", default=workloads.DEFAULT_MODEL)
    w.add_argument("--pool", type=int, default=1000, help="prompts in the pool (zipf, stream, tenants; default 1000)")
    w.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent (default 1.1)")
    w.add_argument("--burst", type=int, default=50, help="identical requests per group (bursts; default 50)")
    w.add_argument("--tenants", type=int, default=8, help="tenants (tenants workload; default 8)")
    w.add_argument("--merge-share", type=float, default=0.68, help="trace68: share of duplicate requests (0.68)")
    w.add_argument("--stream-share", type=float, help="share of streaming requests (default: the workload's own)")
    w.add_argument("--max-tokens", type=int, help="max_tokens sent in every request (default: none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herd bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
        epilog="examples:\n"
               "  herd bench --quick                          # about 10 s: every target, tiny load\n"
               "  herd bench compare --workload unique --concurrency 256\n"
               "  herd bench compare --workload zipf --targets direct,passthrough,exact\n"
               "  herd bench compare --workload paraphrase --targets exact,semantic\n"
               "  herd bench burst -n 1000\n"
               "  herd bench fanout -n 500\n"
               "  herd bench soak --requests 200000\n"
               "  herd bench compare --url litellm=http://127.0.0.1:4000   # another proxy, same load\n"
               "  herd bench SCENARIO --help                  # every option of a scenario")
    sub = parser.add_subparsers(dest="scenario", metavar="SCENARIO")

    c = sub.add_parser("compare", help="one workload against every target, side by side (the default)",
                       description="Drive a workload at a fixed concurrency (or rate) against each target in "
                                   "interleaved rounds, then at half of the passthrough's throughput. Prints req/s, "
                                   "ratios to the passthrough and to direct, upstream calls, coalesce ratio, cache "
                                   "hits, errors and latency percentiles.")
    c.add_argument("--workload", default="unique", choices=list(workloads.WORKLOADS),
                   help="what to send (see `herd bench list`; default unique)")
    c.add_argument("-c", "--concurrency", type=int, help="connections, closed loop (default 256; quick 64)")
    c.add_argument("--rate", type=float, help="requests per second, open loop (instead of --concurrency)")
    c.add_argument("-d", "--duration", type=float, help="seconds per target per round (default 5; quick 1.5)")
    c.add_argument("--requests", type=int, help="stop a run after this many requests (default: duration only)")
    c.add_argument("--rounds", type=int, help="interleaved rounds; the target order rotates (default 2; quick 1)")
    c.add_argument("--warmup", type=float, help="unmeasured seconds before each run (default 1; quick 0.3)")
    c.add_argument("--half-load", dest="half_load", action="store_true", default=None,
                   help="also run every target at half the passthrough's req/s (default on; off with --quick)")
    c.add_argument("--no-half-load", dest="half_load", action="store_false")
    c.add_argument("--half-of", metavar="TARGET", help="half load = half of this target's req/s in the throughput "
                   "phase (default: the slowest proxy, so that no target is past half of its capacity; "
                   "e.g. passthrough, herd-exact)")
    c.add_argument("--cache", action="store_true", help="enable herd's answer cache (off by default: it would hide "
                   "the coalescer)")
    _common(c)

    b = sub.add_parser("burst", help="N identical requests at once: upstream calls, follower lag",
                       description="Send N identical requests at the same moment over warm connections. herd should "
                                   "make 1 upstream call and answer the last follower right after the leader; "
                                   "the floor (a bare coalescing proxy) shows the least this stack can do.")
    b.add_argument("-n", "--requests", type=int, help="requests in a burst (default 1000; quick 200)")
    b.add_argument("--rounds", type=int, help="bursts per target, interleaved (default 3; quick 1)")
    _common(b)

    f = sub.add_parser("fanout", help="N stream subscribers of one flight: inter-chunk gaps",
                       description="N clients stream the same prompt at once; the simulator sends a chunk every "
                                   "1/tokens-per-s seconds (default 20/s, 40 words, 200 ms TTFT). Compares the "
                                   "gaps between chunks each client sees through herd, through the floor (a bare "
                                   "coalescing proxy) and directly.")
    f.add_argument("-n", "--subscribers", type=int, help="stream clients (default 500; quick 100)")
    f.add_argument("--rounds", type=int, help="runs per target, interleaved (default 3; quick 1)")
    _common(f)

    s = sub.add_parser("soak", help="herd's memory across many requests after a warm-up",
                       description="Warm herd up, then send many requests of a workload (default trace68, cache on) "
                                   "and sample herd's resident memory; flat means within --tolerance percent.")
    s.add_argument("--workload", default="trace68", choices=list(workloads.WORKLOADS))
    s.add_argument("--requests", type=int, help="measured requests (default 200000; quick 20000)")
    s.add_argument("--warmup-requests", type=int, help="requests before the baseline (default 20000; quick 5000)")
    s.add_argument("-c", "--concurrency", type=int, help="connections (default 64)")
    s.add_argument("--max-seconds", type=float, default=900.0, help="stop a phase after this long (default 900)")
    s.add_argument("--cache-entries", type=int, default=2000, help="herd's cache size (default 2000)")
    s.add_argument("--no-cache", action="store_true", help="turn herd's cache off")
    s.add_argument("--tolerance", type=float, default=10.0, help="allowed growth, %% (default 10)")
    _common(s)

    sub.add_parser("list", help="the workloads")
    return parser


def apply_defaults(args: argparse.Namespace) -> None:
    normal, quick = DEFAULTS[args.scenario]
    for key, value in {**normal, **(quick if args.quick else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.scenario == "soak":
        args.workload = args.workload or "trace68"


def _default_out() -> Path:
    return REPO_ROOT / "benchmarks" / "out" / datetime.now().strftime("%Y%m%d-%H%M%S")


def _list_workloads() -> str:
    rows = [[w.name, f"{w.default_stream_share:.0%}", w.summary] for w in workloads.WORKLOADS.values()]
    return report.table(["workload", "streams", "what"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["compare", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.scenario == "list":
        print(_list_workloads())
        return 0
    apply_defaults(args)
    out = Path(args.out) if args.out else _default_out()
    out.mkdir(parents=True, exist_ok=True)
    args.out_dir = out
    command = "herd bench " + " ".join(shlex.quote(a) for a in argv)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    revision = report.git_revision(REPO_ROOT)  # the code the processes below are started from
    _say(f"{command}\nresults -> {out}")
    try:
        with Stack() as stack:
            result = SCENARIOS[args.scenario](args, stack, out)
            bench: Bench = result.pop("bench")
            if bench.profiles:
                result["profiles"] = bench.profiles
                text_profiles = report.profiles_text(bench.profiles)
            sim_info = {"url": bench.sim_url, "started_here": bench.sim is not None, "settings": bench.sim_settings}
    except KeyboardInterrupt:
        _say("\ninterrupted; every process this run started has been stopped")
        return 130
    except ProcError as e:
        _say(f"herd bench: {e}")
        return 1
    text = result.pop("text")
    if bench.profiles:
        text += "\n\n" + text_profiles
    checks = result.get("checks") or []
    if checks:
        text += "\n\n" + report.checks_table(checks)
    results = {
        "schema": SCHEMA,
        "scenario": args.scenario,
        "command": command,
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - t0, 1),
        "seed": args.seed,
        "machine": report.machine(),
        "git": revision,
        "settings": {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "out_dir")},
        "upstream": sim_info,
        "unavailable": bench.unavailable,
        **result,
        "table": text,
    }
    report.write_json(out / "results.json", results)
    (out / "summary.txt").write_text(command + "\n\n" + text + "\n")
    print()
    print(text)
    print(f"\nwrote {out / 'results.json'}, {out / 'summary.txt'}"
          + (", " + ", ".join(result.get("plots", [])) if result.get("plots") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
