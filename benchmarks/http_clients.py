"""Which HTTP client should herd use for upstream calls? Measure it.

A fixed-latency upstream (aiohttp.web, its own process) answers a small chat.completion
JSON after ``--latency-ms``. For each client, a bare passthrough (benchmarks.passthrough, its
own process, started fresh for every run) sits in front of it, and wrk (benchmarks/wrk.py:
a new chat body per request) drives ``--connections`` for ``--duration`` seconds after an
unmeasured warm-up. Runs are interleaved over ``--rounds`` (the order rotates each round),
and the upstream is also measured directly, with no proxy, as the ceiling. The proxy's CPU
per request comes from /proc, and each run records the cores that processes this benchmark
did not start used meanwhile.

    python -m benchmarks.http_clients --connections 256 --duration 10 --rounds 3 --out benchmarks/results/http-clients

Writes results.json (every run, the ratios to the best client pooled and round by round,
the settings, the package versions, the command and the commit) and summary.txt (the table
it prints) to ``--out``. Every process it starts is stopped on exit, Ctrl-C included. All
traffic stays on 127.0.0.1. Needs wrk (apt-get install wrk); httpx-aiohttp is measured only
where it is installed (pip install httpx-aiohttp).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import report, wrk
from benchmarks.harness import HOST, Proc, ProcError, Stack, results_dir
from benchmarks.measure import rotation
from benchmarks.passthrough import CLIENTS
from benchmarks.procs import machine_busy_seconds, self_cpu_seconds, wait_for_quiet
from benchmarks.workloads import DEFAULT_MODEL

SCHEMA = "herd-http-clients/1"
PROG = "python -m benchmarks.http_clients"
DIRECT = "direct (no proxy)"
COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": DEFAULT_MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20},
}
PACKAGES = ("starlette", "uvicorn", "uvloop", "httptools", "aiohttp", "httpx", "httpcore", "httpx-aiohttp")


# --------------------------------------------------------------------------- the upstream


def serve_upstream(port: int, latency_ms: float) -> None:
    """Run the fixed-latency upstream until killed (the body of its own process)."""
    import uvloop
    from aiohttp import web

    body = json.dumps(COMPLETION, separators=(",", ":")).encode()
    delay = latency_ms / 1000

    async def completion(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(delay)
        return web.Response(body=body, content_type="application/json")

    async def serve() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", completion)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port, backlog=4096).start()
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())


def start_upstream(stack: Stack, latency_ms: float) -> Proc:
    def make(port: int) -> Proc:
        code = f"from benchmarks.http_clients import serve_upstream; serve_upstream({port}, {latency_ms})"
        return Proc("upstream", [sys.executable, "-c", code], port, stack.dir / "upstream.log")

    return stack.start(make)


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    target: str
    round: int
    rps: float  # 2xx answers / wrk's measured seconds
    p50_ms: float
    p99_ms: float
    requests: int  # answered, any status
    errors: int  # non-2xx answers and socket errors
    seconds: float
    proxy_cpu_us_per_req: float | None  # None for the direct run
    background_cores: float  # CPU that processes this benchmark did not start used meanwhile


def drive(url: str, target: str, round_: int, args: argparse.Namespace, workdir: Path,
          seconds: float) -> wrk.WrkResult:
    run = wrk.Run(url, args.connections, seconds, {"Content-Type": "application/json"}, DEFAULT_MODEL,
                  wrk.nonce_for(target, round_), threads=min(args.threads, args.connections), timeout_s=args.timeout)
    return wrk.run_wrk(run, workdir)


def measure(stack: Stack, target: str, round_: int, upstream: Proc, args: argparse.Namespace) -> Run:
    """One run of `target`: a fresh passthrough with that client (none for DIRECT), a warm-up,
    then the measured wrk run with the proxy's CPU and the machine's other work around it."""
    proxy = None if target == DIRECT else stack.passthrough(upstream.url, client=target)
    try:
        url = (proxy or upstream).url
        if args.warmup > 0:
            drive(url, f"{target}warm", round_, args, stack.dir, args.warmup)
        if args.wait_quiet > 0:
            wait_for_quiet(args.wait_quiet)

        def own_cpu() -> float:  # this process, its reaped children (wrk) and every live child
            return self_cpu_seconds() + sum(p.cpu_seconds() for p in stack.procs)

        busy0, own0, t0 = machine_busy_seconds(), own_cpu(), time.monotonic()
        proxy0 = proxy.cpu_seconds() if proxy else 0.0
        result = drive(url, target, round_, args, stack.dir, args.duration)
        proxy_s = proxy.cpu_seconds() - proxy0 if proxy else 0.0
        other = max(0.0, (machine_busy_seconds() - busy0) - (own_cpu() - own0))
        background = round(other / max(time.monotonic() - t0, 1e-9), 3)
    finally:
        if proxy is not None:
            proxy.stop()
            stack.procs.remove(proxy)
    result.check(f"{target} (round {round_})", args.max_error_share)
    cpu = proxy_s / result.ok * 1e6 if proxy and proxy_s and result.ok else None  # 0.0: no /proc
    return Run(target, round_, result.ok / result.duration_s, result.latency_ms.get("p50", float("nan")),
               result.latency_ms.get("p99", float("nan")), result.requests, result.errors, result.duration_s, cpu,
               background)


# --------------------------------------------------------------------------- the summary


def summarize(runs: Sequence[Run], clients: Sequence[str]) -> list[dict[str, Any]]:
    """Per target: the mean over rounds and its ratio to the best client's mean, plus the
    ratio within each round (side by side, so less exposed to a noisy machine)."""
    rows: list[dict[str, Any]] = []
    for target in [*clients, DIRECT]:
        mine = [r for r in runs if r.target == target]
        if not mine:
            continue
        cpus = [r.proxy_cpu_us_per_req for r in mine if r.proxy_cpu_us_per_req is not None]
        rows.append({
            "target": target,
            "rps_per_round": [round(r.rps, 1) for r in mine],
            "rps": statistics.fmean(r.rps for r in mine),
            "p50_ms": statistics.fmean(r.p50_ms for r in mine),
            "p99_ms": statistics.fmean(r.p99_ms for r in mine),
            "errors": sum(r.errors for r in mine),
            "proxy_cpu_us_per_req": statistics.fmean(cpus) if cpus else None,
            "background_cores_rounds": [r.background_cores for r in mine],
        })
    best = max((row["rps"] for row in rows if row["target"] != DIRECT), default=0.0)
    best_in_round = {n: max((r.rps for r in runs if r.round == n and r.target != DIRECT), default=0.0)
                     for n in {r.round for r in runs}}
    for row in rows:
        row["ratio_to_best_client"] = row["rps"] / best if best else None
        row["ratio_per_round"] = [round(r.rps / best_in_round[r.round], 3) if best_in_round[r.round] else None
                                  for r in runs if r.target == row["target"]]
    return rows


def format_summary(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    """The table, the ratios round by round, and the machine's other work meanwhile."""
    headers = ["target", "req/s (per round)", "req/s", "x best", "p50 ms", "p99 ms", "errors", "proxy CPU us/req"]
    table = report.table(headers, [
        [r["target"], " / ".join(f"{x:,.0f}" for x in r["rps_per_round"]), f"{r['rps']:,.0f}",
         "-" if r["ratio_to_best_client"] is None else f"{r['ratio_to_best_client']:.2f}",
         r["p50_ms"], r["p99_ms"], r["errors"],
         "-" if r["proxy_cpu_us_per_req"] is None else f"{r['proxy_cpu_us_per_req']:,.0f}"]
        for r in rows], title)
    by_round = "\n".join(f"  {r['target']}: " + " ".join("-" if v is None else f"{v:.2f}" for v in r["ratio_per_round"])
                         for r in rows)
    return f"{table}\n\nx best by round:\n{by_round}" + report.background_note({r["target"]: r for r in rows})


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def available_clients(requested: Sequence[str]) -> list[str]:
    clients = []
    for c in requested:
        if c == "httpx-aiohttp" and importlib.util.find_spec("httpx_aiohttp") is None:
            print("skipping httpx-aiohttp: pip install httpx-aiohttp", file=sys.stderr)
            continue
        clients.append(c)
    return clients


