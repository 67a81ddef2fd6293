"""Dev-only helpers that the tests and the benchmarks share: free loopback ports, TOML for
herd's configs, the simulator's control endpoints, and launchers for what they run against
(the simulator, herd in a thread or as processes, redis-server standalone or as a cluster).

Shipped with the benchmarks (which use it), so nothing here imports the tests. Every
process is started on a free loopback port, logs to a file (shown when it fails to start)
and is stopped by its owner; a `Stack` stops every process it started on exit, on Ctrl-C
and on SIGTERM (and, on Linux, the kernel sends them SIGTERM when this process dies).

    with Stack() as stack:
        sim = stack.simulator(ttft_ms=50)
        herd = stack.herd(sim.url, mode="exact")
        ... herd.url, herd.cpu_seconds(), herd.rss_bytes() ...
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import orjson
import redis

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.gateway import Gateway

HOST = "127.0.0.1"
# the folder holding the proxy and benchmarks packages (the repository, or site-packages)
_PACKAGES_ROOT = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def checkout_root() -> Path | None:
    """The herd source checkout these packages run from; None when they are installed (a
    wheel in site-packages), which holds no results and no commit."""
    root = _PACKAGES_ROOT
    return root if (root / ".git").exists() and (root / "pyproject.toml").is_file() else None


def results_dir(*parts: str) -> Path:
    """Where a benchmark writes unless told: benchmarks/PARTS in a checkout, else
    ./herd-bench/PARTS in the current directory."""
    root = checkout_root()
    return (root / "benchmarks" if root is not None else Path.cwd() / "herd-bench").joinpath(*parts)


def free_port(also_free: int | None = None) -> int:
    """A free loopback port; with `also_free`, port + also_free is free too (a Redis cluster bus)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if also_free is None:
            return port
        if port + also_free >= 65536:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port + also_free))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port found")


# --------------------------------------------------------------------------- configs


def to_toml(data: dict[str, Any]) -> str:
    """Just enough TOML for herd's configs: tables, nested tables, arrays of tables, scalars, lists."""
    lines: list[str] = []

    def table(name: str, body: dict[str, Any], header: str) -> None:
        lines.append(header)
        nested = [(k, v) for k, v in body.items() if isinstance(v, dict)]
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in body.items() if not isinstance(v, dict))
        lines.append("")
        for k, v in nested:
            table(f"{name}.{k}", v, f"[{name}.{k}]")

    for name, body in data.items():
        if isinstance(body, list):
            for item in body:
                table(name, item, f"[[{name}]]")
        else:
            table(name, body, f"[{name}]")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return orjson.dumps(v).decode()  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'server.access_log=false' -> (['server', 'access_log'], False); values are TOML (bare words: strings)."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise ValueError(f"expected SECTION.KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return [p.strip() for p in path.split(".")], value


def herd_config(upstream_url: str, mode: str, *, cache: bool = False, cache_entries: int = 10_000,
                request_timeout_s: float = 120.0, log_level: str = "info",
                overrides: list[str] | tuple[str, ...] = (), anthropic: bool = False) -> dict[str, Any]:
    """A benchmark's herd config: one OpenAI-compatible upstream (``upstream_url`` without /v1),
    open auth, herd's defaults otherwise; ``overrides`` ('SECTION.KEY=VALUE', e.g.
    'server.access_log=false') are applied last. ``anthropic``: the same upstream is also an
    Anthropic one, for the models named claude-*."""
    data: dict[str, Any] = {
        "server": {"log_level": log_level, "request_timeout_s": request_timeout_s, "shutdown_grace_s": 1},
        "auth": {"mode": "open"},
        "upstreams": {"sim": {"kind": "openai", "base_url": upstream_url.rstrip("/") + "/v1",
                              "max_connections": 4096}},
        "routes": [{"model": "*", "upstream": "sim"}],
        "coalesce": {"mode": mode},
        "cache": {"enabled": cache, "max_entries": cache_entries},
    }
    if anthropic:
        data["upstreams"]["claude"] = {"kind": "anthropic", "base_url": upstream_url.rstrip("/"),
                                       "max_connections": 4096}
        data["routes"] = [{"model": "claude-*", "upstream": "claude"}, *data["routes"]]
    for text in overrides:
        path, value = parse_override(text)
        table = data
        for key in path[:-1]:
            table = table.setdefault(key, {})
        table[path[-1]] = value
    return data


