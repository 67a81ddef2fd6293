"""`herd bench`: a tiny run writes its table, JSON and plots; workloads are reproducible."""

from __future__ import annotations

import itertools
import json
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import workloads
from benchmarks.loadgen import Load, chat_url
from benchmarks.report import histogram_quantiles, table

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_dist(d: dict) -> None:
    assert 0 < d["p50"] <= d["p90"] <= d["p95"] <= d["p99"] <= d["max"]


def test_tiny_compare_writes_table_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_bench("compare", "--quick", "--workload", "bursts", "--burst", "10", "--concurrency", "20",
                     "--duration", "1", "--warmup", "0.2", "--targets", "direct,off,exact", "--ttft-ms", "30",
                     "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the table went to stdout
    assert "throughput: 20 connections" in proc.stdout
    for word in ("req/s", "upstream", "merged", "p50 ms", "p99 ms", "herd-exact", "herd-off", "direct"):
        assert word in proc.stdout
    assert (out / "summary.txt").read_text().count("herd-exact") >= 2

    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "herd-bench/1"
    assert results["scenario"] == "compare"
    assert results["command"].startswith("herd bench compare")
    (phase,) = results["phases"]
    assert phase["load"]["concurrency"] == 20
    targets = phase["targets"]
    assert set(targets) == {"direct", "herd-off", "herd-exact"}
    for name, t in targets.items():
        assert t["requests"] > 20, name
        assert t["errors"] == 0, (name, t["error_kinds"])
        assert t["req_per_s"] > 0
        check_dist(t["latency_ms"])
        assert t["latency_ms"]["p50"] >= 30  # the upstream's own delay
        assert t["upstream_calls"] is not None
    # direct: every request is an upstream call; herd-off passes everything through
    assert targets["direct"]["upstream_calls"] == targets["direct"]["requests"]
    assert targets["herd-off"]["upstream_calls"] == targets["herd-off"]["requests"]
    assert targets["herd-off"]["roles"] == {"bypass": targets["herd-off"]["requests"]}
    # bursts of 10 identical requests: herd-exact merges most of them
    exact = targets["herd-exact"]
    assert exact["upstream_calls"] < exact["requests"] / 2
    assert exact["coalesce_ratio"] > 0.5
    assert exact["roles"]["follower"] > 0 and exact["roles"]["leader"] == exact["upstream_calls"]
    assert exact["cpu_ms_per_req"]["target"] > 0
    assert exact["vs"]["req_per_s_vs_direct"] > 0

    for name in ("latency_over_time.png", "latency_cdf.png", "upstream_calls.png"):
        assert name in results["plots"]
        assert png_size(out / name) == (800, 500)


def test_tiny_burst_makes_one_upstream_call(tmp_path: Path) -> None:
    out = tmp_path / "burst"
    proc = run_bench("burst", "-n", "40", "--rounds", "1", "--targets", "exact", "--ttft-ms", "300",
                     "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "upstream calls per burst" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    herd = results["phases"][0]["targets"]["herd-exact"]
    assert herd["requests"] == 40 and herd["errors"] == 0
    assert herd["upstream_calls_per_burst"] == [1]
    assert herd["follower_after_leader_ms"]["n"] == 39
    assert results["checks"][0]["met"] is True
    assert png_size(out / "burst_lag.png") == (800, 500)


def test_tiny_responses_fanout_makes_one_upstream_call_and_checks_every_client(tmp_path: Path) -> None:
    out = tmp_path / "responses"
    proc = run_bench("responses", "-n", "30", "--rounds", "1", "--targets", "direct,exact", "--ttft-ms", "200",
                     "--tokens-per-s", "100", "--reply-tokens", "10", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    targets = json.loads((out / "results.json").read_text())["phases"][0]["targets"]
    assert targets["direct"]["upstream_calls_per_round"] == [30]
    herd = targets["herd-exact"]
    assert herd["upstream_calls_per_round"] == [1] and herd["wrong_or_missing"] == 0
    assert herd["stream_first_event_ms"]["n"] == 15 and herd["json_done_ms"]["n"] == 15


def test_tiny_messages_bench_makes_one_upstream_call_per_route_and_checks_every_client(tmp_path: Path) -> None:
    out = tmp_path / "messages"
    proc = run_bench("messages", "-n", "20", "--rounds", "1", "--targets", "direct,exact", "--ttft-ms", "200",
                     "--tokens-per-s", "100", "--reply-tokens", "10", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    targets = json.loads((out / "results.json").read_text())["phases"][0]["targets"]
    assert targets["direct claude-3-5-haiku-latest"]["upstream_calls_per_round"] == [20]
    for model in ("claude-3-5-haiku-latest", "gpt-4o-mini"):
        herd = targets[f"herd-exact {model}"]
        assert herd["upstream_calls_per_round"] == [1] and herd["wrong_or_missing"] == 0
        assert herd["stream_first_event_ms"]["n"] == 10 and herd["json_done_ms"]["n"] == 10


def test_tiny_embeddings_ingest_embeds_each_distinct_chunk_once(tmp_path: Path) -> None:
    out = tmp_path / "embeddings"
    proc = run_bench("embeddings", "--workers", "4", "--batches", "12", "--batch", "16", "--chunks", "60",
                     "--rounds", "1", "--dim", "16", "--targets", "direct,exact", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    targets = json.loads((out / "results.json").read_text())["phases"][0]["targets"]
    for fmt in ("float", "base64"):
        direct, herd = targets[f"direct {fmt} r1"], targets[f"herd-exact {fmt} r1"]
        assert direct["inputs_embedded"] == direct["inputs_sent"] == 12 * 16
        assert herd["inputs_embedded"] == herd["distinct_inputs"] < herd["inputs_sent"]
        assert herd["wrong"] == herd["failed"] == direct["wrong"] == 0


def test_tiny_burst_and_fanout_measure_the_floor_after_its_leader(tmp_path: Path) -> None:
    out = tmp_path / "burst"
    proc = run_bench("burst", "-n", "40", "--rounds", "1", "--targets", "floor,exact", "--ttft-ms", "300",
                     "--no-progress", "--no-plots", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    floor = results["phases"][0]["targets"]["floor"]
    assert floor["requests"] == 40 and floor["errors"] == 0
    assert floor["upstream_calls_per_burst"] == [1] and floor["leaders_per_burst"] == [1]
    assert floor["follower_after_leader_ms"]["n"] == 39
    assert [c["name"] for c in results["checks"]][-1] == "burst of 40: herd over the floor"

    out = tmp_path / "fanout"
    proc = run_bench("fanout", "-n", "20", "--rounds", "1", "--targets", "direct,floor,exact", "--ttft-ms", "100",
                     "--tokens-per-s", "50", "--reply-tokens", "5", "--no-progress", "--no-plots", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    floor = results["phases"][0]["targets"]["floor"]
    assert floor["requests"] == 20 and floor["errors"] == 0 and floor["upstream_calls_per_round"] == [1]
    assert "itl_p99_added_ms_vs_floor" in results["phases"][0]["targets"]["herd-exact"]["vs"]
    assert results["checks"][-1]["name"] == "20 stream subscribers: herd over the floor"


@pytest.mark.parametrize("server", ["uvicorn", "raw"])
def test_floor_makes_one_upstream_call_per_flight(server: str) -> None:
    """benchmarks/fanout_floor.py, on either server: concurrent identical requests share one upstream call and
    get the same answer (a stream: the same bytes); a request after the flight's end makes a new call."""
    import asyncio

    import aiohttp

    from benchmarks.harness import Stack, chat_calls, sim_reset

    n = 50

    async def burst(url: str, stream: bool, count: int) -> list[tuple[int, str, str, bytes]]:
        body = json.dumps({"model": "m", "stream": stream,
                           "messages": [{"role": "user", "content": f"floor {stream}"}]}).encode()

        async def one(session: aiohttp.ClientSession) -> tuple[int, str, str, bytes]:
            async with session.post(url + "/v1/chat/completions", data=body,
                                    headers={"content-type": "application/json"}) as r:
                return r.status, r.headers["x-herd"], r.headers["content-type"], await r.read()

        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*[one(session) for _ in range(count)])

    with Stack() as stack:
        sim = stack.simulator(ttft_ms=300, tokens_per_s=100, reply_tokens=8)
        floor = stack.floor(sim.url, server=server)
        for stream in (False, True):
            sim_reset(sim.url)
            answers = asyncio.run(burst(floor.url, stream, n))
            assert chat_calls(sim.url) == 1
            assert Counter(a[1] for a in answers) == {"leader": 1, "follower": n - 1}
            assert {a[0] for a in answers} == {200}
            assert len({a[3] for a in answers}) == 1, "every subscriber gets the same bytes"
            body = answers[0][3]
            if stream:
                assert answers[0][2].startswith("text/event-stream")
                assert body.count(b"data: {") == 1 + 8 + 1 and body.endswith(b"data: [DONE]\n\n")  # role, words, stop
            else:
                assert json.loads(body)["choices"][0]["message"]["content"].startswith("echo: floor")
            (again,) = asyncio.run(burst(floor.url, stream, 1))  # the flight has ended: a new call
            assert again[1] == "leader" and chat_calls(sim.url) == 2


def test_help_lists_the_scenarios() -> None:
    proc = subprocess.run([sys.executable, "-m", "proxy", "bench", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 0
    for word in ("compare", "burst", "fanout", "responses", "messages", "embeddings", "soak", "--quick"):
        assert word in proc.stdout


# --------------------------------------------------------------------------- no processes


@pytest.mark.parametrize("name", list(workloads.WORKLOADS))
def test_workloads_are_reproducible_from_a_seed(name: str) -> None:
    wl = workloads.get(name)
    a = [(r.body, r.stream, r.headers) for r in itertools.islice(wl.requests(seed=7), 500)]
    b = [(r.body, r.stream, r.headers) for r in itertools.islice(wl.requests(seed=7), 500)]
    c = [r.body for r in itertools.islice(wl.requests(seed=8), 500)]
    assert a == b
    assert [x[0] for x in a] != c
    assert all(json.loads(body)["messages"][-1]["role"] == "user" for body, _, _ in a)


def test_workload_shapes() -> None:
    def take(name: str, n: int = 20000, **kw) -> list[workloads.Request]:
        return list(itertools.islice(workloads.get(name).requests(workloads.Options(**kw), seed=3), n))

    unique = take("unique", 5000)
    assert len({r.body for r in unique}) == 5000
    trace = take("trace68")
    dup = 1 - len({(r.prompt, r.tenant) for r in trace}) / len(trace)
    assert 0.64 < dup < 0.72
    assert 0.25 < sum(r.stream for r in trace) / len(trace) < 0.35
    zipf = Counter(r.prompt for r in take("zipf"))
    assert zipf.most_common(1)[0][1] > 20 * (20000 / 1000)  # the hottest prompt is far above uniform
    bursts = take("bursts", 30, burst=10)
    assert [r.prompt for r in bursts] == [0] * 10 + [1] * 10 + [2] * 10
    tenants = take("tenants", 5000, tenants=4)
    assert len({r.headers["authorization"] for r in tenants}) == 4
    para = take("paraphrase", 5000)
    wordings = {}
    for r in para:
        wordings.setdefault(r.prompt, set()).add(json.loads(r.body)["messages"][-1]["content"])
    assert max(len(v) for v in wordings.values()) >= 3


def test_helpers() -> None:
    assert chat_url("http://h:1/v1") == chat_url("http://h:1/") == "http://h:1/v1/chat/completions"
    with pytest.raises(ValueError):
        Load(concurrency=1, rate=2.0, duration=1)
    assert Load(concurrency=10, requests=11).share(0, 3).concurrency == 4
    assert Load(concurrency=10, requests=11).share(2, 3).requests == 3
    before = {'herd_upstream_seconds_bucket{le="0.05",upstream="sim"}': 0.0,
              'herd_upstream_seconds_bucket{le="0.1",upstream="sim"}': 0.0,
              'herd_upstream_seconds_bucket{le="+Inf",upstream="sim"}': 0.0}
    after = dict(zip(before, (0.0, 100.0, 100.0)))
    q = histogram_quantiles(before, after, "herd_upstream_seconds")
    assert q["n"] == 100 and q["p50"] == pytest.approx(75.0)
    text = table(["a", "b"], [["x", 1.5], ["yy", None]], "title")
    assert text.splitlines()[0] == "title" and "1.5" in text and "-" in text


def test_inprocess_bench_runs_through_the_faked_upstream(tmp_path):
    """python -m benchmarks.inprocess fakes the upstream adapter's call; every request must be
    answered 200 by that fake, never sent to the (absent) network."""
    from benchmarks import inprocess

    out = tmp_path / "inprocess.json"
    assert inprocess.main(["--requests", "64", "--concurrency", "8", "--burst", "10", "--subscribers", "5",
                           "--chunks", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["requests"]["on"]["cpu_us_per_request"] > 0
    assert result["command"].startswith("python -m benchmarks.inprocess")
