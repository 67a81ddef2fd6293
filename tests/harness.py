"""What the tests run against: the shared launchers and simulator controls of
benchmarks/harness.py, and `start_herd`, a herd process configured for one simulator."""

from __future__ import annotations

import subprocess
from pathlib import Path

from benchmarks.harness import (
    Herd,
    HerdServer,
    chat_calls,
    free_port,
    herd_settings,
    sim_faults,
    sim_reset,
    sim_stats,
    to_toml,
)

__all__ = ["HerdServer", "ManualClock", "chat_calls", "free_port", "herd_settings", "sim_faults", "sim_reset",
           "sim_stats", "start_herd"]


class ManualClock:
    """A clock for the caches (`Gateway(clock=...)`) that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def start_herd(tmp_path: Path, sim_url: str, extra: str = "") -> tuple[subprocess.Popen, str]:
    """herd as a real process (`python -m proxy serve`) on a free port, in front of the
    simulator at `sim_url`, with `extra` TOML appended to its config; returns (process, url).

    Its output goes to tmp_path / "herd.log"."""
    config = to_toml({
        "server": {"shutdown_grace_s": 10},
        "auth": {"mode": "open"},
        "upstreams": {"sim": {"base_url": f"{sim_url}/v1"}},
        "cache": {"enabled": False},
    })
    herd = Herd(config + "\n" + extra, tmp_path, log_path=tmp_path / "herd.log").start(timeout=120)  # a loaded machine
    assert herd.popen is not None
    return herd.popen, herd.url
