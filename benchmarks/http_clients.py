"""Which HTTP client should herd use for upstream calls? Measure it.

A fixed-latency upstream (aiohttp.web, its own process) answers a small chat.completion
JSON after ``--latency-ms``. For each client, a bare passthrough (benchmarks.passthrough, its
own process, started fresh for every run) sits in front of it, and a load generator (wrk if
installed, else a closed-loop aiohttp generator in its own process) drives ``--connections``
for ``--duration`` seconds. Runs are interleaved over ``--rounds`` (the order rotates each
round), and the upstream is also measured directly, with no proxy, as the ceiling.

    python -m benchmarks.http_clients --connections 256 --duration 10 --rounds 2

Prints a table with ratios to the best client and writes JSON (``--json``). Every process
it starts is stopped on exit, Ctrl-C included. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.harness import free_port, results_dir, stat_cpu_seconds
from benchmarks.passthrough import CLIENTS
from benchmarks.report import provenance

HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
DIRECT = "direct (no proxy)"
REQUEST_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}'
COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20},
}
PACKAGES_ROOT = Path(__file__).resolve().parent.parent  # the folder holding the packages
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


# --------------------------------------------------------------------------- load generators


@dataclass
class Load:
    """What one load generator run measured."""

    ok: int  # 2xx responses
    errors: int  # other responses, connection errors and timeouts
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%s]]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('HERD_JSON {"ok":%%d,"errors":%%d,"us":%%d,"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests - e.status, e.connect + e.read + e.write + e.status + e.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(url: str, connections: int, duration: float, threads: int, procs: Processes) -> Load:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % REQUEST_BODY.decode())
    try:
        argv = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{max(1, round(duration))}s",
                f"--timeout={max(2, round(duration))}s", "-s", f.name, url]  # fmt: skip
        out = procs.run(argv, timeout=duration + 30)
    finally:
        os.unlink(f.name)
    line = next((ln for ln in out.splitlines() if ln.startswith("HERD_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    r = json.loads(line.removeprefix("HERD_JSON "))
    return Load(r["ok"], r["errors"], r["us"] / 1e6, r["p50_us"] / 1000, r["p99_us"] / 1000)


def loadgen_main(url: str, connections: int, duration: float) -> None:
    """A closed-loop generator (the body of its own process): ``connections`` workers, each
    sending the next request as soon as the last one answers. Prints one JSON line."""
    import aiohttp
    import uvloop

    async def drive() -> dict[str, float]:
        latencies: list[float] = []
        errors = 0
        connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0)
        headers = {"content-type": "application/json"}
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
            start = time.perf_counter()
            deadline = start + duration

            async def worker() -> None:
                nonlocal errors
                while (t0 := time.perf_counter()) < deadline:
                    try:
                        async with session.post(url, data=REQUEST_BODY, headers=headers) as r:
                            await r.read()
                            ok = r.status == 200
                    except (aiohttp.ClientError, OSError):
                        ok = False
                    if ok:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1

            await asyncio.gather(*(worker() for _ in range(connections)))
            elapsed = time.perf_counter() - start
        q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
        return {"ok": len(latencies), "errors": errors, "seconds": elapsed,
                "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}  # fmt: skip

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print("HERD_JSON " + json.dumps(runner.run(drive())), flush=True)


def run_loadgen(url: str, connections: int, duration: float, procs: Processes) -> Load:
    code = f"from benchmarks.http_clients import loadgen_main; loadgen_main({url!r}, {connections}, {duration})"
    out = procs.run([sys.executable, "-c", code], timeout=duration + 60)
    line = next((ln for ln in out.splitlines() if ln.startswith("HERD_JSON ")), None)
    if line is None:
        raise RuntimeError(f"load generator printed no result:\n{out}")
    return Load(**json.loads(line.removeprefix("HERD_JSON ")))


# --------------------------------------------------------------------------- processes


class Processes:
    """Every child process this benchmark starts; :meth:`stop_all` ends them all.

    Children get their own session, so a Ctrl-C reaches only this process, which then
    stops them in order (SIGTERM, then SIGKILL after a grace period)."""

    def __init__(self) -> None:
        self._live: list[subprocess.Popen[str]] = []

    def start(self, argv: Sequence[str], *, capture: bool) -> subprocess.Popen[str]:
        """Start ``argv``; with ``capture``, its output is piped (read it with communicate),
        else stdout is discarded and stderr goes to ours (a server never blocks on a pipe)."""
        path = os.pathsep.join(filter(None, [str(PACKAGES_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        out, err = (subprocess.PIPE, subprocess.STDOUT) if capture else (subprocess.DEVNULL, None)
        p = subprocess.Popen(argv, cwd=PACKAGES_ROOT, env=env, text=True, start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=out, stderr=err)  # fmt: skip
        self._live.append(p)
        return p

    def run(self, argv: Sequence[str], timeout: float) -> str:
        """Run to completion and return its output (stdout and stderr)."""
        p = self.start(argv, capture=True)
        try:
            out, _ = p.communicate(timeout=timeout)
        finally:
            self.stop(p)
        if p.returncode != 0:
            raise RuntimeError(f"{argv[0]} exited with {p.returncode}:\n{out}")
        return out

    def stop(self, p: subprocess.Popen[str], grace: float = 3.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if p.stdout is not None:
            p.stdout.close()
        if p in self._live:
            self._live.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self._live)):
            self.stop(p)

    @contextlib.contextmanager
    def serving(self, argv: Sequence[str], port: int) -> Iterator[subprocess.Popen[str]]:
        """Start a server and wait until ``port`` accepts connections; stop it afterwards."""
        p = self.start(argv, capture=False)
        try:
            wait_for_port(port, p)
            yield p
        finally:
            self.stop(p)


def wait_for_port(port: int, p: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"{p.args[0]} exited with {p.returncode} before listening on {port} "
                               "(see its stderr above)")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on {HOST}:{port} within {timeout:.0f}s")


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Run:
    target: str
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    ok: int
    errors: int
    seconds: float
    proxy_cpu_us_per_req: float | None


def measure(
    target: str, round_: int, upstream_port: int, args: argparse.Namespace, procs: Processes, use_wrk: bool
) -> Run:
    def drive(url: str, duration: float) -> Load:
        if use_wrk:
            return run_wrk(url, args.connections, duration, args.threads, procs)
        return run_loadgen(url, args.connections, duration, procs)

    if target == DIRECT:
        url = f"http://{HOST}:{upstream_port}{PATH}"
        if args.warmup > 0:
            drive(url, args.warmup)
        load, cpu = drive(url, args.duration), None
    else:
        port = free_port()
        argv = [sys.executable, "-m", "benchmarks.passthrough", "--upstream", f"http://{HOST}:{upstream_port}",
                "--port", str(port), "--client", target]  # fmt: skip
        with procs.serving(argv, port) as proxy:
            url = f"http://{HOST}:{port}{PATH}"
            if args.warmup > 0:
                drive(url, args.warmup)
            before = stat_cpu_seconds(f"/proc/{proxy.pid}/stat")
            load = drive(url, args.duration)
            after = stat_cpu_seconds(f"/proc/{proxy.pid}/stat")
        cpu = (after - before) / load.ok * 1e6 if after and load.ok else None  # 0.0: no /proc
    return Run(target, round_, load.rps, load.p50_ms, load.p99_ms, load.ok, load.errors, load.seconds, cpu)


def summarize(runs: list[Run], clients: Sequence[str]) -> list[dict[str, object]]:
    """Per target: the mean over rounds and its ratio to the best client's mean, plus the
    ratio within each round (side by side, so less exposed to a noisy machine)."""
    rows = []
    for target in [*clients, DIRECT]:
        mine = [r for r in runs if r.target == target]
        if not mine:
            continue
        cpus = [r.proxy_cpu_us_per_req for r in mine if r.proxy_cpu_us_per_req is not None]
        rows.append(
            {
                "target": target,
                "rps_per_round": [round(r.rps, 1) for r in mine],
                "rps": statistics.fmean(r.rps for r in mine),
                "p50_ms": statistics.fmean(r.p50_ms for r in mine),
                "p99_ms": statistics.fmean(r.p99_ms for r in mine),
                "errors": sum(r.errors for r in mine),
                "proxy_cpu_us_per_req": statistics.fmean(cpus) if cpus else None,
            }
        )
    best = max((row["rps"] for row in rows if row["target"] != DIRECT), default=0.0)
    best_in_round = {
        n: max((r.rps for r in runs if r.round == n and r.target != DIRECT), default=0.0)
        for n in {r.round for r in runs}
    }
    for row in rows:
        row["ratio_to_best_client"] = row["rps"] / best if best else None
        row["ratio_per_round"] = [
            round(r.rps / best_in_round[r.round], 3) if best_in_round[r.round] else None
            for r in runs
            if r.target == row["target"]
        ]
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    header = ["target", "req/s (per round)", "req/s", "x best", "p50 ms", "p99 ms", "errors", "proxy CPU us/req"]
    lines = [header]
    for r in rows:
        cpu = r["proxy_cpu_us_per_req"]
        lines.append(
            [
                str(r["target"]),
                " / ".join(f"{x:,.0f}" for x in r["rps_per_round"]),
                f"{r['rps']:,.0f}",
                f"{r['ratio_to_best_client']:.2f}" if r["ratio_to_best_client"] is not None else "-",
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                str(r["errors"]),
                "-" if cpu is None else f"{cpu:,.0f}",
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(lines[0]), rule, *(fmt(row) for row in lines[1:])])


def machine_info(use_wrk: bool) -> dict[str, object]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    wrk = None
    if use_wrk:
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
        wrk = out.split(" [")[0].strip() or None
    return {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "load_generator": wrk or "aiohttp closed loop (benchmarks.http_clients)",
    }


def available_clients(requested: Sequence[str]) -> list[str]:
    clients = []
    for c in requested:
        if c == "httpx-aiohttp" and importlib.util.find_spec("httpx_aiohttp") is None:
            print("skipping httpx-aiohttp: pip install httpx-aiohttp", file=sys.stderr)
            continue
        clients.append(c)
    return clients


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_clients", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default=",".join(("aiohttp", "httpx-aiohttp", "httpx")),
                        help=f"comma-separated, from {', '.join(CLIENTS)}")  # fmt: skip
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each run, not measured")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the upstream's fixed latency")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--load-generator", choices=("auto", "wrk", "aiohttp"), default="auto")
    parser.add_argument("--no-direct", action="store_true", help="skip measuring the upstream directly")
    parser.add_argument("--json", type=Path, default=results_dir("out", "http_clients.json"))
    args = parser.parse_args(argv)
    unknown = set(args.clients.split(",")) - set(CLIENTS)
    if unknown:
        parser.error(f"unknown clients: {', '.join(sorted(unknown))}")
    if args.connections < 1 or args.duration <= 0 or args.rounds < 1:
        parser.error("--connections, --duration and --rounds must be positive")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load_generator == "wrk" and shutil.which("wrk") is None:
        print("wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2
    use_wrk = args.load_generator == "wrk" or (args.load_generator == "auto" and shutil.which("wrk") is not None)
    clients = available_clients(args.clients.split(","))
    targets = [*clients, *([] if args.no_direct else [DIRECT])]
    info = machine_info(use_wrk)
    print(f"load generator: {info['load_generator']}; {args.connections} connections, {args.duration:g}s runs "
          f"(+{args.warmup:g}s warmup), {args.rounds} rounds, upstream latency {args.latency_ms:g} ms, "
          f"{info['nproc']} CPUs", flush=True)  # fmt: skip

    # A SIGTERM ends the run like Ctrl-C does, so the finally below stops every child.
    signal.signal(signal.SIGTERM, _interrupt)
    procs = Processes()
    runs: list[Run] = []
    try:
        upstream_port = free_port()
        code = f"from benchmarks.http_clients import serve_upstream; serve_upstream({upstream_port}, {args.latency_ms})"
        with procs.serving([sys.executable, "-c", code], upstream_port):
            for round_ in range(1, args.rounds + 1):
                shift = (round_ - 1) % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    run = measure(target, round_, upstream_port, args, procs, use_wrk)
                    runs.append(run)
                    print(f"round {round_}  {target:<18} {run.rps:8,.0f} req/s  p50 {run.p50_ms:7.1f} ms  "
                          f"p99 {run.p99_ms:7.1f} ms  errors {run.errors}", flush=True)  # fmt: skip
    except KeyboardInterrupt:
        print("\ninterrupted; stopping child processes", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()

    rows = summarize(runs, clients)
    print()
    print(format_table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {**provenance("python -m benchmarks.http_clients", argv), "config": config, "machine": info,
              "summary": rows, "runs": [asdict(r) for r in runs]}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