def herd_settings(upstream_url: str, **sections: Any) -> Settings:
    """Settings for one OpenAI-compatible upstream at `upstream_url` (+ any sections to merge),
    for a herd in this process (`HerdServer`)."""
    from proxy.config import parse_settings

    data: dict[str, Any] = {
        # no retries by default: a test of the core sees each upstream failure as it happens
        "upstreams": {"sim": {"kind": "openai", "base_url": upstream_url + "/v1", "retries": 0}},
        "routes": [{"model": "*", "upstream": "sim"}],
        "cache": {"enabled": False},  # tests of coalescing must not be answered from the cache
    }
    for name, table in sections.items():
        if isinstance(table, dict) and isinstance(data.get(name), dict):
            merged = dict(data[name])
            for k, v in table.items():
                merged[k] = {**merged.get(k, {}), **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
            data[name] = merged
        else:
            data[name] = table
    return parse_settings(data, env={})


# --------------------------------------------------------------------------- the simulator's controls


def http_json(method: str, url: str, body: Any = None, timeout: float = 10.0) -> Any:
    """A small blocking JSON call (control endpoints only; never on a measured path)."""
    data = None if body is None else orjson.dumps(body)
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return orjson.loads(raw) if raw else None


def http_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def sim_stats(sim_url: str, log: bool = True) -> dict[str, Any]:
    """The simulator's counters (with its request log unless `log` is false)."""
    return http_json("GET", sim_url + "/_sim/stats" + ("" if log else "?log=0"))


def sim_reset(sim_url: str, **settings: Any) -> None:
    """Zero the simulator's counters and clear its faults; then apply `settings`, if any."""
    http_json("POST", sim_url + "/_sim/reset")
    if settings:
        sim_settings(sim_url, **settings)


def sim_settings(sim_url: str, **values: Any) -> None:
    http_json("POST", sim_url + "/_sim/settings", values)


def sim_faults(sim_url: str, *faults: dict[str, Any]) -> None:
    http_json("POST", sim_url + "/_sim/faults", list(faults))


def chat_calls(sim_url: str) -> int:
    """Chat completion calls the simulator has answered since its last reset."""
    return int(sim_stats(sim_url, log=False)["by_path"].get("/v1/chat/completions", 0))


# --------------------------------------------------------------------------- processes


class ProcError(RuntimeError):
    """A process did not start (the message includes the end of its log)."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()  # Ctrl-C in the terminal reaches us; we stop the children ourselves
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` now (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """The highest resident memory of process `pid` while the block runs, sampled every
    `every_s` seconds in a thread; `on_sample(rss)` sees each sample (and may stop a run
    that grows too big)."""

    def __init__(self, pid: int, every_s: float = 0.05, on_sample: Callable[[int], None] | None = None) -> None:
        self.pid = pid
        self.every_s = every_s
        self.peak = rss_bytes(pid)
        self.on_sample = on_sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss")

    def _sample(self) -> None:
        rss = rss_bytes(self.pid)
        self.peak = max(self.peak, rss)
        if self.on_sample is not None:
            self.on_sample(rss)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


def stat_cpu_seconds(path: str) -> float:
    """User + system CPU time from a /proc stat file (a process's or a thread's); 0.0 if unreadable."""
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def descendants(pid: int) -> list[int]:
    """The living processes below `pid` (children, their children, ...), from /proc's parent ids."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # it ended meanwhile
        children.setdefault(parent, []).append(int(entry))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class Proc:
    """One subprocess serving HTTP on ``port``, its output in ``log_path``."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path, ready_path: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.ready_path = ready_path
        self.env = env
        self.popen: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, timeout: float = 30.0) -> Self:
        return self.launch().wait_ready(timeout)

    def launch(self) -> Self:
        """Start the process; `wait_ready` waits until it serves."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGES_ROOT), env.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, preexec_fn=_die_with_parent)  # only setsid and prctl
        return self

    def wait_ready(self, timeout: float = 30.0) -> Self:
        assert self.popen is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise ProcError(f"{self.name} exited with status {self.popen.returncode}:\n{self.log_tail()}")
            if self._ready():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ProcError(f"{self.name} was not ready after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5):
                pass
        except OSError:
            return False
        if self.ready_path is None:
            return True
        try:
            with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as resp:
                return resp.status < 500
        except urllib.error.HTTPError as e:
            return e.code < 500
        except OSError:
            return False

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        p = self.popen
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as if the machine died."""
        p = self.popen
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(10)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the process and of every process below it (herd's
        workers, with [server] workers = N) (Linux /proc; 0.0 elsewhere)."""
        return stat_cpu_seconds(f"/proc/{self.pid}/stat") + sum(
            stat_cpu_seconds(f"/proc/{pid}/stat") for pid in descendants(self.pid))

    def thread_cpu_seconds(self) -> tuple[float, float]:
        """CPU time so far of (the main thread, all other threads together): herd's event loop
        runs on its main thread, its embedding workers on others (Linux /proc; zeros elsewhere)."""
        main = others = 0.0
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return 0.0, 0.0
        for tid in tids:
            seconds = stat_cpu_seconds(f"/proc/{self.pid}/task/{tid}/stat")  # 0.0: the thread ended meanwhile
            if int(tid) == self.pid:
                main += seconds
            else:
                others += seconds
        return main, others

    def rss_bytes(self) -> int:
        """Resident set size now (Linux /proc; 0 elsewhere)."""
        return rss_bytes(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Herd(Proc):
    """herd as a process (`python -m proxy serve --config F --port P`)."""

    def __init__(self, config: dict[str, Any] | str, workdir: Path, name: str = "herd", port: int | None = None,
                 log_path: Path | None = None) -> None:
        port = port or free_port()
        self.config = config  # what it was started with
        path = workdir / f"{name}-{port}.toml"
        path.write_text(config if isinstance(config, str) else to_toml(config))
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", str(port)]
        super().__init__(name, argv, port, log_path or workdir / f"{name}-{port}.log", ready_path="/healthz")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (herd finishes its flights first), then SIGKILL after `grace` seconds."""
        super().stop(grace)

    def ready(self) -> dict[str, Any]:
        """herd's /readyz answer."""
        try:
            return http_json("GET", self.url + "/readyz", timeout=5)
        except urllib.error.HTTPError as e:  # 503 while degraded, with the same JSON body
            return orjson.loads(e.read())

    def metrics(self) -> str:
        """herd's /metrics text."""
        return http_text(self.url + "/metrics", timeout=5)


def simulator_argv(port: int, **settings: Any) -> list[str]:
    args = [sys.executable, "-m", "benchmarks.simulator", "--port", str(port)]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def start_replicas(count: int, sections: dict[str, Any], workdir: Path) -> list[Herd]:
    """`count` herd processes with the same config, started side by side (their owner stops them)."""
    replicas = [Herd(sections, workdir) for _ in range(count)]
    try:
        for r in replicas:
            r.launch()
        for r in replicas:
            r.wait_ready()
    except BaseException:
        for r in replicas:
            r.kill()
        raise
    return replicas


class Stack:
    """Starts processes and stops every one of them on exit (also on Ctrl-C and SIGTERM)."""

    def __init__(self, keep_dir: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="herd-bench-"))
        self.procs: list[Proc] = []
        self._keep_dir = keep_dir
        self._old_term: Any = None

    def __enter__(self) -> Self:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            self._old_term = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_term(self, signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()
        if self._old_term is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None
        if not self._keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, make: Callable[[int], Proc], timeout: float = 30.0, tries: int = 3) -> Proc:
        """Start ``make(port)`` on a free port; a port taken between choosing and binding is
        retried with another."""
        last: Exception | None = None
        for _ in range(tries):
            proc = make(free_port())
            self.procs.append(proc)
            try:
                return proc.start(timeout)
            except ProcError as e:
                last = e
                self.procs.remove(proc)
                if "address already in use" not in str(e).lower():
                    raise
        assert last is not None
        raise last

    def _proc(self, name: str, argv_for_port: Callable[[int], list[str]], ready_path: str | None = None,
              timeout: float = 30.0) -> Proc:
        return self.start(lambda port: Proc(name, argv_for_port(port), port, self.dir / f"{name}.log", ready_path),
                          timeout)

    def simulator(self, **settings: Any) -> Proc:
        return self._proc("simulator", lambda port: simulator_argv(port, **settings), ready_path="/health")

    def passthrough(self, upstream_url: str, client: str = "aiohttp") -> Proc:
        return self._proc("passthrough", lambda port: [sys.executable, "-m", "benchmarks.passthrough", "--upstream",
                                                       upstream_url, "--port", str(port), "--client", client])

    def floor(self, upstream_url: str, server: str = "uvicorn") -> Proc:
        """The bare single-flight coalescing proxy (benchmarks/fanout_floor.py) on ``server``: uvicorn
        (an ASGI app) or raw (an asyncio.Protocol with httptools)."""
        name = "floor" if server == "uvicorn" else f"floor-{server}"
        return self._proc(name, lambda port: [sys.executable, "-m", "benchmarks.fanout_floor", "--upstream",
                                              upstream_url, "--port", str(port), "--server", server],
                          ready_path="/health")

    def herd(self, upstream_url: str, mode: str = "exact", **config: Any) -> Herd:
        """herd in coalescing `mode` in front of `upstream_url` (`herd_config`'s keywords)."""
        data = herd_config(upstream_url, mode, **config)
        timeout = 120.0 if mode == "semantic" else 30.0  # the embedder loads at start
        name = f"herd-{mode}"
        proc = self.start(lambda port: Herd(data, self.dir, name, port, self.dir / f"{name}.log"), timeout)
        assert isinstance(proc, Herd)
        return proc


# --------------------------------------------------------------------------- herd in this process


class HerdServer:
    """herd for real on a free loopback port, in a thread of its own with its own event loop
    (its gateway built by the app from `settings`, or the one given)."""

    def __init__(self, settings: Settings, gateway: Gateway | None = None) -> None:
        import uvicorn

        from proxy.app import create_app
        from proxy.cli import listen_socket

        self.settings = settings
        self.app = create_app(settings, gateway)
        self.gateway = self.app.state.gateway
        self._sock = listen_socket(HOST, 0, settings.server.send_buffer_bytes)  # as `herd serve` listens
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        config = uvicorn.Config(self.app, loop="asyncio", http="httptools", log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=5, backlog=2048)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="herd")

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self._sock]))

    def start(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("herd did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on herd's own loop and return its result (for inspecting state)."""
        assert self.loop is not None
        done = threading.Event()
        box: list[Any] = []
        self.loop.call_soon_threadsafe(lambda: (box.append(fn(*args)), done.set()))
        if not done.wait(30):
            raise TimeoutError("herd's event loop did not run the call within 30 s")
        return box[0]

    @property
    def flights(self) -> int:
        return self.call(lambda: len(self.gateway.group))


# --------------------------------------------------------------------------- redis-server


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install redis-server)")
    return path


class RedisServer:
    """One redis-server on 127.0.0.1:<port>, no persistence and no config file; stop() and
    start() again on the same port."""

    def __init__(self, port: int | None = None, *, cluster: bool = False, workdir: Path | None = None) -> None:
        self.cluster = cluster
        self.port = port or free_port(10000 if cluster else None)
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="herd-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> Self:
        args = [
            _binary("redis-server"),
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.dir / f"redis-{self.port}.log"),
        ]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf",
                     "--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server on port {self.port} exited: {err}")
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer")
            time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5)

    def stop(self) -> None:
        """Kill the server (its data goes with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a slow Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        """Start it, unless `start()` already did (`with RedisServer().start() as r:`)."""
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisCluster:
    """Cluster-enabled redis-servers joined as a cluster of masters (no replicas)."""

    def __init__(self, masters: int = 3) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="herd-redis-cluster-"))
        self.nodes: list[RedisServer] = []
        ports: set[int] = set()
        while len(ports) < masters:
            ports.add(free_port(10000))
        for port in sorted(ports):
            workdir = self.dir / str(port)
            workdir.mkdir()
            self.nodes.append(RedisServer(port, cluster=True, workdir=workdir))

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> Self:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"{HOST}:{n.port}" for n in self.nodes]
            result = subprocess.run(
                [_binary("redis-cli"), "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, timeout=60,
            )
            if result.returncode != 0:
                raise RuntimeError("redis-cli --cluster create failed: "
                                   f"{result.stdout.decode()} {result.stderr.decode()}")
            self._wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = [n.client().execute_command("CLUSTER INFO") for n in self.nodes]
            if all(i.get("cluster_state") == "ok" and int(i.get("cluster_known_nodes", 0)) == len(self.nodes)
                   for i in infos):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis cluster did not reach cluster_state:ok")

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host=HOST, port=self.nodes[0].port, socket_timeout=5)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
