"""`herd bench workers`: herd with 1, 2, ... worker processes ([server] workers), side by side.

For each target (a worker count, node-shared flights or Redis-shared), in interleaved rounds:

  throughput  wrk -t1 -c256, every body unique (benchmarks/wrk.py), against the simulator
              answering in 50 ms: req/s, latency, and CPU per request of herd (the supervisor
              and every worker), the simulator, wrk and Redis, from the kernel's accounting
  burst       1,000 identical requests at once (every other one streamed), the simulator
              answering in 1 s: upstream calls per burst, every answer checked

On a machine with fewer cores than herd, the simulator and wrk need together, N workers
cannot show N times the req/s; what carries to a bigger node is herd's CPU per request at
each worker count (a worker's share of a core serves 1 / that). `efficiency` is one
worker's CPU per request over N workers' (1.0: adding workers costs nothing per request);
the projection multiplies it out for 8 workers on 8 cores of their own, and says how many
cores the simulator and wrk would need beside them.

    herd bench workers          # 1, 2, 8 workers; Redis-shared 1 and 2; 2 sharing nothing
    herd bench workers --workers 1,2 --redis-workers '' --unshared-workers '' --rounds 1 --duration 4
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import report, wrk
from benchmarks.harness import (
    Herd,
    RedisServer,
    Stack,
    chat_calls,
    herd_config,
    results_dir,
    sim_settings,
    stat_cpu_seconds,
)
from benchmarks.procs import prometheus, wait_for_quiet
from benchmarks.workloads import tenant_headers

MODEL = "gpt-4o-mini"


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def tree_cpu(pid: int) -> dict[int, float]:
    """User + system CPU of a process and each of its live descendants (herd's supervisor and workers)."""
    return {p: stat_cpu_seconds(f"/proc/{p}/stat") for p in _tree(pid)}


def settle(sim_url: str, quiet_s: float = 0.5, timeout: float = 30.0) -> None:
    """Until the simulator has had no new call for `quiet_s` (the tail of the previous run)."""
    end = time.monotonic() + timeout
    last = chat_calls(sim_url)
    while time.monotonic() < end:
        time.sleep(quiet_s)
        now = chat_calls(sim_url)
        if now == last:
            return
        last = now


def claim_cost_us(n: int = 50_000) -> float:
    """Microseconds one unique request spends on the node's claims table (claim, then release)."""
    import tempfile

    from proxy.node import ClaimTable, create_table

    with tempfile.TemporaryDirectory() as d:
        create_table(d)
        table = ClaimTable(d, 0)
        keys = [f"{i:064x}" for i in range(n)]
        started = time.perf_counter()
        for key in keys:
            table.claim(key, "0123456789abcdef")
            table.release(key, "0123456789abcdef")
        spent = time.perf_counter() - started
        table.close()
    return spent / n * 1e6


class Target:
    def __init__(self, name: str, workers: int, redis_url: str | None, herd: Herd, unshared: bool = False) -> None:
        self.name = name
        self.workers = workers
        self.redis_url = redis_url
        self.unshared = unshared
        self.herd = herd
        self.runs: list[dict[str, Any]] = []
        self.bursts: list[dict[str, Any]] = []


def _config(sim_url: str, workers: int, redis_url: str | None, unshared: bool = False) -> dict[str, Any]:
    """`unshared`: workers that share nothing ([server] workers_share = false): what N
    processes cost without the claims."""
    data = herd_config(sim_url, "exact", cache=True)  # proxy.toml's defaults: cache on, access log on
    data["server"]["workers"] = workers
    data["server"]["workers_share"] = not unshared
    if redis_url:
        data["redis"] = {"url": redis_url}
        data["auth"]["hash_key"] = "bench-node-secret"
    return data


def _wait_workers(herd: Herd, n: int, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = prometheus(herd.url) or {}
        if n == 1 or m.get("herd_workers", 0) >= n:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{herd.name}: {n} workers never all came up")


def throughput(target: Target, sim, redis: RedisServer | None, args: argparse.Namespace, workdir: Path,
               round_no: int) -> dict[str, Any]:
    headers = tenant_headers(1, 0)[0]

    def run(seconds: float, nonce: str) -> wrk.WrkResult:
        return wrk.run_wrk(wrk.Run(target.herd.url, args.connections, seconds, headers, MODEL, nonce),
                           workdir)

    run(args.warmup, wrk.nonce_for(target.name + "warm", round_no))
    settle(sim.url)
    wait_for_quiet(args.quiet_wait)
    herd0, sim0 = tree_cpu(target.herd.pid), sim.cpu_seconds()
    redis_pid = redis.proc.pid if redis is not None and redis.proc is not None and target.redis_url else None
    redis0 = stat_cpu_seconds(f"/proc/{redis_pid}/stat") if redis_pid else 0.0
    calls0 = chat_calls(sim.url)
    result = run(args.duration, wrk.nonce_for(target.name, round_no))
    herd1, sim_s = tree_cpu(target.herd.pid), sim.cpu_seconds() - sim0
    per_process = sorted((herd1[p] - herd0.get(p, 0.0) for p in herd1), reverse=True)
    herd_s = sum(per_process)
    busiest = per_process[:target.workers]  # the workers (the supervisor idles)
    redis_s = stat_cpu_seconds(f"/proc/{redis_pid}/stat") - redis0 if redis_pid else 0.0
    calls = chat_calls(sim.url) - calls0
    result.check(target.name)
    n = max(1, result.ok)
    out = {
        "round": round_no, "requests": result.requests, "ok": result.ok, "errors": result.errors,
        "duration_s": result.duration_s, "req_per_s": result.ok / result.duration_s,
        "latency_ms": result.latency_ms, "upstream_calls": calls,
        "cpu_ms_per_request": {"herd": herd_s * 1000 / n, "simulator": sim_s * 1000 / n,
                               "wrk": result.cpu_s * 1000 / n, "redis": redis_s * 1000 / n},
        "herd_cores": herd_s / result.duration_s,
        # the least busy worker's CPU over the busiest's: how evenly the one socket spreads connections
        "worker_balance": busiest[-1] / busiest[0] if busiest and busiest[0] > 0 else None,
        "command": result.command,
    }
    print(f"  {target.name:<12} round {round_no}: {out['req_per_s']:,.0f} req/s, herd "
          f"{out['cpu_ms_per_request']['herd']:.3f} ms CPU/req ({out['herd_cores']:.2f} cores), "
          f"p50 {result.latency_ms.get('p50', 0):.1f} ms", file=sys.stderr)
    return out


async def _burst(url: str, n: int, prompt: str) -> dict[str, Any]:
    headers = tenant_headers(1, 0)[0]
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                     timeout=timeout, headers=headers) as session:
        async def one(i: int) -> tuple[int, str, str, bool]:
            stream = bool(i % 2)
            async with session.post(url + "/v1/chat/completions", json={**body, "stream": stream}) as r:
                raw = await r.read()
                whole = raw.rstrip().endswith(b"[DONE]") if stream else raw.startswith(b"{")
                return r.status, r.headers.get("x-herd", ""), r.headers.get("x-herd-flight", ""), whole

        started = time.perf_counter()
        results = await asyncio.gather(*[one(i) for i in range(n)], return_exceptions=True)
        wall = time.perf_counter() - started
    answered = [r for r in results if isinstance(r, tuple)]
    return {
        "requests": n, "ok": sum(1 for r in answered if r[0] == 200 and r[3]),
        "failed": n - len(answered) + sum(1 for r in answered if r[0] != 200 or not r[3]),
        "roles": dict(collections.Counter(r[1] for r in answered)),
        "flights": len({r[2] for r in answered}), "wall_s": wall,
    }


def burst(target: Target, sim, args: argparse.Namespace, round_no: int, ttft_ms: float) -> dict[str, Any]:
    settle(sim.url)
    sim_settings(sim.url, ttft_ms=ttft_ms)
    try:
        calls0 = chat_calls(sim.url)
        out = asyncio.run(_burst(target.herd.url, args.burst, f"burst {target.name} {round_no} {uuid.uuid4()}"))
        out["upstream_calls"] = chat_calls(sim.url) - calls0
    finally:
        sim_settings(sim.url, ttft_ms=args.ttft_ms)
    out["round"] = round_no
    out["ttft_ms"] = ttft_ms
    print(f"  {target.name:<12} burst {round_no} ({ttft_ms:g} ms): {args.burst:,} identical -> "
          f"{out['upstream_calls']} upstream "
          f"call(s), {out['ok']:,} whole answers, {out['wall_s']:.1f} s", file=sys.stderr)
    return out


def summarize(targets: list[Target]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    base = next((t for t in targets if t.workers == 1 and not t.redis_url), None)
    base_ms = statistics.median(r["cpu_ms_per_request"]["herd"] for r in base.runs) if base and base.runs else None
    base_rps = statistics.median(r["req_per_s"] for r in base.runs) if base and base.runs else None
    for t in targets:
        if not t.runs:
            continue
        med = {k: statistics.median(r["cpu_ms_per_request"][k] for r in t.runs)
               for k in ("herd", "simulator", "wrk", "redis")}
        rps = statistics.median(r["req_per_s"] for r in t.runs)
        rows[t.name] = {
            "workers": t.workers,
            "shared_by": "nothing" if t.unshared else "redis" if t.redis_url else ("node" if t.workers > 1 else "-"),
            "req_per_s": rps, "req_per_s_vs_1": rps / base_rps if base_rps else None,
            "p50_ms": statistics.median(r["latency_ms"].get("p50", 0) for r in t.runs),
            "p99_ms": statistics.median(r["latency_ms"].get("p99", 0) for r in t.runs),
            "cpu_ms_per_request": med,
            "herd_cores": statistics.median(r["herd_cores"] for r in t.runs),
            "worker_balance": statistics.median(r["worker_balance"] or 0 for r in t.runs) if t.workers > 1 else None,
            "efficiency": base_ms / med["herd"] if base_ms else None,
            "burst_calls": {f"{ttft:g} ms": [b["upstream_calls"] for b in t.bursts if b["ttft_ms"] == ttft]
                            for ttft in sorted({b["ttft_ms"] for b in t.bursts}, reverse=True)},
            "burst_failed": sum(b["failed"] for b in t.bursts),
        }
    return rows


def projection(rows: dict[str, dict[str, Any]], workers: int = 8, per_core_ceiling: float | None = None
               ) -> dict[str, Any] | None:
    """N workers on a node with a core for each: what the measured CPU per request predicts."""
    one = next((r for r in rows.values() if r["workers"] == 1 and r["shared_by"] == "-"), None)
    # the most workers that still had a core each here: more are measured too, but time-share the cores
    cores = os.cpu_count() or 1
    many = max((r for r in rows.values() if r["shared_by"] == "node" and r["workers"] <= cores),
               key=lambda r: r["workers"], default=None)
    if one is None or many is None:
        return None
    herd_1, herd_n = one["cpu_ms_per_request"]["herd"], many["cpu_ms_per_request"]["herd"]
    one_worker_rps = 1000 / herd_1  # one worker with a core to itself
    rps = workers * 1000 / herd_n
    side = one["cpu_ms_per_request"]["simulator"] + one["cpu_ms_per_request"]["wrk"]
    return {
        "workers": workers, "cost_from": f"{many['workers']} workers (node-shared)",
        "one_worker_req_per_s_on_its_own_core": one_worker_rps,
        "req_per_s": rps, "vs_n_times_one": rps / (workers * one_worker_rps),
        "cores_per_1000_req_s": {"herd": herd_n, "simulator": one["cpu_ms_per_request"]["simulator"],
                                 "wrk": one["cpu_ms_per_request"]["wrk"]},
        "cores_for_simulator_and_wrk_at_that_rate": side * rps / 1000,
    }


def render(rows: dict[str, dict[str, Any]], proj: dict[str, Any] | None, args: argparse.Namespace,
           claim_us: float) -> str:
    headers = ["target", "workers", "shared by", "req/s", "vs 1", "p50 ms", "p99 ms", "herd ms CPU/req",
               "sim ms/req", "wrk ms/req", "redis ms/req", "herd cores", "efficiency", "balance",
               *(f"calls/burst {ttft:g} ms" for ttft in _ttfts(args))]
    table_rows = [[name, r["workers"], r["shared_by"], round(r["req_per_s"]), r["req_per_s_vs_1"], r["p50_ms"],
                   r["p99_ms"], r["cpu_ms_per_request"]["herd"], r["cpu_ms_per_request"]["simulator"],
                   r["cpu_ms_per_request"]["wrk"], r["cpu_ms_per_request"]["redis"], r["herd_cores"],
                   r["efficiency"], r["worker_balance"],
                   *(" ".join(str(c) for c in r["burst_calls"].get(f"{ttft:g} ms", [])) or "-"
                     for ttft in _ttfts(args))]
                  for name, r in rows.items()]
    fmt = [[f"{v:.3f}" if isinstance(v, float) and i in (7, 8, 9, 10) else
            (f"{v:.2f}" if isinstance(v, float) and i in (4, 11, 12, 13) else v) for i, v in enumerate(row)]
           for row in table_rows]
    text = report.table(headers, fmt, title=(
        f"herd workers: wrk -t1 -c{args.connections}, unique bodies, simulator {args.ttft_ms:g} ms, "
        f"{args.rounds} x {args.duration:g} s rounds (medians); bursts of {args.burst:,} identical (half streamed), "
        f"the simulator answering in {' or '.join(f'{t:g}' for t in _ttfts(args))} ms; this machine: "
        f"{os.cpu_count()} cores"))
    text += ("\nvs 1: req/s over 1 worker's, on this machine (herd, the simulator and wrk share its cores); "
             "efficiency: 1 worker's herd CPU per request over this target's;\nbalance: the least busy worker's "
             "CPU over the busiest's (a socket per worker, SO_REUSEPORT)")
    text += (f"\n\nThe node's claims table: {claim_us:.1f} us per unique request (claim and release, measured "
             "in this process)")
    if proj is not None:
        cores = proj["cores_per_1000_req_s"]
        text += (
            f"\n\nProjection for {proj['workers']} workers, each with a core of its own (herd's CPU per request "
            f"as measured with {proj['cost_from']}):\n"
            f"  one worker on its own core: {proj['one_worker_req_per_s_on_its_own_core']:,.0f} req/s "
            f"(1000 / 1 worker's ms CPU per request)\n"
            f"  {proj['workers']} workers: {proj['req_per_s']:,.0f} req/s = {proj['vs_n_times_one']:.2f} x "
            f"{proj['workers']} x one worker (target >= 0.80)\n"
            f"  cores per 1,000 req/s: herd {cores['herd']:.2f}, simulator {cores['simulator']:.2f}, "
            f"wrk {cores['wrk']:.2f}; at that rate the simulator and wrk need "
            f"{proj['cores_for_simulator_and_wrk_at_that_rate']:.1f} more cores\n"
        )
    return text


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="herd bench workers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,8", help="worker counts sharing flights through the node (default 1,2,8)")
    p.add_argument("--redis-workers", default="1,2",
                   help="worker counts sharing flights through Redis ('' for none; default 1,2)")
    p.add_argument("--unshared-workers", default="2",
                   help="worker counts sharing nothing, for the cost of the sharing itself ('' for none; default 2)")
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measured wrk run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ttft-ms", type=float, default=50.0, help="the simulator's answer time for throughput")
    p.add_argument("--burst", type=int, default=1000, help="identical requests per burst (0: no bursts)")
    p.add_argument("--burst-ttft-ms", default="1000,50",
                   help="the simulator's answer times for the bursts, one burst each per round (default 1000,50)")
    p.add_argument("--quiet-wait", type=float, default=5.0, help="at most this long for an idle machine per run")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/out/workers-<time>)")
    return p.parse_args(argv)


