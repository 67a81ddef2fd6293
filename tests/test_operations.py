"""Running herd like a real service: the `herd` command, SIGTERM, JSON logs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.simulator import expected_text
from tests.harness import chat_calls, sim_reset, start_herd

ROOT = Path(__file__).resolve().parents[1]


def _wait_for_waiters(url: str, n: int, deadline_s: float = 20.0) -> bool:
    """Until herd's /metrics shows `n` requests waiting on flights (False at the deadline)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        text = httpx.get(url + "/metrics", timeout=5).text
        line = next(line for line in text.splitlines() if line.startswith("herd_inflight_waiters "))
        if float(line.split()[1]) >= n:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_finishes_flights_in_progress_then_exits(tmp_path, sim):
    # a long first token, so the flight is still in progress when all 8 have joined it
    sim_reset(sim.url, ttft_ms=4000)
    proc, url = start_herd(tmp_path, sim.url)
    body = {"model": "m", "messages": [{"role": "user", "content": "finish me"}]}
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=30) for _ in range(8)]
        # SIGTERM once every request waits on the flight (a fixed sleep raced a loaded machine:
        # a request still connecting when the listener closed was refused)
        assert _wait_for_waiters(url, 8), "the 8 requests never all joined the flight"
        proc.send_signal(signal.SIGTERM)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 8
    assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {
        expected_text({"messages": body["messages"]})
    }
    # uvicorn re-raises the signal once it has shut down cleanly, as a process killed by it would
    assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    assert "herd stopped: every flight finished" in (tmp_path / "herd.log").read_text()
    assert chat_calls(sim.url) == 1
    # after SIGTERM, no new connections are accepted
    try:
        httpx.get(url + "/healthz", timeout=1)
        accepted = True
    except httpx.HTTPError:
        accepted = False
    assert not accepted


def test_logs_are_json_lines_without_secrets(tmp_path, sim):
    proc, url = start_herd(tmp_path, sim.url, extra='[upstreams.broken]\nbase_url = "http://127.0.0.1:9/v1"\n'
                           '[[routes]]\nmodel = "broken-*"\nupstream = "broken"\n'
                           '[[routes]]\nmodel = "*"\nupstream = "sim"\n')
    secret = "sk-very-secret-key-123"
    headers = {"authorization": f"Bearer {secret}"}
    httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
               headers=headers, timeout=10)
    r = httpx.post(url + "/v1/chat/completions",
                   json={"model": "broken-1", "messages": [{"role": "user", "content": "hi"}]}, headers=headers,
                   timeout=30)
    assert r.status_code == 502 and secret not in r.text
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    err = (tmp_path / "herd.log").read_text()
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "herd logged nothing"
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    assert secret not in err
    access = [e for e in entries if e["logger"] == "herd.access"]
    assert [(e["status"], e["role"], e["model"]) for e in access] == [(200, "leader", "m"), (502, "leader", "broken-1")]
    assert all(e["request_id"] and e["flight"] and e["tenant"].startswith("k:") for e in access)
    assert access[0]["ts"].endswith("Z") and access[0]["ms"] >= 0


def test_bad_config_exits_with_a_clear_message(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[upstreams.x]\nbase_url = "http://x/v1"\n[coalesce]\nmode = "maybe"\n')
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "coalesce.mode" in result.stderr and "Traceback" not in result.stderr


def test_herd_collects_garbage_less_often_once_started():
    # At CPython's default (700) the collector ran ~100 times a second at half load and cost
    # ~0.3 ms of p50 (benchmarks/RESULTS.md); herd raises the youngest generation's threshold.
    code = (
        "import gc\n"
        "from proxy.app import GC_YOUNG_THRESHOLD\n"
        "from tests.harness import HerdServer, herd_settings\n"
        "before = gc.get_threshold()[0]\n"
        "h = HerdServer(herd_settings('http://127.0.0.1:9')).start()\n"
        "print(before, gc.get_threshold()[0], GC_YOUNG_THRESHOLD)\n"
        "h.stop()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True)
    before, started, wanted = map(int, out.stdout.split())
    assert before == 700
    assert started == wanted >= 5_000
