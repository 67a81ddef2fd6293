"""`herd bench compare`: one workload against every target, side by side, then at half load.

The throughput phase (a fixed number of connections) is driven by wrk when it is installed
and the phase sends nothing streamed (the unique workload: benchmarks/wrk.py); the Python
generator drives streams, the other workloads and every fixed-rate phase (--loadgen)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import report, workloads, wrk
from benchmarks.harness import Stack
from benchmarks.loadgen import Load
from benchmarks.measure import (
    Pool,
    add_ratios,
    load_dict,
    measure,
    measure_wrk,
    ok_latency,
    rotation,
    say,
    setup,
    sim_settings_for,
    workload_options,
)


def choose_loadgen(args: argparse.Namespace, wl: workloads.Workload, opts: workloads.Options) -> str:
    """'wrk' or 'python': who drives the throughput phase (--loadgen auto|wrk|python)."""
    choice = getattr(args, "loadgen", "auto") or "auto"
    if choice == "python":
        return "python"
    streams = opts.stream_share if opts.stream_share is not None else wl.default_stream_share
    why_not = ("--rate runs are open loop (the Python generator)" if args.rate else
               "--requests bounds a run by a count (the Python generator)" if args.requests else
               f"wrk sends only the unique workload (not {wl.name})" if wl.name != "unique" else
               "wrk cannot time streams (inter-chunk gaps)" if streams > 0 else
               "wrk is not installed (apt-get install wrk)" if wrk.find_wrk() is None else None)
    if why_not is None:
        return "wrk"
    if choice == "wrk":
        raise SystemExit(f"herd bench: --loadgen wrk: {why_not}")
    if wl.name == "unique" and not args.rate and streams == 0:
        say(f"the Python load generator drives the throughput phase: {why_not}; it saturates before herd does, "
            "so its req/s ratios understate herd's cost")
    return "python"


def cache_default(args: argparse.Namespace) -> bool:
    """herd's answer cache: --cache/--no-cache, else on for the unique workload (herd's default,
    as in proxy.toml; unique prompts never hit it, so it only adds its cost) and off for the
    others (it would answer repeats and hide the coalescer)."""
    return args.cache if args.cache is not None else args.workload == "unique"


def config_text(bench: Any) -> str:
    """One line per herd the bench started: the config keys it wrote (every other key is at
    herd's default, as in proxy.toml: access log on, log_level info, retries 2)."""

    def value(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else str(v)

    lines = []
    for t in bench.targets:
        config = getattr(t.proc, "config", None)
        if t.kind != "herd" or not isinstance(config, dict):
            continue
        keys = [f"{section}.{k}={value(v)}" for section, table in config.items()
                if section not in ("upstreams", "routes") for k, v in table.items()]
        upstream = next(iter(config["upstreams"].values()))
        lines.append(f"  {t.name}: {', '.join(keys)}; one upstream, the simulator "
                     f"(max_connections {upstream.get('max_connections', 'default')})")
    if not lines:
        return ""
    return "\n".join(["herd's config: the keys the bench wrote; every other key at herd's default, as in "
                      "proxy.toml (server.access_log=true, upstream retries 2, ...)", *lines])


def run_compare(args: argparse.Namespace, stack: Stack, out: Path) -> dict[str, Any]:
    wl = workloads.get(args.workload)
    opts = workload_options(args)
    driver = choose_loadgen(args, wl, opts)
    bench = setup(args, stack, sim_settings_for(args, {"ttft_ms": 50.0, "tokens_per_s": 0.0, "reply_tokens": 16,
                                                     **wl.sim}), cache=cache_default(args))
    wrk_exe = wrk.find_wrk() if driver == "wrk" else None
    drivers = {"wrk": f"{wrk.wrk_version(wrk_exe)}, {args.wrk_threads} thread(s)" if wrk_exe else "wrk",
               "python": f"the Python load generator ({args.procs} process(es))"}
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
        by = driver if i == 0 and load.concurrency else "python"
        say(f"\n== {name}: {wl.name} workload, {load.describe()}, {args.rounds} round(s), driven by {drivers[by]}")
        pools = {t.name: Pool() for t in bench.targets}
        for r in range(args.rounds):
            for t in rotation(bench.targets, r):
                seed = args.seed + r
                label = f"{t.name} r{r + 1}"
                if by == "wrk":
                    m = measure_wrk(bench, t, load, opts, label=label, round_no=r + 1, warmup_s=args.warmup,
                                    threads=args.wrk_threads)
                else:
                    warm = Load(concurrency=load.concurrency, duration=args.warmup) if load.concurrency else \
                        Load(rate=load.rate, duration=args.warmup)
                    m = measure(bench, t, load, lambda s=seed: wl.requests(opts, s), label=label,
                                warmup=warm if args.warmup > 0 else None, seed=seed * 7919 + i, procs=args.procs)
                pools[t.name].add(m)
        targets = {t.name: pools[t.name].summary(t) for t in bench.targets}
        add_ratios(targets)
        load_text = load.describe() + (f" (half of {half_of[0]}'s req/s above)" if name == "half load" else "")
        phases.append({"name": name, "load": load_dict(load), "load_text": load_text, "workload": wl.name,
                       "loadgen": by, "loadgen_text": drivers[by], "targets": targets,
                       **({"half_of": half_of[0]} if name == "half load" else {})})
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
        if not args.no_plots and phase["loadgen"] == "python":  # wrk reports no single requests
            plots.append(report.plot_latency_over_time({n: p.rec for n, p in pools.items()},
                                                       out / f"{prefix}latency_over_time.png",
                                                       "Latency over time: " + title))
            plots.append(report.plot_cdf({n: ok_latency(p.rec) for n, p in pools.items()},
                                         out / f"{prefix}latency_cdf.png", "Latency CDF: " + title))
        if not args.no_plots and k == 0:
            plots.append(report.plot_upstream_calls(phase["targets"], out / "upstream_calls.png",
                                                    "Upstream calls vs client requests: " + title))
            itl = {n: np.frombuffer(p.rec.itl, dtype=float) for n, p in pools.items() if len(p.rec.itl)}
            if itl:
                plots.append(report.plot_cdf(itl, out / "itl_cdf.png", "Inter-chunk gaps of streams: " + title,
                                             xlabel="gap between reads, ms", ylabel="fraction of gaps at or below"))
    checks = compare_checks(args, phases)
    herd_configs = config_text(bench)
    return {"phases": phases, "checks": checks, "plots": plots, "bench": bench, "herd_config": herd_configs,
            "text": "\n\n".join(report.compare_tables(p) for p in phases)
                    + (f"\n\n{herd_configs}" if herd_configs else "")}


def compare_checks(args: argparse.Namespace, phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """issue 16's targets for herd-exact on the unique workload, against the passthrough of the
    same interleaved run: req/s at 256 connections, CPU per request, p50 added at half load."""
    checks: list[dict[str, Any]] = []
    if args.workload != "unique":
        return checks
    first = phases[0]
    t = first["targets"]
    by_wrk = first.get("loadgen") == "wrk"
    if "herd-exact" in t and "passthrough" in t and first["load"]["concurrency"]:
        herd, vs, c = t["herd-exact"], t["herd-exact"]["vs"], first["load"]["concurrency"]
        ratio, cpu = vs.get("req_per_s_vs_passthrough"), vs.get("cpu_per_req_vs_passthrough")
        note = "" if by_wrk else " (Python load generator: it saturates first; n/a)"
        checks.append({
            "name": "all-unique, exact: throughput",
            "goal": f">= 0.90x the passthrough's req/s at {c} connections, measured with wrk"
                    + ("" if c == 256 else " (goal: 256)"),
            "measured": f"{ratio:.2f}x{_range(vs.get('req_per_s_vs_passthrough_rounds'))} "
                        f"({herd['req_per_s']:,} vs {t['passthrough']['req_per_s']:,} req/s){note}"
                        if ratio is not None else "-",
            "value": ratio, "met": None if ratio is None or c != 256 or not by_wrk else ratio >= 0.90})
        cpu_ms = herd.get("cpu_ms_per_req", {}).get("target")
        pass_ms = t["passthrough"].get("cpu_ms_per_req", {}).get("target")
        checks.append({
            "name": "all-unique, exact: CPU per request",
            "goal": f"<= 1.2x the passthrough's CPU per request ({c} connections)",
            "measured": f"{cpu:.2f}x{_range(vs.get('cpu_per_req_vs_passthrough_rounds'))} "
                        f"({cpu_ms:.3f} vs {pass_ms:.3f} ms)" if cpu is not None else "-",
            "value": cpu, "met": None if cpu is None else cpu <= 1.2})
    half = next((p for p in phases if p["name"] == "half load"), None)
    if half and "herd-exact" in half["targets"]:
        vs = half["targets"]["herd-exact"]["vs"]
        ref = "passthrough" if "passthrough" in half["targets"] else "direct"
        added = vs.get(f"p50_added_ms_vs_{ref}")
        other = vs.get("p50_added_ms_vs_direct") if ref == "passthrough" else None
        checks.append({
            "name": "all-unique, exact: added latency",
            "goal": f"p50 <= 1 ms over the {ref}'s at half load "
                    f"({half['load']['rate']:g} req/s = half of {half['half_of']})",
            "measured": (f"{added:+.2f} ms vs {ref}" + (f", {other:+.2f} ms vs direct" if other is not None else ""))
            if added is not None else "-",
            "value": added, "met": None if added is None else added <= 1.0})
    return checks


def _range(values: list[float | None] | None) -> str:
    """' (rounds 0.81-0.90)': the spread of a ratio over the interleaved rounds."""
    v = [x for x in values or [] if x is not None]
    return f" (rounds {min(v):.2f}-{max(v):.2f})" if len(v) > 1 else ""