def _ttfts(args: argparse.Namespace) -> list[float]:
    return [float(x) for x in str(args.burst_ttft_ms).split(",") if x.strip()]


def _counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if wrk.find_wrk() is None:
        print("herd bench workers: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    out = args.out or results_dir("out", "workers-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    node, shared, unshared = _counts(args.workers), _counts(args.redis_workers), _counts(args.unshared_workers)
    with Stack() as stack:
        sim = stack.simulator(ttft_ms=args.ttft_ms, tokens_per_s=0, reply_tokens=16)
        redis = RedisServer(workdir=stack.dir).start() if shared else None
        targets: list[Target] = []
        try:
            url = redis.url if redis else None
            plan = [(n, None, False) for n in node] + [(n, url, False) for n in shared] + [(n, None, True)
                                                                                       for n in unshared]
            for n, url, alone in plan:
                name = f"{n}w" + ("-unshared" if alone else "-redis" if url else "")
                data = _config(sim.url, n, url, alone)
                herd = stack.start(lambda port, data=data, name=name: Herd(data, stack.dir, name, port,
                                                                          stack.dir / f"{name}.log"), 120)
                assert isinstance(herd, Herd)
                _wait_workers(herd, n)
                targets.append(Target(name, n, url, herd, alone))
            for r in range(1, args.rounds + 1):
                order = targets[r % len(targets):] + targets[:r % len(targets)]  # rotate who goes first
                for t in order:
                    t.runs.append(throughput(t, sim, redis, args, stack.dir, r))
                for ttft in _ttfts(args) if args.burst else []:
                    for t in order:
                        t.bursts.append(burst(t, sim, args, r, ttft))
        finally:
            if redis is not None:
                redis.close()
    rows = summarize(targets)
    proj = projection(rows)
    claim_us = claim_cost_us()
    text = render(rows, proj, args, claim_us)
    print(text)
    results = {
        "schema": "herd-bench-workers/1",
        **report.provenance("herd bench workers", argv),
        "machine": report.machine(),
        "wrk": wrk.wrk_version(wrk.find_wrk() or "wrk"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": rows, "projection": proj, "claim_us_per_request": claim_us,
        "runs": {t.name: {"throughput": t.runs, "bursts": t.bursts} for t in targets},
    }
    report.write_json(out / "results.json", results)
    (out / "summary.txt").write_text(text + "\n")
    print(f"wrote {out / 'results.json'} and summary.txt", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
