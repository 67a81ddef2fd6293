"""The processes a benchmark runs against: the upstream simulator, a bare passthrough, a bare
coalescing proxy (the floor), herd.

Each runs as a subprocess of its own on a free loopback port and is stopped when the
benchmark ends, normally, on an error, on Ctrl-C or on SIGTERM (and, on Linux, when this
process dies: the kernel sends them SIGTERM). Their output goes to a log file that is
shown when one fails to start.

    with Stack() as stack:
        sim = stack.simulator(ttft_ms=50)
        herd = stack.herd(sim.url, mode="exact")
        ... herd.url, herd.cpu_seconds(), herd.rss_bytes() ...
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

import orjson

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ProcError(RuntimeError):
    """A process did not start (the message includes the end of its log)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()  # Ctrl-C in the terminal reaches us; we stop the children ourselves
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def http_json(method: str, url: str, body: Any = None, timeout: float = 5.0) -> Any:
    """A small blocking JSON call (control endpoints only; never on a measured path)."""
    data = None if body is None else orjson.dumps(body)
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return orjson.loads(raw) if raw else None


def http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def _stat_cpu_seconds(path: str) -> float:
    """User + system CPU time from a /proc stat file (a process's or a thread's); 0.0 if unreadable."""
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class Proc:
    """One subprocess serving HTTP on ``port``."""

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

    def start(self, timeout: float = 30.0) -> Proc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=REPO_ROOT, env=env,
                                          preexec_fn=_die_with_parent)  # noqa: PLW1509 - only setsid and prctl
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
        p = self.popen
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(5)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (Linux /proc; 0.0 elsewhere)."""
        return _stat_cpu_seconds(f"/proc/{self.pid}/stat")

    def thread_cpu_seconds(self) -> tuple[float, float]:
        """CPU time so far of (the main thread, all other threads together): herd's event loop
        runs on its main thread, its embedding workers on others (Linux /proc; zeros elsewhere)."""
        main = others = 0.0
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return 0.0, 0.0
        for tid in tids:
            seconds = _stat_cpu_seconds(f"/proc/{self.pid}/task/{tid}/stat")  # 0.0: the thread ended meanwhile
            if int(tid) == self.pid:
                main += seconds
            else:
                others += seconds
        return main, others

    def rss_bytes(self) -> int:
        """Resident set size now (Linux /proc; 0 elsewhere)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


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


