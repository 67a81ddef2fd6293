"""`herd bench burst`: N identical requests at once; upstream calls, and how long after the
leader's answer the last follower gets its own."""

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
    LEADER_KINDS,
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


def run_burst(args: argparse.Namespace, stack: Stack, out: Path) -> dict[str, Any]:
    n = args.requests
    opts = replace(workload_options(args), burst=n, stream_share=args.stream_share or 0.0)
    bench = setup(args, stack, sim_settings_for(args, {"ttft_ms": 1000.0, "tokens_per_s": 0.0, "reply_tokens": 16}))
    wl = workloads.get("bursts")
    load = Load(concurrency=n, requests=n)
    say(f"\n== burst: {n:,} identical requests at once, {args.rounds} round(s)")
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
    phase = {"name": "burst", "load": load_dict(load), "load_text": f"{n:,} identical requests at once",
             "workload": "bursts", "targets": targets}
    rows = []
    for name, s in targets.items():
        lag = s["follower_after_leader_ms"] or s["after_first_answer_ms"] or {}
        calls = ", ".join("-" if c is None else f"{c:,}" for c in s["upstream_calls_per_burst"])
        rows.append([name, s["requests"], calls,
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
        plots.append(report.plot_cdf({name: ok_latency(p.rec) for name, p in pools.items()}, out / "latency_cdf.png",
                                     f"Burst of {n:,}: client latency CDF"))
        plots.append(report.plot_upstream_calls(targets, out / "upstream_calls.png",
                                                f"Burst of {n:,}: upstream calls vs client requests "
                                                f"({args.rounds} rounds)"))
    return {"phases": [phase], "checks": checks, "plots": plots, "bench": bench, "text": text}
