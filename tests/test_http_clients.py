"""benchmarks/http_clients.py, the measurement behind benchmarks/HTTP_CLIENTS.md: its summary
(ratios to the best client, pooled and round by round), and (where wrk is installed) real
runs: the record it writes, and a run whose requests fail stopping it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import http_clients, wrk
from benchmarks.harness import Proc, Stack
from benchmarks.http_clients import DIRECT, Run, format_summary, summarize

needs_wrk = pytest.mark.skipif(wrk.find_wrk() is None, reason="wrk is not installed (apt-get install wrk)")


def run(target: str, round_: int, rps: float, cpu: float | None = 250.0, background: float = 0.1) -> Run:
    return Run(target, round_, rps, 50.0, 80.0, int(rps * 10), 0, 10.0, None if target == DIRECT else cpu, background)


def test_ratios_are_to_the_best_client_pooled_and_within_each_round() -> None:
    runs = [run("aiohttp", 1, 3000), run("httpx", 1, 1500), run(DIRECT, 1, 4500, background=0.5),
            run("httpx", 2, 1000), run(DIRECT, 2, 4000), run("aiohttp", 2, 2000)]
    rows = {r["target"]: r for r in summarize(runs, ["aiohttp", "httpx"])}
    assert list(rows) == ["aiohttp", "httpx", DIRECT]
    assert rows["aiohttp"]["rps"] == 2500 and rows["aiohttp"]["ratio_to_best_client"] == 1.0
    assert rows["httpx"]["ratio_to_best_client"] == 1250 / 2500
    # each round against that round's best client: the machine's state is shared within a round
    assert rows["httpx"]["ratio_per_round"] == [0.5, 0.5]
    assert rows[DIRECT]["ratio_per_round"] == [1.5, 2.0]  # the ceiling is no client: never the best
    assert rows[DIRECT]["proxy_cpu_us_per_req"] is None
    assert rows[DIRECT]["background_cores_rounds"] == [0.5, 0.1]


def test_a_client_not_measured_is_left_out() -> None:
    rows = summarize([run("aiohttp", 1, 3000), run(DIRECT, 1, 4500)], ["aiohttp", "httpx-aiohttp"])
    assert [r["target"] for r in rows] == ["aiohttp", DIRECT]


def test_the_summary_shows_rounds_ratios_and_the_machines_other_work() -> None:
    runs = [run("aiohttp", 1, 3138), run("httpx", 1, 79, cpu=12024), run(DIRECT, 1, 4695, background=0.8)]
    text = format_summary(summarize(runs, ["aiohttp", "httpx"]), "the title")
    lines = text.splitlines()
    assert lines[0] == "the title"
    httpx = next(line for line in lines if line.startswith("httpx "))
    assert httpx.split()[1:] == ["79", "79", "0.03", "50.0", "80.0", "0", "12,024"]
    assert next(line for line in lines if line.startswith(DIRECT)).endswith(" -")  # no proxy, no proxy CPU
    assert "  httpx: 0.03" in lines
    assert lines[-1].startswith("processes this run did not start used 0.10-0.80 cores")


def test_without_wrk_it_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(wrk, "find_wrk", lambda: None)
    assert http_clients.main(["--out", str(tmp_path)]) == 2
    assert "wrk not found" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@needs_wrk
def test_a_run_writes_its_record_with_the_command_and_rotated_rounds(tmp_path: Path) -> None:
    out = tmp_path / "http-clients"
    argv = ["--clients", "aiohttp", "--connections", "4", "--duration", "1", "--warmup", "0", "--rounds", "2",
            "--threads", "1", "--out", str(out)]
    assert http_clients.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "python -m benchmarks.http_clients " + " ".join(argv)
    assert "commit" in results["git"] and results["load_generator"].startswith("wrk")
    assert [(r["round"], r["target"]) for r in results["runs"]] == [(1, "aiohttp"), (1, DIRECT), (2, DIRECT),
                                                                     (2, "aiohttp")]
    for r in results["runs"]:
        assert r["requests"] > 0 and r["errors"] == 0 and r["p50_ms"] >= 50  # the upstream's latency
        assert (r["proxy_cpu_us_per_req"] is None) == (r["target"] == DIRECT)
    assert [row["target"] for row in results["summary"]] == ["aiohttp", DIRECT]
    summary = (out / "summary.txt").read_text()
    assert summary.startswith(results["command"] + "\n\n") and results["table"] in summary


@needs_wrk
def test_a_run_whose_requests_fail_stops_the_benchmark_and_its_proxy(tmp_path: Path) -> None:
    args = argparse.Namespace(connections=4, threads=1, timeout=5.0, duration=1.0, warmup=0.0, wait_quiet=0.0,
                              max_error_share=0.01)
    with Stack() as stack:
        closed = Proc("upstream", [], 9, tmp_path / "none.log")  # nothing listens there: every answer a 502
        with pytest.raises(wrk.WrkError, match="requests failed"):
            http_clients.measure(stack, "aiohttp", 1, closed, args)
        assert stack.procs == []  # the passthrough was stopped
