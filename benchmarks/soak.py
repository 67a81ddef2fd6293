"""`herd bench soak`: herd's resident memory sampled across many requests after a warm-up."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import report, workloads
from benchmarks.harness import Proc, Stack
from benchmarks.loadgen import Load
from benchmarks.measure import (
    Pool,
    load_dict,
    measure,
    say,
    setup,
    sim_settings_for,
    workload_options,
)


def run_soak(args: argparse.Namespace, stack: Stack, out: Path) -> dict[str, Any]:
    wl = workloads.get(args.workload)
    opts = workload_options(args)
    args.targets = "exact"
    if args.herd_url and not args.herd_pid:
        raise SystemExit("herd bench soak: with --herd-url, give --herd-pid so that its memory can be read")
    bench = setup(args, stack, sim_settings_for(args, {"ttft_ms": 20.0, "tokens_per_s": 1000.0, "reply_tokens": 20}),
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
        say(f"\n== soak {name}: {wl.name} workload, {load.describe()}")
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
        phases.append({"name": name, "load": load_dict(load), "load_text": load.describe(), "workload": wl.name,
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
