"""Replicas sharing flights over Redis: upstream calls for a cross-replica burst, and the
latency a Redis-joined follower adds next to a local one. One run, one machine.

    python -m benchmarks.replicas                     # table on stdout
    python -m benchmarks.replicas --out benchmarks/out/replicas.json --flights 60

What runs: the upstream simulator, redis-server (standalone, and a 3-master cluster), and
three herd processes per setup (`python -m proxy serve`), all on loopback ports.

1. Burst: N identical requests at once, spread round-robin over the three replicas (half
   streams), for three setups: local-only replicas (no Redis), replicas on one Redis,
   replicas on a Redis Cluster. Reported: upstream calls per burst (the simulator's count).

2. Follower latency (replicas on one Redis): for each flight, a leader stream on replica A;
   30 ms later, at the same instant, a stream follower on A (joins the local flight) and a
   stream follower on B (joins through Redis: XREAD of A's stream). Every chunk's arrival is
   timestamped in this client; the added latency of the Redis hop is, chunk by chunk,
   arrival at the B follower minus arrival at the A follower. Also the leader's time to
   first chunk on a Redis replica next to a local-only one (the claim's round trip).

3. Cold bursts with the cache on (`--scenario cold`, replicas on one Redis, the default
   `timeout_s` of 0.25 s): `--rounds` bursts of `--burst` identical requests over three
   replicas, each with a new prompt; then `--distinct` distinct prompts, every one sent to
   every replica at once (so each replica has that many distinct requests in flight, and
   each flight is led on one replica and followed on the others). Reported: upstream calls
   per burst (1 is the goal), calls for the distinct prompts (one per prompt is the goal),
   failed requests, Redis errors each replica counted, and whether Redis was still up.

Numbers are from one noisy 2-core machine; compare the columns of one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks import report
from benchmarks.harness import (
    RedisCluster,
    RedisServer,
    Stack,
    chat_calls,
    sim_reset,
    start_replicas,
)

HASH_KEY = "benchmark-hash-key"


def sections(sim_url: str, redis: dict | None, cache: bool = False) -> dict:
    out: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "request_timeout_s": 60.0, "log_level": "warning"},
        "auth": {"hash_key": HASH_KEY},
        "upstreams": {"sim": {"kind": "openai", "base_url": sim_url + "/v1"}},
        "routes": [{"model": "*", "upstream": "sim"}],
        "cache": {"enabled": cache},
    }
    if redis:
        out["redis"] = redis
    return out


async def request(http: aiohttp.ClientSession, url: str, text: str, stream: bool) -> dict:
    """One chat request; a stream's chunks are timestamped as they arrive."""
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "stream": stream}
    sent = time.perf_counter()
    arrivals: list[float] = []
    async with http.post(url + "/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-bench"}) as r:
        role = r.headers.get("x-herd", "")
        if not stream:
            await r.read()
            return {"status": r.status, "role": role, "sent": sent, "arrivals": [time.perf_counter()]}
        ok = False
        async for line in r.content:
            if line.startswith(b"data: [DONE]"):
                ok = True
                break
            if line.startswith(b"data:"):
                arrivals.append(time.perf_counter())
        return {"status": r.status if ok else 599, "role": role, "sent": sent, "arrivals": arrivals}


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120))