# --------------------------------------------------------------------------- the command


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default=",".join(("aiohttp", "httpx-aiohttp", "httpx")),
                        help=f"comma-separated, from {', '.join(CLIENTS)}")
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each run, not measured")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the upstream's fixed latency")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--timeout", type=float, default=10.0, help="wrk counts a slower request as an error")
    parser.add_argument("--max-error-share", type=float, default=0.01,
                        help="a run with more failed requests than this share stops the benchmark")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="before each measured run, wait up to S seconds for the machine's CPUs to be idle")
    parser.add_argument("--no-direct", action="store_true", help="skip measuring the upstream directly")
    parser.add_argument("--out", type=Path, default=results_dir("out", "http-clients"), metavar="DIR",
                        help="where results.json and summary.txt go (default benchmarks/out/http-clients)")
    args = parser.parse_args(argv)
    unknown = set(args.clients.split(",")) - set(CLIENTS)
    if unknown:
        parser.error(f"unknown clients: {', '.join(sorted(unknown))}")
    if args.connections < 1 or args.duration <= 0 or args.rounds < 1 or args.threads < 1:
        parser.error("--connections, --duration, --rounds and --threads must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exe = wrk.find_wrk()
    if exe is None:
        print("wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2
    clients = available_clients(args.clients.split(","))
    targets = [*clients, *([] if args.no_direct else [DIRECT])]
    source = report.provenance(PROG, argv)
    machine = report.machine()
    load_generator, threads = wrk.wrk_version(exe), min(args.threads, args.connections)
    title = (f"{args.connections} connections, upstream {args.latency_ms:g} ms, {args.rounds} interleaved rounds of "
             f"{args.duration:g} s (+{args.warmup:g} s warm-up); {load_generator}, {threads} threads; "
             f"this machine: {machine['cpus']} cores")
    print(title, flush=True)
    started, t0 = datetime.now(UTC), time.monotonic()
    runs: list[Run] = []
    try:
        with Stack() as stack:
            upstream = start_upstream(stack, args.latency_ms)
            for round_ in range(1, args.rounds + 1):
                for target in rotation(targets, round_ - 1):
                    run = measure(stack, target, round_, upstream, args)
                    runs.append(run)
                    print(f"round {round_}  {target:<18} {run.rps:8,.0f} req/s  p50 {run.p50_ms:7.1f} ms  "
                          f"p99 {run.p99_ms:7.1f} ms  errors {run.errors}  other processes {run.background_cores:.2f} "
                          "cores", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; every process this run started has been stopped", file=sys.stderr)
        return 130
    except (ProcError, wrk.WrkError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1

    rows = summarize(runs, clients)
    text = format_summary(rows, title)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    report.write_json(args.out / "results.json", {
        "schema": SCHEMA, "command": source["command"], "git": source["git"],
        "started_at": started.isoformat(timespec="seconds"), "wall_s": round(time.monotonic() - t0, 1),
        "machine": machine, "packages": package_versions(), "load_generator": load_generator, "settings": settings,
        "summary": rows, "runs": [asdict(r) for r in runs], "table": text,
    })
    (args.out / "summary.txt").write_text(f"{source['command']}\n\n{text}\n")
    print(f"\n{text}\n\nwrote {args.out / 'results.json'} and summary.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
