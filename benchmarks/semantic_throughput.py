"""Semantic mode against the embedder's own throughput, side by side in one run.

    python -m benchmarks.semantic_throughput [--requests 1500] [--concurrency 64] [--json PATH]

1. The embedder standalone: the same unique prompts, in this process, at batch sizes
   8/16/32/64 with the same ONNX settings herd uses; the best is the ceiling.
2. herd in semantic mode (and in exact mode, for reference) behind the upstream simulator
   (1 ms to first token), driven with those prompts, all unique, at a fixed concurrency:
   herd's req/s as a share of the embedder's best prompts/s.
3. At half of herd-semantic's req/s (open loop, fixed rate): p50 and p99 latency of exact
   and semantic mode, and what semantic mode adds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import aiohttp
import orjson

from benchmarks.procs import Stack, wait_for_quiet


def prompts(n: int, offset: int = 0) -> list[str]:
    topics = ["billing", "shipping", "passwords", "returns", "warranty", "delivery", "accounts", "refunds"]
    return [
        f"Question {i + offset}: how does {topics[i % len(topics)]} work for order {1000 + i + offset} in region {i % 17}?"
        for i in range(n)
    ]


def embedder_best(texts: list[str]) -> dict:
    from embeddings.embedder import Embedder

    embedder = Embedder()
    embedder.embed(texts[:64])  # warm-up
    rates = {}
    for batch in (8, 16, 32, 64):
        started = time.perf_counter()
        for i in range(0, len(texts), batch):
            embedder.embed(texts[i : i + batch])
        rates[batch] = len(texts) / (time.perf_counter() - started)
    best = max(rates, key=rates.get)
    return {"rates": rates, "best_batch": best, "best_per_s": rates[best]}


async def ask(http: aiohttp.ClientSession, url: str, text: str) -> tuple[float, bool]:
    """One chat request: (seconds to the whole answer, whether it was a 200)."""
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
    started = time.perf_counter()
    async with http.post(url, data=body, headers={"content-type": "application/json"}) as r:
        await r.read()
        return time.perf_counter() - started, r.status == 200


async def closed_loop(url: str, texts: list[str], concurrency: int) -> tuple[float, list[float], int]:
    queue = iter(texts)
    results: list[tuple[float, bool]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def worker() -> None:
            for text in queue:
                results.append(await ask(http, url, text))

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        rate = len(texts) / (time.perf_counter() - started)
    return rate, [t for t, _ in results], sum(not ok for _, ok in results)


async def open_loop(url: str, texts: list[str], rate: float) -> tuple[list[float], int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        tasks = []
        start = time.perf_counter()
        for i, text in enumerate(texts):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(ask(http, url, text)))
        results = await asyncio.gather(*tasks)
    return [t for t, _ in results], sum(not ok for _, ok in results)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.semantic_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", default="benchmarks/out/semantic-throughput.json")
    args = parser.parse_args(argv)
    texts = prompts(args.requests)
    result: dict = {"requests": args.requests, "concurrency": args.concurrency}
    with Stack() as stack:
        sim = stack.simulator(ttft_ms=1)
        herds = {mode: stack.herd(sim.url, mode, overrides=["server.access_log=false"]) for mode in ("exact", "semantic")}
        wait_for_quiet(10)
        result["embedder"] = embedder_best(texts)
        for mode, proc in herds.items():
            url = proc.url + "/v1/chat/completions"
            asyncio.run(closed_loop(url, prompts(200, offset=10**6), args.concurrency))  # warm-up, other prompts
            rate, latencies, errors = asyncio.run(closed_loop(url, texts, args.concurrency))
            result[mode] = {"req_per_s": rate, "errors": errors, "p50_ms": pct(latencies, 0.5)}
        half = result["semantic"]["req_per_s"] / 2
        result["half_load_rate"] = half
        for mode, proc in herds.items():
            latencies, errors = asyncio.run(open_loop(proc.url + "/v1/chat/completions",
                                                      prompts(min(args.requests, int(half * 8)), offset=2 * 10**6 +
                                                              (0 if mode == "exact" else 10**5)), half))
            result[mode]["half_load"] = {"p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99),
                                         "mean_ms": statistics.fmean(latencies) * 1000, "errors": errors}
    best = result["embedder"]["best_per_s"]
    share = result["semantic"]["req_per_s"] / best
    added = result["semantic"]["half_load"]["p50_ms"] - result["exact"]["half_load"]["p50_ms"]
    result["semantic_share_of_embedder"] = share
    result["semantic_added_p50_ms_at_half_load"] = added
    print(f"{args.requests} unique prompts, concurrency {args.concurrency}")
    print("embedder standalone, prompts/s by batch: "
          + ", ".join(f"{b}: {r:,.0f}" for b, r in result["embedder"]["rates"].items()))
    print(f"{'target':<22}{'req/s':>9}{'x embedder best':>17}{'errors':>8}")
    print(f"{'embedder (best batch)':<22}{best:>9,.0f}{1.0:>17.2f}{'-':>8}")
    for mode in ("exact", "semantic"):
        r = result[mode]
        print(f"{'herd-' + mode:<22}{r['req_per_s']:>9,.0f}{r['req_per_s'] / best:>17.2f}{r['errors']:>8}")
    print(f"\nhalf of herd-semantic's rate: {half:,.0f} req/s (open loop)")
    print(f"{'target':<22}{'p50 ms':>9}{'p99 ms':>9}")
    for mode in ("exact", "semantic"):
        h = result[mode]["half_load"]
        print(f"{'herd-' + mode:<22}{h['p50_ms']:>9.2f}{h['p99_ms']:>9.2f}")
    print(f"\nsemantic mode: {share:.0%} of the embedder's best throughput (target >= 85%); "
          f"adds {added:+.2f} ms p50 over exact mode at half load (target <= 10 ms)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
