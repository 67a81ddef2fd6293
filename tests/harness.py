"""Run herd for real, on a free loopback port, in a thread of its own with its own loop."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import uvicorn

from proxy.app import create_app
from proxy.config import Settings, parse_settings


def herd_settings(upstream_url: str, **sections: Any) -> Settings:
    """Settings for one OpenAI-compatible upstream at `upstream_url` (+ any sections to merge)."""
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


class HerdServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.gateway = self.app.state.gateway
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, loop="asyncio", http="httptools", log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=5, backlog=2048)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="herd")

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self._sock]))

    def start(self) -> "HerdServer":
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

    def __enter__(self) -> "HerdServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn, *args):
        """Run `fn(*args)` on herd's own loop and return its result (for inspecting state)."""
        done = threading.Event()
        box: list = []
        self.loop.call_soon_threadsafe(lambda: (box.append(fn(*args)), done.set()))
        done.wait(5)
        return box[0]

    @property
    def flights(self) -> int:
        return self.call(lambda: len(self.gateway.group))


def sim_stats(sim_url: str) -> dict:
    return httpx.get(sim_url + "/_sim/stats", timeout=10).json()


def sim_reset(sim_url: str, **settings: Any) -> None:
    httpx.post(sim_url + "/_sim/reset", timeout=10).raise_for_status()
    if settings:
        httpx.post(sim_url + "/_sim/settings", json=settings, timeout=10).raise_for_status()


def sim_faults(sim_url: str, *faults: dict) -> None:
    httpx.post(sim_url + "/_sim/faults", json=list(faults), timeout=10).raise_for_status()


def chat_calls(sim_url: str) -> int:
    return sim_stats(sim_url)["by_path"].get("/v1/chat/completions", 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_herd(tmp_path, sim_url: str, extra: str = "") -> tuple[subprocess.Popen, str]:
    """herd as a real process (`python -m proxy serve`) on a free port; returns (process, url).

    Its logs go to tmp_path / "herd.log"."""
    port = free_port()
    config = tmp_path / "herd.toml"
    config.write_text(
        f"""
[server]
port = {port}
shutdown_grace_s = 10
[auth]
mode = "open"
[upstreams.sim]
base_url = "{sim_url}/v1"
[cache]
enabled = false
{extra}
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "herd.log").open("w"),  # a file: a pipe nobody reads would fill up
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("herd did not start: " + (tmp_path / "herd.log").read_text())
