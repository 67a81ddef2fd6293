"""Embedding throughput: the embedder standalone vs herd's micro-batcher, side by side.

    python -m benchmarks.embed_throughput [--n 512] [--threads N] [--workers N] [--concurrency 8,32,64]
                                         [--repeat 3] [--json PATH]

Standalone: ``Embedder.embed`` over the same short prompts in batches of 1, 8, 16, 32 and 64,
as many runs at once as the batcher has workers. Batcher: ``BatchingEmbedder.embed`` called
by N concurrent asyncio callers, each embedding its share of the prompts one at a time (as
herd's request handlers do), cache off so every text is embedded. Same texts, same model,
same ONNX thread setting, same number of concurrent runs, one process, one run:
the table reports prompts/s and the batcher's ratio to the standalone best. Rounds are
interleaved (standalone, batcher, standalone, ...) and the best of --repeat is kept, which
is the fairest figure on a noisy shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import report

DEFAULT_JSON = Path("benchmarks/out/embed-throughput.json")

_SUBJECTS = [
    "my password", "my order", "my subscription", "the invoice", "my account", "the delivery",
    "a refund", "my address", "the app", "my card", "two-factor authentication", "my booking",
    "the router", "my phone number", "a parcel", "the newsletter", "my plan", "the meter reading",
]
_FRAMES = [
    "How do I change {}?", "Where can I find {}?", "Why is {} not working?", "Can I cancel {} online?",
    "What happens if I lose {}?", "Who do I contact about {}?", "Is there a fee for {}?",
    "How long does it take to update {}?", "Can you help me with {} please?",
    "I have a question about {}, what should I do?",
]


def prompts(n: int) -> list[str]:
    """n distinct short prompts (5-15 words), deterministic."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        frame = _FRAMES[i % len(_FRAMES)]
        subject = _SUBJECTS[(i // len(_FRAMES)) % len(_SUBJECTS)]
        suffix = "" if i < len(_FRAMES) * len(_SUBJECTS) else f" (case {i})"
        out.append(frame.format(subject) + suffix)
        i += 1
    return out


def run_standalone(embedder: Any, texts: list[str], batch: int, pool: Any) -> float:
    t0 = time.perf_counter()
    list(pool.map(embedder.embed, [texts[start : start + batch] for start in range(0, len(texts), batch)]))
    return len(texts) / (time.perf_counter() - t0)


async def run_batcher(embedder: Any, texts: list[str], concurrency: int, max_batch: int,
                      workers: int) -> tuple[float, dict]:
    from embeddings.batcher import BatchingEmbedder

    be = BatchingEmbedder(embedder, max_batch=max_batch, cache_size=0, workers=workers)
    # warm the worker thread
    await be.embed("warm up")
    shares = [texts[i::concurrency] for i in range(concurrency)]

    async def caller(share: list[str]) -> None:
        for t in share:
            await be.embed(t)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(s) for s in shares))
    rate = len(texts) / (time.perf_counter() - t0)
    stats = be.stats()
    await be.aclose()
    return rate, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.embed_throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512, help="prompts per round (default 512)")
    ap.add_argument("--batches", default="1,8,16,32,64", help="standalone batch sizes")
    ap.add_argument("--concurrency", default="8,32,64", help="concurrent callers for the batcher")
    ap.add_argument("--max-batch", type=int, default=32, help="BatchingEmbedder max_batch (default 32)")
    ap.add_argument("--threads", type=int, default=None,
                    help="ONNX Runtime intra-op threads (default: the Embedder's, 1; 0: ONNX Runtime's default)")
    ap.add_argument("--workers", type=int, default=None,
                    help="concurrent runs, standalone and in the batcher (default: the batcher's default)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best is kept (default 3)")
    ap.add_argument("--model", default=None, help="ONNX model path (default: the bundled model)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write results here (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)

    from concurrent.futures import ThreadPoolExecutor

    from embeddings.embedder import Embedder, default_workers

    embedder = Embedder(model_path=args.model, intra_op_threads=args.threads)
    workers = args.workers or default_workers(embedder)
    pool = ThreadPoolExecutor(workers)
    texts = prompts(args.n)
    batches = [int(x) for x in args.batches.split(",") if x]
    concurrency = [int(x) for x in args.concurrency.split(",") if x]
    embedder.embed(texts[:64])  # warm up

    standalone: dict[int, list[float]] = {b: [] for b in batches}
    batcher: dict[int, list[float]] = {c: [] for c in concurrency}
    batcher_stats: dict[int, dict] = {}
    for r in range(args.repeat):
        for b in batches:
            standalone[b].append(run_standalone(embedder, texts, b, pool))
        for c in concurrency:
            rate, stats = asyncio.run(run_batcher(embedder, texts, c, args.max_batch, workers))
            batcher[c].append(rate)
            batcher_stats[c] = stats
        print(f"round {r + 1}/{args.repeat} done", file=sys.stderr)

    best_b = max(batches, key=lambda b: max(standalone[b]))
    best = max(standalone[best_b])
    print(f"\nEmbedding throughput, {len(texts)} short prompts, model {Path(embedder.model_path).name}, "
          f"intra-op threads {embedder.intra_op_threads or 'default'}, {workers} run(s) at once, "
          f"{os.cpu_count()} CPUs, best of {args.repeat} interleaved rounds")
    print(f"\n  {'mode':<34}{'prompts/s':>10}{'vs best':>9}{'mean batch':>12}")
    rows = []
    for b in batches:
        rate = max(standalone[b])
        rows.append({"mode": "standalone", "batch": b, "rate": rate, "ratio": rate / best, "rounds": standalone[b]})
        print(f"  {'standalone, batch ' + str(b):<34}{rate:>10.1f}{rate / best:>9.2f}{b:>12}")
    for c in concurrency:
        rate = max(batcher[c])
        mean = batcher_stats[c]["mean_batch"]
        rows.append({"mode": "batcher", "concurrency": c, "max_batch": args.max_batch, "rate": rate,
                     "ratio": rate / best, "rounds": batcher[c], "stats": batcher_stats[c]})
        print(f"  {f'batcher, {c} callers (max {args.max_batch})':<34}{rate:>10.1f}{rate / best:>9.2f}{mean:>12.1f}")
    top = max(concurrency, key=lambda c: max(batcher[c]))
    ratio = max(batcher[top]) / best
    print(f"\n  standalone best: batch {best_b}, {best:.1f}/s; batcher best: {top} callers, "
          f"{max(batcher[top]):.1f}/s = {ratio:.0%} of standalone (target >= 85%)")

    result = {
        **report.provenance("python -m benchmarks.embed_throughput", argv),
        "texts": len(texts), "threads": embedder.intra_op_threads, "workers": workers, "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "model": embedder.model_path, "python": platform.python_version(), "max_batch": args.max_batch,
        "standalone_best": {"batch": best_b, "rate": best},
        "batcher_best": {"concurrency": top, "rate": max(batcher[top]), "ratio": ratio},
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
