"""`herd bench compare`: one workload against every target, side by side, then at half load."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import report, workloads
from benchmarks.harness import Stack
from benchmarks.loadgen import Load
from benchmarks.measure import (
    Pool,
    add_ratios,
    load_dict,
    measure,
    ok_latency,
    rotation,
    say,
    setup,
    sim_settings_for,
    workload_options,
)


def run_compare(args: argparse.Namespace, stack: Stack, out: Path) -> dict[str, Any]:
    wl = workloads.get(args.workload)
    opts = workload_options(args)
    bench = setup(args, stack, sim_settings_for(args, {"ttft_ms": 50.0, "tokens_per_s": 0.0, "reply_tokens": 16,
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
        say(f"\n== {name}: {wl.name} workload, {load.describe()}, {args.rounds} round(s)")
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
        phases.append({"name": name, "load": load_dict(load), "load_text": load_text, "workload": wl.name,
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
                                                       out / f"{prefix}latency_over_time.png",
                                                       "Latency over time: " + title))
            plots.append(report.plot_cdf({n: ok_latency(p.rec) for n, p in pools.items()},
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
            "measured": f"{ratio * 100:.1f}% ({t['herd-exact']['req_per_s']:,} vs "
                        f"{t['passthrough']['req_per_s']:,} req/s)" if ratio is not None else "-",
            "value": ratio, "met": None if ratio is None or c != 256 else ratio >= 0.90})
    half = next((p for p in phases if p["name"] == "half load"), None)
    if half and "herd-exact" in half["targets"]:
        vs = half["targets"]["herd-exact"]["vs"]
        added = vs.get("p50_added_ms_vs_direct")
        over_pass = vs.get("p50_added_ms_vs_passthrough")
        checks.append({
            "name": "all-unique, exact: added latency",
            "goal": f"p50 added <= 1 ms at half load ({half['load']['rate']:g} req/s = half of {half['half_of']})",
            "measured": (f"{added:+.2f} ms vs direct"
                         + (f", {over_pass:+.2f} ms vs passthrough" if over_pass is not None else ""))
            if added is not None else "-",
            "value": added, "met": None if added is None else added <= 1.0})
    return checks