async def burst(replicas, sim_url: str, text: str, n: int) -> dict:
    before = chat_calls(sim_url)
    async with session() as http:
        results = await asyncio.gather(*[request(http, replicas[i % len(replicas)].url, text,
                                                 stream=(i // len(replicas)) % 2 == 0) for i in range(n)])
    return {"requests": n, "failed": sum(r["status"] != 200 for r in results),
            "upstream_calls": chat_calls(sim_url) - before}


async def follower_latency(leader, remote, sim_url: str, flights: int, tag: str, concurrency: int = 4) -> dict:
    lags: list[float] = []
    ttft = {"local": [], "remote": []}
    done = {"local": [], "remote": []}
    queue = iter(range(flights))

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        text = f"{tag} flight {i}"
        lead = asyncio.create_task(request(http, leader.url, text, True))
        await asyncio.sleep(0.03)
        local, far = await asyncio.gather(request(http, leader.url, text, True), request(http, remote.url, text, True))
        await lead
        assert local["role"] == "follower" and far["role"] == "follower", (local["role"], far["role"])
        assert len(local["arrivals"]) == len(far["arrivals"]) > 0
        lags.extend((b - a) * 1000 for a, b in zip(local["arrivals"], far["arrivals"]))
        for name, r in (("local", local), ("remote", far)):
            ttft[name].append((r["arrivals"][0] - r["sent"]) * 1000)
            done[name].append((r["arrivals"][-1] - r["sent"]) * 1000)

    async def worker(http: aiohttp.ClientSession) -> None:
        for i in queue:
            await one(http, i)

    before = chat_calls(sim_url)
    async with session() as http:
        await asyncio.gather(*[worker(http) for _ in range(concurrency)])
    calls = chat_calls(sim_url) - before
    return {"flights": flights, "upstream_calls": calls, "chunk_lag_ms": summary(lags),
            "ttft_ms": {k: summary(v) for k, v in ttft.items()}, "total_ms": {k: summary(v) for k, v in done.items()},
            "lags": lags}


async def leader_ttft(replica, sim_url: str, count: int, tag: str) -> dict:
    out = []
    async with session() as http:
        for i in range(count):
            r = await request(http, replica.url, f"{tag} leader {i}", True)
            out.append((r["arrivals"][0] - r["sent"]) * 1000)
    return summary(out)


def summary(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)

    def pick(q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))]

    return {"n": len(v), "mean": statistics.fmean(v), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
            "max": v[-1]}


def stop_all(replicas) -> None:
    for r in replicas:
        r.stop()


async def run(args: argparse.Namespace) -> dict:
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "settings": vars(args).copy()}
    with Stack() as stack, RedisServer() as redis_server, RedisCluster() as cluster:
        sim = stack.simulator()
        setups = {
            "local-only (no Redis)": None,
            "one Redis": {"url": redis_server.url},
            "Redis Cluster (3 masters)": {"url": cluster.url, "cluster": True},
        }
        bursts = {}
        for name, redis in setups.items():
            replicas = start_replicas(3, sections(sim.url, redis), stack.dir)
            try:
                sim_reset(sim.url, ttft_ms=args.burst_ttft_ms, tokens_per_s=50, reply_tokens=20)
                rounds = [await burst(replicas, sim.url, f"{name} burst {k}", args.burst) for k in range(args.rounds)]
                bursts[name] = {"requests_per_burst": args.burst, "rounds": rounds,
                                "upstream_calls": [r["upstream_calls"] for r in rounds],
                                "failed": sum(r["failed"] for r in rounds)}
                if redis is not None and "Cluster" not in name:
                    sim_reset(sim.url, ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s,
                              reply_tokens=args.reply_tokens)
                    results["follower"] = await follower_latency(replicas[0], replicas[1], sim.url, args.flights,
                                                                 "bench")
                    results["leader_ttft_ms"] = {"redis": await leader_ttft(replicas[0], sim.url, args.leaders,
                                                                            "redis")}
                if redis is None:
                    sim_reset(sim.url, ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s,
                              reply_tokens=args.reply_tokens)
                    local = await leader_ttft(replicas[0], sim.url, args.leaders, "local")
            finally:
                stop_all(replicas)
        results["bursts"] = bursts
        results.setdefault("leader_ttft_ms", {})["local-only"] = local
    return results


def redis_state(replicas) -> list[dict]:
    """Per replica: Redis errors by kind (from /metrics) and whether Redis is up now."""
    out = []
    for r in replicas:
        errors = {}
        for line in r.metrics().splitlines():
            if line.startswith("herd_redis_errors_total{"):
                kind = line.split('"')[1]
                errors[kind] = int(float(line.rsplit(" ", 1)[1]))
        counts = {line.split(" ", 1)[0]: int(float(line.rsplit(" ", 1)[1])) for line in r.metrics().splitlines()
                  if line.startswith(("herd_requests_total{", "herd_shared_flights_total{"))}
        out.append({"errors": errors, "up": r.ready().get("redis") == "up", "counts": counts})
    return out


async def cold(args: argparse.Namespace) -> dict:
    """Cold bursts with the cache on, then many distinct prompts on every replica at once."""
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "settings": vars(args).copy()}
    nonce = os.urandom(4).hex()  # no run is answered from an earlier run's cache
    with Stack() as stack, RedisServer() as redis_server:
        sim = stack.simulator()
        replicas = start_replicas(3, sections(sim.url, {"url": redis_server.url}, cache=True), stack.dir)
        try:
            sim_reset(sim.url, ttft_ms=args.burst_ttft_ms, tokens_per_s=50, reply_tokens=20)
            rounds = []
            for k in range(args.rounds):
                rounds.append(await burst(replicas, sim.url, f"cold burst {nonce} {k}", args.burst))
                print(f"burst {k + 1}/{args.rounds}: {rounds[-1]}", file=sys.stderr)
            results["bursts"] = {"requests_per_burst": args.burst, "rounds": rounds,
                                 "upstream_calls": [r["upstream_calls"] for r in rounds],
                                 "failed": sum(r["failed"] for r in rounds)}
            results["after_bursts"] = redis_state(replicas)
            sim_reset(sim.url, ttft_ms=args.burst_ttft_ms, tokens_per_s=50, reply_tokens=5)
            before = chat_calls(sim.url)
            async with session() as http:
                answers = await asyncio.gather(*[
                    request(http, r.url, f"distinct {nonce} {i}", stream=i % 2 == 0)
                    for i in range(args.distinct) for r in replicas])
            results["distinct"] = {"prompts": args.distinct, "requests": len(answers),
                                   "failed": sum(a["status"] != 200 for a in answers),
                                   "upstream_calls": chat_calls(sim.url) - before,
                                   "replicas": redis_state(replicas)}
        finally:
            stop_all(replicas)
    return results