def to_toml(data: dict[str, Any]) -> str:
    """TOML for herd's config shape: tables of scalars, one level of named sub-tables, arrays of tables."""
    lines = ["# generated by herd bench"]
    for name, value in data.items():
        if isinstance(value, list):
            for item in value:
                lines += ["", f"[[{name}]]"] + [f"{k} = {_toml_value(v)}" for k, v in item.items()]
            continue
        scalars = {k: v for k, v in value.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in value.items() if isinstance(v, dict)}
        if scalars or not tables:
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
        for sub, table in tables.items():
            lines += ["", f"[{name}.{sub}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'server.access_log=false' -> (['server', 'access_log'], False); values are TOML (bare words: strings)."""
    import tomllib

    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise ValueError(f"expected SECTION.KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return [p.strip() for p in path.split(".")], value


def herd_config(upstream_url: str, mode: str, *, cache: bool = False, cache_entries: int = 10_000,
                request_timeout_s: float = 120.0, log_level: str = "info", overrides: list[str] | tuple = ()) -> str:
    """A herd TOML config: one OpenAI-compatible upstream (``upstream_url`` without /v1), open auth,
    herd's defaults otherwise; ``overrides`` ('SECTION.KEY=VALUE', e.g. 'server.access_log=false')
    are applied last."""
    data: dict[str, Any] = {
        "server": {"log_level": log_level, "request_timeout_s": request_timeout_s, "shutdown_grace_s": 1},
        "auth": {"mode": "open"},
        "upstreams": {"sim": {"kind": "openai", "base_url": upstream_url.rstrip("/") + "/v1",
                              "max_connections": 4096}},
        "routes": [{"model": "*", "upstream": "sim"}],
        "coalesce": {"mode": mode},
        "cache": {"enabled": cache, "max_entries": cache_entries},
    }
    for text in overrides:
        path, value = parse_override(text)
        table = data
        for key in path[:-1]:
            table = table.setdefault(key, {})
        table[path[-1]] = value
    return to_toml(data)


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

    def start(self, name: str, argv_for_port, ready_path: str | None = None, timeout: float = 30.0,
              tries: int = 3) -> Proc:
        """Start a process on a free port (``argv_for_port(port) -> argv``); a port taken
        between choosing and binding is retried with another."""
        last: Exception | None = None
        for _ in range(tries):
            port = free_port()
            proc = Proc(name, argv_for_port(port), port, self.dir / f"{name}.log", ready_path)
            self.procs.append(proc)
            try:
                return proc.start(timeout)
            except ProcError as e:
                last = e
                self.procs.remove(proc)
                if "address already in use" not in str(e).lower():
                    raise
        raise last  # type: ignore[misc]

    def simulator(self, **settings: Any) -> Proc:
        args = []
        for key, value in settings.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        return self.start("simulator", lambda port: [sys.executable, "-m", "benchmarks.simulator", "--port",
                                                     str(port), *args], ready_path="/health")

    def passthrough(self, upstream_url: str, client: str = "aiohttp") -> Proc:
        return self.start("passthrough", lambda port: [sys.executable, "-m", "benchmarks.passthrough", "--upstream",
                                                       upstream_url, "--port", str(port), "--client", client])

    def floor(self, upstream_url: str, server: str = "uvicorn") -> Proc:
        """The bare single-flight coalescing proxy (benchmarks/fanout_floor.py) on ``server``: uvicorn
        (an ASGI app) or raw (an asyncio.Protocol with httptools)."""
        name = "floor" if server == "uvicorn" else f"floor-{server}"
        return self.start(name, lambda port: [sys.executable, "-m", "benchmarks.fanout_floor", "--upstream",
                                              upstream_url, "--port", str(port), "--server", server],
                          ready_path="/health")

    def herd(self, upstream_url: str, mode: str = "exact", **config: Any) -> Proc:
        path = self.dir / f"herd-{mode}.toml"
        path.write_text(herd_config(upstream_url, mode, **config))
        timeout = 120.0 if mode == "semantic" else 30.0  # the embedder loads at start
        return self.start(f"herd-{mode}", lambda port: [sys.executable, "-m", "proxy", "serve", "--config",
                                                        str(path), "--port", str(port)],
                          ready_path="/healthz", timeout=timeout)


# --------------------------------------------------------------------------- upstream and herd counters


def sim_stats(sim_url: str) -> dict[str, Any] | None:
    """The simulator's counters, or None when ``sim_url`` is not a herd simulator."""
    try:
        return http_json("GET", sim_url + "/_sim/stats?log=0", timeout=5)
    except (OSError, ValueError):
        return None


def sim_reset(sim_url: str) -> bool:
    try:
        http_json("POST", sim_url + "/_sim/reset", timeout=5)
        return True
    except (OSError, ValueError):
        return False


def sim_settings(sim_url: str, **values: Any) -> None:
    http_json("POST", sim_url + "/_sim/settings", values, timeout=5)


def chat_calls(stats: dict[str, Any] | None) -> int | None:
    if stats is None:
        return None
    return int(stats.get("by_path", {}).get("/v1/chat/completions", 0))


def prometheus(url: str) -> dict[str, float] | None:
    """``/metrics`` of a herd as {'name{labels}': value}, or None if there is none."""
    try:
        text = http_text(url + "/metrics", timeout=5)
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


# --------------------------------------------------------------------------- profiling


def py_spy() -> str | None:
    """The py-spy executable (next to this Python, or on PATH), or None."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def start_profiler(pid: int, duration: float, path: Path, rate: int = 100) -> tuple[subprocess.Popen, Path] | None:
    """Sample `pid` with py-spy for `duration` seconds into `path` (collapsed stacks).

    py-spy pauses the process for each sample (its --nonblocking mode tears half of the
    coroutine stacks): this costs the profiled process a little throughput."""
    exe = py_spy()
    if exe is None:
        print("herd bench: --profile needs py-spy (pip install py-spy); not profiling", file=sys.stderr)
        return None
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(duration))), "--rate", str(rate),
            "--format", "raw", "--output", str(path)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    time.sleep(0.3)  # let it attach before the load starts
    return spy, path


def finish_profiler(handle: tuple[subprocess.Popen, Path] | None) -> dict[str, Any] | None:
    if handle is None:
        return None
    spy, path = handle
    try:
        _, err = spy.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        return None
    if spy.returncode != 0 or not path.exists():
        return {"error": (err or b"").decode(errors="replace").strip()[-500:]}
    from benchmarks.report import profile_summary

    return {"file": path.name, **profile_summary(path)}


# --------------------------------------------------------------------------- the machine's other work


def _cpu_times() -> list[int]:
    """The machine's CPU times since boot in clock ticks, from /proc/stat's first line: user nice
    system idle iowait irq softirq steal (Linux; zeros elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return [0] * 8
    return [int(v) for v in fields[1:9]]


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot: processes' time only (user, nice, system).
    irq and softirq are left out: the kernel's loopback networking for this benchmark's own
    traffic lands there, attributed to no process."""
    user, nice, system = _cpu_times()[:3]
    return (user + nice + system) / _CLK_TCK


def machine_idle_seconds() -> float:
    """CPU seconds all CPUs have spent idle (idle + iowait) since boot."""
    idle, iowait = _cpu_times()[3:5]
    return (idle + iowait) / _CLK_TCK


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def wait_for_quiet(max_wait: float, threshold_cores: float = 0.25, window: float = 1.0) -> float:
    """Wait (at most `max_wait` s) until the machine's CPUs are nearly idle for `window` s;
    returns the busy cores of the last window. Other people's jobs share these CPUs."""
    deadline = time.monotonic() + max_wait
    busy = 0.0
    while True:
        b0 = machine_busy_seconds()
        time.sleep(window)
        busy = (machine_busy_seconds() - b0) / window
        if busy <= threshold_cores or time.monotonic() >= deadline:
            return busy
