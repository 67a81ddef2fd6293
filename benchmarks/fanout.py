"""`herd bench fanout`: N stream subscribers of one flight; the gaps between chunks herd adds."""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace
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
    rotation,
    say,
    setup,
    sim_settings_for,
    workload_options,
)


def event_times(reads: list[tuple[float, int]]) -> np.ndarray:
    """The arrival time of each SSE event of one stream (events of one read share its time)."""
    return np.repeat(np.array([t for t, _ in reads], dtype=float), [k for _, k in reads])


def run_fanout(args: argparse.Namespace, stack: Stack, out: Path) -> dict[str, Any]:
    n = args.subscribers
    opts = replace(workload_options(args), burst=n, stream_share=1.0)
    settings = sim_settings_for(args, {"ttft_ms": 200.0, "tokens_per_s": 20.0, "reply_tokens": 40})
    bench = setup(args, stack, settings)
    wl = workloads.get("bursts")
    load = Load(concurrency=n, requests=n)
    nominal = 1000.0 / settings["tokens_per_s"] if settings["tokens_per_s"] else None
    say(f"\n== fanout: {n:,} stream subscribers of one prompt, {args.rounds} round(s)")
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
            streams = [event_times(rd) for rd in (m.rec.reads or []) if rd]
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
    phase = {"name": "fanout", "load": load_dict(load), "load_text": f"{n:,} stream subscribers of one prompt",
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
