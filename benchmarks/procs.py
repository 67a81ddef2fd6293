"""What a benchmark reads about processes and the machine beside its load: herd's /metrics,
py-spy profiles of a process, and the CPU time the machine's other jobs use meanwhile.
(The processes themselves are started by benchmarks/harness.py.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import http_text

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


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
