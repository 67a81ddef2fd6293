"""Semantic mode against the embedder's own throughput, side by side in one run.

    python -m benchmarks.semantic_throughput [--requests 1500] [--concurrency 64] [--json PATH]

1. The embedder standalone: the same unique prompts, in this process, at batch sizes
   8/16/32/64 with the same ONNX settings herd uses and as many runs at once as herd's
   batcher makes (one per worker); the best is the ceiling.
2. herd in semantic mode (and in exact mode, for reference) behind the upstream simulator
   (1 ms to first token), driven with those prompts, all unique, at a fixed concurrency:
   herd's req/s as a share of the embedder's best prompts/s.
3. At half of herd-semantic's req/s (open loop, fixed rate): p50 and p99 latency of exact
   and semantic mode, and what semantic mode adds.
4. Where the CPU went per request at full load (herd's event loop, its embedding threads,
   the simulator, this process, other jobs, idle), and the share of the embedder's rate
   that fits on this machine's cores at all (:func:`cpu_budget`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Self

import aiohttp
import orjson

from benchmarks import report
from benchmarks.harness import Proc, Stack, parse_override
from benchmarks.procs import (
    machine_busy_seconds,
    machine_idle_seconds,
    prometheus,
    self_cpu_seconds,
    wait_for_quiet,
)
from embeddings.embedder import DEFAULT_PRECISION


def prompts(n: int, offset: int = 0) -> list[str]:
    topics = ["billing", "shipping", "passwords", "returns", "warranty", "delivery", "accounts", "refunds"]
    return [
        f"Question {i + offset}: how does {topics[i % len(topics)]} work for order {1000 + i + offset} "
        f"in region {i % 17}?"
        for i in range(n)
    ]


def embedder_best(texts: list[str], precision: str) -> dict:
    """The embedder alone, set up as herd sets it up (``Embedder()``'s defaults) and driven
    as herd's batcher drives it: as many runs at once as the batcher has workers."""
    from concurrent.futures import ThreadPoolExecutor

    from embeddings.embedder import Embedder, default_workers

    embedder = Embedder(precision=precision)
    workers = default_workers(embedder)
    rates = {}
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(embedder.embed, [texts[:64]] * workers))  # warm-up
        for batch in (8, 16, 32, 64):
            started = time.perf_counter()
            list(pool.map(embedder.embed, [texts[i : i + batch] for i in range(0, len(texts), batch)]))
            rates[batch] = len(texts) / (time.perf_counter() - started)
    best = max(rates, key=rates.get)
    return {"rates": rates, "best_batch": best, "best_per_s": rates[best], "workers": workers,
            "intra_op_threads": embedder.intra_op_threads, "precision": precision}


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


class Cpu:
    """Where the machine's CPU went while a phase ran, in cores: herd's event loop (its main
    thread) and its other threads (the embedding workers), the simulator, this process (the
    load generator, or the standalone embedder), other people's jobs, and idle."""

    PARTS = ("herd_loop", "herd_threads", "simulator", "this_process", "foreign", "idle")

    def __init__(self, stack: Stack, sim: Proc) -> None:
        self.stack, self.sim = stack, sim
        self.herd: Proc | None = None

    def of(self, herd: Proc | None) -> Cpu:
        self.herd = herd
        return self

    def _sample(self) -> dict[str, float]:
        loop, threads = self.herd.thread_cpu_seconds() if self.herd else (0.0, 0.0)
        return {"wall": time.perf_counter(), "busy": machine_busy_seconds(), "idle": machine_idle_seconds(),
                "herd_loop": loop, "herd_threads": threads, "simulator": self.sim.cpu_seconds(),
                "this_process": self_cpu_seconds(), "stack": sum(p.cpu_seconds() for p in self.stack.procs)}

    def __enter__(self) -> Self:
        self.cores: dict[str, float] = dict.fromkeys(self.PARTS, 0.0)
        self._t0 = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        t1 = self._sample()
        d = {k: t1[k] - self._t0[k] for k in t1}
        if d["wall"] <= 0:
            return
        foreign = d["busy"] - d["this_process"] - d["stack"]
        self.cores = {"herd_loop": d["herd_loop"], "herd_threads": d["herd_threads"], "simulator": d["simulator"],
                      "this_process": d["this_process"], "foreign": max(0.0, foreign), "idle": d["idle"]}
        self.cores = {k: v / d["wall"] for k, v in self.cores.items()}

    @property
    def foreign_cores(self) -> float:
        return self.cores["foreign"]

    def ms_per_request(self, rate: float) -> dict[str, float]:
        return {k: 1000 * v / rate for k, v in self.cores.items()}