def cold_table(results: dict) -> str:
    b, d = results["bursts"], results["distinct"]
    calls = b["upstream_calls"]
    lines = ["Cold bursts over 3 replicas on one Redis, cache on", "",
             "| requests per burst | bursts | bursts with 1 upstream call | upstream calls per burst | failed |",
             "|---:|---:|---:|---|---:|",
             f"| {b['requests_per_burst']} | {len(calls)} | {calls.count(1)} | {', '.join(map(str, calls))} "
             f"| {b['failed']} |", "",
             f"Distinct prompts, each sent to all 3 replicas at once ({d['prompts']} requests in flight per replica)",
             "", "| prompts | requests | upstream calls | failed | Redis errors per replica | Redis up at the end |",
             "|---:|---:|---:|---:|---|---|",
             f"| {d['prompts']} | {d['requests']} | {d['upstream_calls']} | {d['failed']} "
             f"| {'; '.join(str(r['errors'] or 0) for r in d['replicas'])} "
             f"| {', '.join('yes' if r['up'] else 'no' for r in d['replicas'])} |"]
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = ["Cross-replica burst: identical requests spread over 3 herd replicas (half streams)", "",
             "| setup | requests per burst | upstream calls per burst | failed |", "|---|---:|---|---:|"]
    for name, b in results["bursts"].items():
        lines.append(f"| {name} | {b['requests_per_burst']} | {', '.join(map(str, b['upstream_calls']))} "
                     f"| {b['failed']} |")
    f = results["follower"]
    lines += ["", f"Follower latency: {f['flights']} flights, each with a local and a Redis-joined stream follower "
                  f"({f['upstream_calls']} upstream calls)", "",
              "| ms | mean | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|---:|"]

    def row(label: str, s: dict) -> str:
        return f"| {label} | {s['mean']:.2f} | {s['p50']:.2f} | {s['p90']:.2f} | {s['p99']:.2f} | {s['max']:.2f} |"

    lines.append(row("follower TTFT, local (same replica as the leader)", f["ttft_ms"]["local"]))
    lines.append(row("follower TTFT, Redis-joined (another replica)", f["ttft_ms"]["remote"]))
    lines.append(row("added per chunk: Redis-joined minus local arrival", f["chunk_lag_ms"]))
    lines.append(row("follower stream total, local", f["total_ms"]["local"]))
    lines.append(row("follower stream total, Redis-joined", f["total_ms"]["remote"]))
    lt = results["leader_ttft_ms"]
    lines.append(row("leader TTFT, local-only replica", lt["local-only"]))
    lines.append(row("leader TTFT, replica on Redis (claim first)", lt["redis"]))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    lags = sorted(results["follower"]["lags"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(lags, [i / len(lags) for i in range(len(lags))])
    ax.set_xlabel("chunk arrival, Redis-joined follower minus local follower (ms)")
    ax.set_ylabel("share of chunks")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--burst", type=int, default=300, help="requests per burst")
    p.add_argument("--rounds", type=int, default=3, help="bursts per setup")
    p.add_argument("--burst-ttft-ms", type=float, default=1500)
    p.add_argument("--flights", type=int, default=60, help="flights for the follower latency")
    p.add_argument("--leaders", type=int, default=30, help="sequential leader requests per setup")
    p.add_argument("--ttft-ms", type=float, default=100)
    p.add_argument("--tokens-per-s", type=float, default=50)
    p.add_argument("--reply-tokens", type=int, default=16)
    p.add_argument("--out", default="benchmarks/out/replicas.json")
    p.add_argument("--scenario", choices=("all", "cold"), default="all",
                   help="cold: only the cold bursts with the cache on and the distinct prompts")
    p.add_argument("--distinct", type=int, default=1000, help="cold: distinct prompts, each sent to every replica")
    args = p.parse_args(argv)
    source = report.provenance("python -m benchmarks.replicas", argv)
    if args.scenario == "cold":
        results = {**source, **asyncio.run(cold(args))}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
        print(cold_table(results))
        print(f"\nwrote {out}")
        return 0 if results["bursts"]["upstream_calls"].count(1) == args.rounds else 1
    results = {**source, **asyncio.run(run(args))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, out.with_suffix(".png"))
    results["follower"].pop("lags")
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(table(results))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
