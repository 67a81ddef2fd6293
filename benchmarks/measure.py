"""What every `herd bench` scenario shares: the targets it starts or is given, one measured
run of a load against a target (with the upstream's and herd's counters read around it),
and a target's measurements pooled over the rounds of a phase."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import loadgen, report, workloads, wrk
from benchmarks.harness import Proc, ProcError, Stack, chat_calls, sim_reset, sim_stats
from benchmarks.loadgen import Load, Phase, Records
from benchmarks.procs import (
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


def parse_targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        if n not in BUILTIN_TARGETS:
            raise SystemExit(f"herd bench: unknown target {n!r}; choose from {', '.join(BUILTIN_TARGETS)} "
                             "(other proxies: --url NAME=URL)")
    return names


def setup(args: argparse.Namespace, stack: Stack, sim_settings: dict[str, Any], *, cache: bool = False,
          cache_entries: int = 10_000, anthropic: bool = False) -> Bench:
    names = parse_targets(args.targets)
    sim: Proc | None = None
    if args.sim_url:
        sim_url = args.sim_url.rstrip("/").removesuffix("/v1")
        say(f"upstream: {sim_url} (given)")
    else:
        sim = stack.simulator(**sim_settings)
        sim_url = sim.url
        say(f"upstream: simulator at {sim_url} ({settings_text(sim_settings)})")
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
                               overrides=args.herd_option or (), anthropic=anthropic)
                targets.append(Target(f"herd-{name}", "herd", p.url, p))
        except ProcError as e:
            if name != "semantic":
                raise
            first = str(e).strip().splitlines()[-1] if str(e).strip() else "did not start"
            unavailable[f"herd-{name}"] = first
            say(f"herd-{name} is unavailable and left out: {first}")
    for spec in args.url or []:
        label, sep, url = spec.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            raise SystemExit(f"herd bench: --url takes NAME=URL, got {spec!r}")
        targets.append(Target(label, "external", url.rstrip("/").removesuffix("/v1")))
    for t in targets:
        say(f"target {t.name:<16} {t.url}")
    return Bench(args, stack, sim_url, sim, sim_settings, targets, unavailable, out=args.out_dir)


def settings_text(s: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items())


def say(msg: str) -> None:
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
    by_wrk: wrk.WrkResult | None = None  # the run was driven by wrk: its totals (rec holds no requests)


class Around:
    """The counters read around one measured run of `target`: the simulator's calls, herd's
    /metrics, the CPU time of the target and of the simulator, and the CPU that processes
    outside this benchmark used meanwhile. `before()` right before the measured load (after
    the warm-up), `after()` right after it."""

    def __init__(self, bench: Bench, target: Target, label: str, profile_seconds: float) -> None:
        self.bench, self.target = bench, target
        self.label_slug = label.replace(" ", "_")
        self.profile_seconds = profile_seconds
        self.snap: dict[str, Any] = {}
        if bench.args.wait_quiet > 0:
            busy = wait_for_quiet(bench.args.wait_quiet)
            if busy > 0.25:
                say(f"  (the machine is still busy: {busy:.2f} cores in use by other processes; measuring anyway)")

    def _own_cpu(self) -> float:
        return sum(p.cpu_seconds() for p in self.bench.stack.procs) + self_cpu_seconds()

    def upstream_calls(self) -> int | None:
        return chat_calls(self.bench.sim_url) if self.bench.has_sim else None

    def before(self) -> None:
        bench, target, snap = self.bench, self.target, self.snap
        snap["busy"] = (machine_busy_seconds(), self._own_cpu(), time.monotonic())
        if bench.args.profile and target.proc is not None:
            snap["spy"] = start_profiler(target.proc.pid, self.profile_seconds,
                                         bench.out / f"profile_{self.label_slug}.txt")
        if bench.has_sim:
            sim_reset(bench.sim_url)
        snap["metrics"] = prometheus(target.url) if target.kind == "herd" else None
        snap["cpu_target"] = target.proc.cpu_seconds() if target.proc else None
        snap["cpu_sim"] = bench.sim.cpu_seconds() if bench.sim else None

    def after(self, rec: Records, requests: int) -> Measured:
        """`requests`: how many the load generator sent (for a target that is the upstream).
        A load generator in a child process (wrk) counts as ours once it was waited for."""
        bench, target, snap = self.bench, self.target, self.snap
        cpu_t = target.proc.cpu_seconds() - snap["cpu_target"] if target.proc else None
        cpu_s = bench.sim.cpu_seconds() - snap["cpu_sim"] if bench.sim else None
        busy0, own0, t0 = snap["busy"]
        other = max(0.0, (machine_busy_seconds() - busy0) - (self._own_cpu() - own0))
        background = round(other / max(time.monotonic() - t0, 1e-9), 3)
        if snap.get("spy") is not None:
            bench.profiles[self.label_slug] = finish_profiler(snap["spy"])
        stats = sim_stats(bench.sim_url, log=False) if bench.has_sim else None
        calls = self.upstream_calls()
        metrics_after = prometheus(target.url) if target.kind == "herd" else None
        diff = None
        if snap.get("metrics") is not None and metrics_after is not None:
            diff = {k: v - snap["metrics"].get(k, 0.0) for k, v in metrics_after.items()}
            if calls is None:  # not a simulator: herd's own count of upstream calls
                calls = int(sum(v for k, v in diff.items() if k.startswith("herd_upstream_calls_total")))
        if calls is None and target.kind == "direct":
            calls = requests
        return Measured(rec, calls, stats.get("max_active") if stats else None, cpu_t, cpu_s, diff, background)


def measure(bench: Bench, target: Target, load: Load, requests: Callable[[], Iterator[Request]], *, label: str,
            warmup: Load | None, seed: int, keep_reads: bool = False, ticks: Sequence[Callable] = (),
            procs: int = 1) -> Measured:
    """Warm `target` up, zero the counters, run `load` with `requests`, read the counters."""

    def factory(make: Callable[[], Iterator[Request]]) -> Callable[[int, int], Iterator[Request]]:
        def build(k: int, n: int) -> Iterator[Request]:
            it = with_headers(make(), target.headers)
            return it if n == 1 else itertools.islice(it, k, None, n)

        return build

    warm_opts = Options(model=bench.args.model, max_tokens=1)
    warm_factory = factory(lambda: workloads.warmup_requests(warm_opts, seed))
    around = Around(bench, target, label, load.duration or bench.args.profile_seconds)
    rec = loadgen.run(Phase(
        url=target.url, requests=factory(requests), load=load, warmup=warmup, warmup_requests=warm_factory,
        before_measure=around.before, ticks=list(ticks), label=label, upstream_calls=around.upstream_calls,
        progress=not bench.args.no_progress, timeout=bench.args.timeout, keep_reads=keep_reads, seed=seed,
        procs=procs))
    return around.after(rec, len(rec))


def measure_wrk(bench: Bench, target: Target, load: Load, opts: Options, *, label: str, round_no: int,
                warmup_s: float, threads: int = 1) -> Measured:
    """The same as `measure` for a closed-loop `load` of the unique workload, driven by wrk:
    a warm-up run, then the measured one, each with a nonce of its own (benchmarks/wrk.py)."""
    assert load.concurrency is not None and load.duration is not None
    headers = {**workloads.tenant_headers(1, bench.args.seed)[0], **target.headers}  # as the Python generator

    def run(seconds: float, nonce: str) -> wrk.WrkResult:
        return wrk.run_wrk(wrk.Run(target.url, load.concurrency or 1, seconds, headers, opts.model, nonce,
                                   max_tokens=opts.max_tokens, threads=threads, timeout_s=bench.args.timeout),
                           bench.stack.dir)

    around = Around(bench, target, label, load.duration)
    if warmup_s > 0:
        run(warmup_s, wrk.nonce_for(f"{target.name}warm", round_no))
    around.before()
    result = run(load.duration, wrk.nonce_for(target.name, round_no))
    rec = Records()
    rec.elapsed = result.duration_s
    m = around.after(rec, result.requests)
    m.by_wrk = result
    result.check(label)
    lat = result.latency_ms
    calls = "" if m.upstream_calls is None else f"  upstream calls {m.upstream_calls:,}"
    say(f"  {label:<24} wrk  {result.requests:,} requests  {result.ok / result.duration_s:,.0f} req/s  "
        f"p50 {lat.get('p50', float('nan')):,.1f} ms  p99 {lat.get('p99', float('nan')):,.1f} ms  "
        f"errors {result.errors:,}{calls}")
    return m


def rotation(targets: Sequence[Target], r: int) -> list[Target]:
    k = r % len(targets) if targets else 0
    return list(targets[k:]) + list(targets[:k])


class Pool:
    """One target's measurements over the rounds of a phase (driven by the Python load
    generator, whose records are pooled, or by wrk, whose totals are)."""

    def __init__(self, keep_reads: bool = False) -> None:
        self.rec = Records(keep_reads)
        self.elapsed = 0.0
        self.rounds: list[dict[str, Any]] = []
        self.wrk_runs: list[wrk.WrkResult] = []
        self.calls: int | None = 0
        self.max_active = 0
        self.cpu_target: float | None = 0.0
        self.cpu_sim: float | None = 0.0
        self.metrics: dict[str, float] | None = None

    def add(self, m: Measured) -> None:
        if m.by_wrk is not None:
            self.wrk_runs.append(m.by_wrk)
            requests, ok = m.by_wrk.requests, m.by_wrk.ok
        else:
            self.rec.extend(m.rec)
            requests, ok = len(m.rec), sum(1 for s in m.rec.status if s == 200)
        self.elapsed += m.rec.elapsed
        self.rec.elapsed = self.elapsed
        self.rounds.append({"requests": requests,
                            "req_per_s": round(ok / m.rec.elapsed, 1) if m.rec.elapsed else None,
                            "cpu_ms_per_req": round(m.cpu_target_s / requests * 1000.0, 4)
                            if m.cpu_target_s is not None and requests else None,
                            "upstream_calls": m.upstream_calls, "background_cores": m.background_cores})
        self.calls = None if self.calls is None or m.upstream_calls is None else self.calls + m.upstream_calls
        self.max_active = max(self.max_active, m.upstream_max_active or 0)
        self.cpu_target = (None if self.cpu_target is None or m.cpu_target_s is None
                           else self.cpu_target + m.cpu_target_s)
        self.cpu_sim = None if self.cpu_sim is None or m.cpu_sim_s is None else self.cpu_sim + m.cpu_sim_s
        if m.metrics_diff is not None:
            self.metrics = {k: (self.metrics or {}).get(k, 0.0) + v for k, v in m.metrics_diff.items()}

    def _wrk_summary(self) -> dict[str, Any]:
        """What report.summarize gives for records, from wrk's totals. A latency percentile is
        the median over the rounds of each round's percentile (wrk reports no single requests)."""
        runs = self.wrk_runs
        requests = sum(r.requests for r in runs)
        ok = sum(r.ok for r in runs)
        kinds: dict[str, int] = {}
        for r in runs:
            for k, v in {"http 4xx/5xx": r.non_2xx, **r.socket_errors}.items():
                if v:
                    kinds[k] = kinds.get(k, 0) + v
        keys = sorted({k for r in runs for k in r.latency_ms}, key=lambda k: (k[0] != "p", k))
        latency = {k: round(float(np.max([r.latency_ms[k] for r in runs if k in r.latency_ms])) if k == "max"
                            else float(np.median([r.latency_ms[k] for r in runs if k in r.latency_ms])), 3)
                   for k in keys}
        return {
            "requests": requests, "ok": ok, "errors": sum(r.errors for r in runs), "error_kinds": kinds,
            "streams": 0, "duration_s": round(self.elapsed, 3),
            "req_per_s": round(ok / self.elapsed, 1) if self.elapsed > 0 else None,
            "roles": {}, "cache_hits": None, "latency_ms": latency or None,
            "latency_ms_rounds": [r.latency_ms for r in runs], "ttft_ms": None, "itl_ms": None,
            "loadgen_cpu_ms_per_req": round(sum(r.cpu_s for r in runs) / requests * 1000.0, 4) if requests else None,
            "wrk_command": runs[0].command if runs else None,
        }

    def summary(self, target: Target) -> dict[str, Any]:
        s = self._wrk_summary() if self.wrk_runs else report.summarize(self.rec)
        n = s["requests"]
        s = {"kind": target.kind, "url": target.url, **s}
        s["req_per_s_rounds"] = [r["req_per_s"] for r in self.rounds]
        s["cpu_ms_per_req_rounds"] = [r["cpu_ms_per_req"] for r in self.rounds]
        s["background_cores_rounds"] = [r["background_cores"] for r in self.rounds]
        s["upstream_calls"] = self.calls
        s["upstream_max_active"] = self.max_active or None
        # wrk does not count the requests still in flight when it stops; the upstream does
        s["coalesce_ratio"] = (round(max(0.0, 1.0 - self.calls / n) if self.wrk_runs else 1.0 - self.calls / n, 4)
                               if self.calls is not None and n else None)
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


