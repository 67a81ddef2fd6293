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

from benchmarks import loadgen, report, workloads
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
            say(f"  (the machine is still busy: {busy:.2f} cores in use by other processes; measuring anyway)")

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
        self.rounds.append({"requests": len(m.rec),
                            "req_per_s": round(ok / m.rec.elapsed, 1) if m.rec.elapsed else None,
                            "upstream_calls": m.upstream_calls, "background_cores": m.background_cores})
        self.calls = None if self.calls is None or m.upstream_calls is None else self.calls + m.upstream_calls
        self.max_active = max(self.max_active, m.upstream_max_active or 0)
        self.cpu_target = (None if self.cpu_target is None or m.cpu_target_s is None
                           else self.cpu_target + m.cpu_target_s)
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