def embedding_counters(url: str) -> tuple[float, float, float]:
    """herd's embedding runs so far: (runs, texts, seconds), from /metrics."""
    m = prometheus(url) or {}
    return (m.get("herd_embedding_batch_size_count", 0.0), m.get("herd_embedding_batch_size_sum", 0.0),
            m.get("herd_embedding_seconds_sum", 0.0))


def batches_between(before: tuple[float, float, float], after: tuple[float, float, float]) -> dict:
    runs, texts, seconds = (a - b for a, b in zip(after, before))
    return {"runs": int(runs), "mean_batch": texts / runs if runs else 0.0,
            "ms_per_run": 1000 * seconds / runs if runs else 0.0,
            "ms_per_text": 1000 * seconds / texts if texts else 0.0}


def cpu_budget(result: dict) -> dict:
    """Whether 85% of the embedder's rate fits on this machine's cores at all: a semantic request
    costs at least one embedding at the standalone embedder's CPU per text, plus the work that
    herd's event loop, the simulator and the load generator do for it (measured per request)."""
    cores = os.cpu_count() or 1
    emb = result["embedder"]
    busy = 1.0 - emb["cores"]["idle"] / cores
    per_text = 1000 * cores * busy / emb["best_per_s"]
    at_target = 1000 * cores / (0.85 * emb["best_per_s"])

    def rest(mode: str) -> float:
        ms = result[mode]["cpu_ms_per_req"]
        return ms["herd_loop"] + ms["simulator"] + ms["this_process"]

    return {"cores": cores, "embedder_ms_per_text": per_text, "embedder_busy_share": busy,
            "ms_per_request_at_85pct": at_target, "room_besides_embedding_ms": at_target - per_text,
            "exact_rest_ms": rest("exact"), "semantic_rest_ms": rest("semantic"),
            "ceiling_share": (1000 * cores / (per_text + rest("semantic"))) / emb["best_per_s"]}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.semantic_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", default="benchmarks/out/semantic-throughput.json")
    parser.add_argument("--herd-option", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override for both herds (repeatable), e.g. coalesce.embed_precision=fp32")
    parser.add_argument("--wait-quiet", type=float, default=10.0,
                        help="before each measured phase, wait up to this many seconds for idle CPUs (default 10)")
    args = parser.parse_args(argv)
    texts = prompts(args.requests)
    # the standalone embedder computes as herd's does
    overrides = {".".join(path): value for path, value in map(parse_override, args.herd_option)}
    precision = overrides.get("coalesce.embed_precision", DEFAULT_PRECISION)
    result: dict = {**report.provenance("python -m benchmarks.semantic_throughput", argv),
                    "requests": args.requests, "concurrency": args.concurrency}
    with Stack() as stack:
        sim = stack.simulator(ttft_ms=1)
        herds = {mode: stack.herd(sim.url, mode, overrides=["server.access_log=false", *args.herd_option])
                 for mode in ("exact", "semantic")}
        cpu = Cpu(stack, sim)
        wait_for_quiet(args.wait_quiet)
        with cpu.of(None):
            result["embedder"] = embedder_best(texts, precision)
        result["embedder"]["foreign_cores"] = cpu.foreign_cores
        result["embedder"]["cores"] = cpu.cores
        for mode, proc in herds.items():
            url = proc.url + "/v1/chat/completions"
            asyncio.run(closed_loop(url, prompts(200, offset=10**6), args.concurrency))  # warm-up, other prompts
            wait_for_quiet(args.wait_quiet)
            before = embedding_counters(proc.url)
            with cpu.of(proc):
                rate, latencies, errors = asyncio.run(closed_loop(url, texts, args.concurrency))
            ms = cpu.ms_per_request(rate)
            result[mode] = {"req_per_s": rate, "errors": errors, "p50_ms": pct(latencies, 0.5),
                            "herd_cpu_ms_per_req": ms["herd_loop"] + ms["herd_threads"],
                            "embedding": batches_between(before, embedding_counters(proc.url)),
                            "foreign_cores": cpu.foreign_cores, "cores": cpu.cores,
                            "cpu_ms_per_req": ms}
        half = result["semantic"]["req_per_s"] / 2
        result["half_load_rate"] = half
        for mode, proc in herds.items():
            wait_for_quiet(args.wait_quiet)
            before = embedding_counters(proc.url)
            with cpu.of(proc):
                latencies, errors = asyncio.run(open_loop(proc.url + "/v1/chat/completions",
                                                          prompts(min(args.requests, int(half * 8)), offset=2 * 10**6 +
                                                                  (0 if mode == "exact" else 10**5)), half))
            result[mode]["half_load"] = {"p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99),
                                         "mean_ms": statistics.fmean(latencies) * 1000, "errors": errors,
                                         "embedding": batches_between(before, embedding_counters(proc.url)),
                                         "foreign_cores": cpu.foreign_cores}
    best = result["embedder"]["best_per_s"]
    share = result["semantic"]["req_per_s"] / best
    added = result["semantic"]["half_load"]["p50_ms"] - result["exact"]["half_load"]["p50_ms"]
    result["semantic_share_of_embedder"] = share
    result["semantic_added_p50_ms_at_half_load"] = added
    print(f"{args.requests} unique prompts, concurrency {args.concurrency}")
    print(f"embedder standalone ({precision}, {result['embedder']['workers']} runs at once, "
          f"{result['embedder']['intra_op_threads'] or 'default'} ONNX thread(s) each), prompts/s by batch: "
          + ", ".join(f"{b}: {r:,.0f}" for b, r in result["embedder"]["rates"].items()))
    print(f"{'target':<22}{'req/s':>9}{'x embedder best':>17}{'errors':>8}{'foreign cores':>15}")
    print(f"{'embedder (best batch)':<22}{best:>9,.0f}{1.0:>17.2f}{'-':>8}{result['embedder']['foreign_cores']:>15.2f}")
    for mode in ("exact", "semantic"):
        r = result[mode]
        print(f"{'herd-' + mode:<22}{r['req_per_s']:>9,.0f}{r['req_per_s'] / best:>17.2f}{r['errors']:>8}"
              f"{r['foreign_cores']:>15.2f}")
    print(f"\nhalf of herd-semantic's rate: {half:,.0f} req/s (open loop)")
    print(f"{'target':<22}{'p50 ms':>9}{'p99 ms':>9}{'foreign cores':>15}")
    for mode in ("exact", "semantic"):
        h = result[mode]["half_load"]
        print(f"{'herd-' + mode:<22}{h['p50_ms']:>9.2f}{h['p99_ms']:>9.2f}{h['foreign_cores']:>15.2f}")
    semantic = result["semantic"]
    for phase, e in (("full load", semantic["embedding"]), ("half load", semantic["half_load"]["embedding"])):
        print(f"herd-semantic embedding runs at {phase}: {e['runs']}, mean batch {e['mean_batch']:.1f}, "
              f"{e['ms_per_run']:.2f} ms/run, {e['ms_per_text']:.2f} ms/text")
    print(f"herd CPU ms/request at full load: exact {result['exact']['herd_cpu_ms_per_req']:.2f}, "
          f"semantic {result['semantic']['herd_cpu_ms_per_req']:.2f}")
    budget = cpu_budget(result)
    result["cpu_budget"] = budget
    print(f"\nCPU per request at full load, ms (the {budget['cores']} cores give {budget['cores']} x wall / requests):")
    print(f"{'target':<22}" + "".join(f"{k.replace('_', ' '):>14}" for k in Cpu.PARTS))
    for mode in ("exact", "semantic"):
        ms = result[mode]["cpu_ms_per_req"]
        print(f"{'herd-' + mode:<22}" + "".join(f"{ms[k]:>14.2f}" for k in Cpu.PARTS))
    print(f"The embedder alone spends {budget['embedder_ms_per_text']:.2f} ms of CPU per text (its {budget['cores']} "
          f"cores {budget['embedder_busy_share']:.0%} busy). At 85% of its rate the cores give "
          f"{budget['ms_per_request_at_85pct']:.2f} ms per request, so all else must fit in "
          f"{budget['room_besides_embedding_ms']:.2f} ms;\nherd-exact's loop, simulator and load generator alone take "
          f"{budget['exact_rest_ms']:.2f} ms per request, herd-semantic's loop, simulator and load generator "
          f"{budget['semantic_rest_ms']:.2f} ms. Ceiling on this machine: "
          f"{budget['ceiling_share']:.0%} of the embedder's rate (embedding at its standalone cost, "
          "plus herd-semantic's "
          f"other work).")
    print(f"\nsemantic mode: {share:.0%} of the embedder's best throughput (target >= 85%); "
          f"adds {added:+.2f} ms p50 over exact mode at half load (target <= 10 ms)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