def _ratios(a: list[Any] | None, b: list[Any] | None) -> list[float | None] | None:
    """Round-by-round ratios a[r] / b[r] (the two ran next to each other in round r)."""
    if not a or not b or len(a) != len(b):
        return None
    return [round(x / y, 4) if x is not None and y else None for x, y in zip(a, b)]


def add_ratios(targets: dict[str, dict[str, Any]]) -> None:
    """Each target's throughput, CPU per request and latency relative to direct and to the passthrough."""
    direct, passthrough = targets.get("direct"), targets.get("passthrough")

    def p(t: dict | None, key: str) -> float | None:
        return None if not t or not t.get("latency_ms") else t["latency_ms"].get(key)

    for t in targets.values():
        vs: dict[str, Any] = {}
        for ref_name, ref in (("passthrough", passthrough), ("direct", direct)):
            if ref and ref.get("req_per_s") and t.get("req_per_s") is not None:
                vs[f"req_per_s_vs_{ref_name}"] = round(t["req_per_s"] / ref["req_per_s"], 4)
                vs[f"req_per_s_vs_{ref_name}_rounds"] = _ratios(t.get("req_per_s_rounds"),
                                                                ref.get("req_per_s_rounds"))
            for q in ("p50", "p99"):
                a, b = p(t, q), p(ref, q)
                if a is not None and b is not None:
                    vs[f"{q}_added_ms_vs_{ref_name}"] = round(a - b, 3)
        mine, theirs = (t.get("cpu_ms_per_req") or {}).get("target"), \
            ((passthrough or {}).get("cpu_ms_per_req") or {}).get("target")
        if mine is not None and theirs:
            vs["cpu_per_req_vs_passthrough"] = round(mine / theirs, 4)
            vs["cpu_per_req_vs_passthrough_rounds"] = _ratios(t.get("cpu_ms_per_req_rounds"),
                                                              passthrough.get("cpu_ms_per_req_rounds"))
        t["vs"] = vs


def workload_options(args: argparse.Namespace) -> Options:
    return Options(model=args.model, pool=args.pool, zipf_s=args.zipf_s, burst=args.burst, tenants=args.tenants,
                   merge_share=args.merge_share, stream_share=args.stream_share, max_tokens=args.max_tokens)


def sim_settings_for(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for key in ("ttft_ms", "tokens_per_s", "reply_tokens"):
        v = getattr(args, key, None)
        if v is not None:
            out[key] = v
    return out

def ok_latency(rec: Records) -> np.ndarray:
    a = report.arrays(rec)
    return a["latency"][a["status"] == 200]


def load_dict(load: Load) -> dict[str, Any]:
    return {"concurrency": load.concurrency, "rate": load.rate, "duration_s": load.duration,
            "requests": load.requests, "poisson": load.poisson if load.rate else None}
