"""`herd bench compare` driven by wrk (benchmarks/wrk.py): the bodies its Lua script builds,
the parser of wrk's output, the checks, and (where wrk is installed) real runs."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from benchmarks import workloads, wrk
from benchmarks.compare import choose_loadgen, compare_checks
from benchmarks.harness import Proc, Stack, sim_stats
from benchmarks.loadgen import Load, Records
from benchmarks.measure import Measured, Pool, Target, add_ratios

ROOT = Path(__file__).resolve().parent.parent
needs_wrk = pytest.mark.skipif(wrk.find_wrk() is None, reason="wrk is not installed (apt-get install wrk)")

OUTPUT = """Running 8s test @ http://127.0.0.1:8080/v1/chat/completions
  1 threads and 256 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   120.50ms   20.10ms    1.20s    75.00%
    Req/Sec     2.10k   200.00     2.50k    70.00%
  Latency Distribution
     50%  118.00ms
     75%  125.00ms
     90%  140.00ms
     99%  950.00us
  16800 requests in 8.00s, 10.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 5
  Non-2xx or 3xx responses: 12
Requests/sec:   2100.00
Transfer/sec:      1.25MB
"""


# --------------------------------------------------------------------------- bodies and script


def test_bodies_have_the_unique_workloads_shape_and_never_repeat() -> None:
    opts = workloads.Options(max_tokens=7)
    python_body = orjson.loads(next(workloads.WORKLOADS["unique"].requests(opts, 1)).body)
    prefixes, suffix = wrk.body_parts(opts.model, "n0nce-herdexact-r1", max_tokens=7)
    seen = set()
    for thread in (1, 2):
        for n in range(1, 3 * len(prefixes)):
            body = orjson.loads(wrk.body_for(prefixes, suffix, thread, n))
            # the same keys and messages as the Python generator's, the user message made unique
            assert body.keys() == python_body.keys() == {"model", "messages", "max_tokens"}
            assert body["model"] == opts.model and body["max_tokens"] == 7
            assert [m["role"] for m in body["messages"]] == ["system", "user"]
            assert body["messages"][0] == python_body["messages"][0]
            content = body["messages"][1]["content"]
            assert content.endswith(f"(run n0nce-herdexact-r1 req {thread}-{n})")
            seen.add(content)
    assert len(seen) == 2 * (3 * len(prefixes) - 1)
    # another run's nonce: none of its bodies is one of these
    other, other_suffix = wrk.body_parts(opts.model, "0ther-herdexact-r1", max_tokens=7)
    assert wrk.body_for(other, other_suffix, 1, 1) != wrk.body_for(prefixes, suffix, 1, 1)
    # without max_tokens the key is left out, as the Python generator does
    bare, bare_suffix = wrk.body_parts(opts.model, "x")
    assert "max_tokens" not in orjson.loads(wrk.body_for(bare, bare_suffix, 1, 1))


def test_nonces_differ_between_runs_and_name_the_target_and_round() -> None:
    a, b = wrk.nonce_for("herd-exact", 2), wrk.nonce_for("herd-exact", 2)
    assert a != b
    assert a.endswith("-herdexact-r2")
    assert all(c.isalnum() or c == "-" for c in a)  # safe inside a JSON string unescaped


def test_lua_strings_escape_quotes_backslashes_and_control_bytes() -> None:
    assert wrk.lua_string('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert wrk.lua_string("a\nb\x00é") == '"a\\010b\\000\\195\\169"'


def test_the_script_sends_the_python_generators_headers_to_the_chat_path() -> None:
    headers = {**workloads.tenant_headers(1, 1)[0], "x-herd-coalesce": "exact"}
    run = wrk.Run("http://127.0.0.1:9/v1", 16, 2, headers, "gpt-4o-mini", "abc-direct-r1")
    script = wrk.lua_script(run)
    assert 'wrk.method = "POST"' in script
    for k, v in headers.items():
        assert f'wrk.headers["{k}"] = "{v}"' in script
    assert 'local path = "/v1/chat/completions"' in script
    assert "abc-direct-r1" in script
    argv = wrk.command("/usr/bin/wrk", run, Path("/tmp/s.lua"))
    assert argv[1:5] == ["-t1", "-c16", "-d2s", "--timeout=10s"] and "--latency" in argv
    assert argv[-1] == "http://127.0.0.1:9/v1/chat/completions"


# --------------------------------------------------------------------------- wrk's output


def test_parse_output_reads_totals_percentiles_and_errors() -> None:
    r = wrk.parse_output(OUTPUT)
    assert r.requests == 16800 and r.duration_s == 8.0 and r.req_per_s == 2100.0
    assert r.latency_ms == {"mean": 120.5, "max": 1200.0, "p50": 118.0, "p75": 125.0, "p90": 140.0, "p99": 0.95}
    assert r.non_2xx == 12
    assert r.socket_errors == {"read": 3, "timeout": 5}
    assert r.errors == 20 and r.ok == 16788


def test_a_clean_run_has_no_error_lines() -> None:
    clean = "\n".join(line for line in OUTPUT.splitlines() if "errors" not in line and "Non-2xx" not in line)
    r = wrk.parse_output(clean)
    assert r.errors == 0 and r.socket_errors == {}
    r.check("herd-exact r1")  # passes


def test_more_than_a_trivial_share_of_failures_fails_the_run() -> None:
    r = wrk.parse_output(OUTPUT)  # 20 of 16,800 failed: 0.12%
    with pytest.raises(wrk.WrkError, match=r"20 of 16,800 requests failed.*non-2xx 12.*read 3.*timeout 5"):
        r.check("herd-exact r1")
    r.check("herd-exact r1", max_bad_share=0.002)
    with pytest.raises(wrk.WrkError, match="no answer"):
        wrk.WrkResult(requests=0, duration_s=8, req_per_s=0, latency_ms={}).check("x")
    with pytest.raises(wrk.WrkError, match="could not read"):
        wrk.parse_output("unable to connect to 127.0.0.1:9 Connection refused")


# --------------------------------------------------------------------------- compare's choices and checks


def _args(**kw: object) -> argparse.Namespace:
    base = {"loadgen": "auto", "rate": None, "requests": None, "workload": "unique"}
    return argparse.Namespace(**{**base, **kw})


def test_wrk_drives_only_the_throughput_of_unique_non_streamed_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wrk, "find_wrk", lambda: "/usr/bin/wrk")
    unique, zipf = workloads.get("unique"), workloads.get("zipf")
    opts = workloads.Options()
    assert choose_loadgen(_args(), unique, opts) == "wrk"
    assert choose_loadgen(_args(loadgen="python"), unique, opts) == "python"
    assert choose_loadgen(_args(rate=100.0), unique, opts) == "python"
    assert choose_loadgen(_args(workload="zipf"), zipf, opts) == "python"
    assert choose_loadgen(_args(), unique, workloads.Options(stream_share=0.5)) == "python"
    with pytest.raises(SystemExit, match="streams"):
        choose_loadgen(_args(loadgen="wrk"), unique, workloads.Options(stream_share=0.5))
    with pytest.raises(SystemExit, match="unique workload"):
        choose_loadgen(_args(loadgen="wrk", workload="zipf"), zipf, opts)
    monkeypatch.setattr(wrk, "find_wrk", lambda: None)
    assert choose_loadgen(_args(), unique, opts) == "python"
    with pytest.raises(SystemExit, match="not installed"):
        choose_loadgen(_args(loadgen="wrk"), unique, opts)


def _wrk_round(rps: float, cpu_ms: float, p50: float) -> Measured:
    result = wrk.WrkResult(requests=int(rps * 8), duration_s=8.0, req_per_s=rps,
                           latency_ms={"p50": p50, "p90": p50 * 1.5, "p99": p50 * 3, "max": p50 * 5})
    rec = Records()
    rec.elapsed = 8.0
    return Measured(rec, result.requests + 256, 256, cpu_ms * result.requests / 1000, 1.0, None, 0.1,
                    by_wrk=result)


def test_ratios_and_checks_come_from_the_same_interleaved_rounds() -> None:
    pools = {"passthrough": Pool(), "herd-exact": Pool()}
    for rps, cpu, p50 in ((2000, 0.40, 100), (2500, 0.36, 90)):
        pools["passthrough"].add(_wrk_round(rps, cpu, p50))
    for rps, cpu, p50 in ((1800, 0.46, 110), (2000, 0.45, 100)):
        pools["herd-exact"].add(_wrk_round(rps, cpu, p50))
    targets = {n: p.summary(Target(n, "herd" if n.startswith("herd") else "passthrough", "")) for n, p in
               pools.items()}
    add_ratios(targets)
    herd = targets["herd-exact"]
    assert herd["requests"] == 30_400 and herd["req_per_s"] == 1900.0
    assert herd["latency_ms"]["p50"] == 105.0 and herd["latency_ms"]["max"] == 550.0  # median, max of rounds
    assert herd["coalesce_ratio"] == 0.0  # wrk does not count the requests in flight at its end
    assert herd["vs"]["req_per_s_vs_passthrough"] == round(1900 / 2250, 4)
    assert herd["vs"]["req_per_s_vs_passthrough_rounds"] == [0.9, 0.8]
    assert herd["vs"]["cpu_per_req_vs_passthrough_rounds"] == [1.15, 1.25]
    cpu_ratio = herd["vs"]["cpu_per_req_vs_passthrough"]
    assert cpu_ratio == pytest.approx(herd["cpu_ms_per_req"]["target"] / targets["passthrough"]["cpu_ms_per_req"][
        "target"], abs=1e-3)

    half = {"passthrough": {"latency_ms": {"p50": 51.0, "p99": 60.0}, "req_per_s": 950.0},
            "herd-exact": {"latency_ms": {"p50": 52.5, "p99": 61.0}, "req_per_s": 950.0}}
    add_ratios(half)
    phases = [{"name": "throughput", "loadgen": "wrk", "load": {"concurrency": 256}, "targets": targets},
              {"name": "half load", "load": {"rate": 950.0}, "half_of": "herd-exact", "targets": half}]
    checks = {c["name"].split(": ")[1]: c for c in compare_checks(_args(), phases)}
    assert checks["throughput"]["met"] is False and "rounds 0.80-0.90" in checks["throughput"]["measured"]
    assert checks["CPU per request"]["met"] is (cpu_ratio <= 1.2)
    assert checks["added latency"]["value"] == 1.5 and checks["added latency"]["met"] is False
    assert "vs passthrough" in checks["added latency"]["measured"]
    # measured by the Python generator, the throughput ratio is no verdict
    phases[0]["loadgen"] = "python"
    assert compare_checks(_args(), phases)[0]["met"] is None


# --------------------------------------------------------------------------- real runs


@needs_wrk
def test_every_body_wrk_sends_is_new_and_carries_the_python_generators_headers() -> None:
    headers = workloads.tenant_headers(1, 1)[0]
    with Stack() as stack:
        sim = stack.simulator(ttft_ms=2.0, tokens_per_s=0.0, reply_tokens=4)
        results = [wrk.run_wrk(wrk.Run(sim.url, 4, 1, headers, "gpt-4o-mini", wrk.nonce_for("direct", r),
                                       max_tokens=5), stack.dir) for r in (1, 2)]
        log = sim_stats(sim.url)["log"]
    assert all(r.requests > 0 and r.errors == 0 and r.cpu_s > 0 for r in results)
    assert len(log) >= sum(r.requests for r in results)  # the upstream also saw those in flight at the end
    contents = [entry["body"]["messages"][1]["content"] for entry in log]
    assert len(set(contents)) == len(contents)  # two runs, not one repeat
    for entry in log:
        assert entry["path"] == "/v1/chat/completions"
        assert entry["body"]["model"] == "gpt-4o-mini" and entry["body"]["max_tokens"] == 5
        assert entry["headers"]["authorization"] == headers["authorization"]
        assert entry["headers"]["content-type"] == "application/json"


def run_bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


@needs_wrk
def test_compare_drives_the_throughput_phase_with_wrk_and_reports_cpu_ratios(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_bench("compare", "--workload", "unique", "--loadgen", "wrk", "-c", "8", "-d", "1", "--rounds", "2",
                     "--warmup", "1", "--targets", "direct,passthrough,exact", "--ttft-ms", "20", "--no-plots",
                     "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "by wrk" in proc.stdout and "cpu x pass" in proc.stdout and "x pass by round" in proc.stdout
    assert "server.access_log" in proc.stdout  # says which config herd ran with
    results = json.loads((out / "results.json").read_text())
    assert results["git"] is not None and "commit" in results["git"] and "dirty" in results["git"]
    assert results["command"].startswith("herd bench compare --workload unique --loadgen wrk")
    first, half = results["phases"]
    assert first["loadgen"] == "wrk" and half["loadgen"] == "python" and half["load"]["rate"] > 0
    for name, t in first["targets"].items():
        assert t["requests"] > 8 and t["errors"] == 0, (name, t)
        assert t["upstream_calls"] >= t["requests"]  # unique prompts: nothing merged, nothing cached
        assert t["latency_ms"]["p50"] >= 20
        assert len(t["req_per_s_rounds"]) == 2
    herd = first["targets"]["herd-exact"]
    assert herd["cpu_ms_per_req"]["target"] > 0 and herd["vs"]["cpu_per_req_vs_passthrough"] > 0
    assert len(herd["vs"]["req_per_s_vs_passthrough_rounds"]) == 2
    assert {c["name"] for c in results["checks"]} == {"all-unique, exact: throughput",
                                                       "all-unique, exact: CPU per request",
                                                       "all-unique, exact: added latency"}
    assert "cache.enabled=true" in results["herd_config"]  # as proxy.toml: herd's cache is on by default


@needs_wrk
def test_compare_fails_loudly_when_wrks_requests_fail(tmp_path: Path) -> None:
    # the passthrough's upstream is a closed port: every answer is a 502
    proc = run_bench("compare", "--workload", "unique", "--loadgen", "wrk", "-c", "4", "-d", "1", "--rounds", "1",
                     "--warmup", "0", "--targets", "passthrough", "--sim-url", "http://127.0.0.1:9",
                     "--no-half-load", "--no-plots", "--no-progress", "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "requests failed (non-2xx" in proc.stderr


def test_a_process_cpu_time_counts_its_children(tmp_path: Path) -> None:
    # herd with [server] workers = N serves from child processes: their CPU is the target's
    code = ("import multiprocessing as mp, time\n"
            "def spin():\n"
            "    end = time.process_time() + 0.6\n"
            "    while time.process_time() < end: pass\n"
            "    time.sleep(60)\n"
            "if __name__ == '__main__':\n"
            "    mp.get_context('spawn').Process(target=spin).start()\n"
            "    time.sleep(60)\n")
    script = tmp_path / "parent.py"
    script.write_text(code)
    proc = Proc("parent", [sys.executable, str(script)], 0, tmp_path / "parent.log").launch()
    try:
        deadline = time.monotonic() + 30
        while proc.cpu_seconds() < 0.5:
            assert time.monotonic() < deadline, "the child's CPU time was never counted"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its child: it started its own session
        proc.kill()


def test_the_cpu_of_other_processes_is_not_reduced_by_wrks_a_second_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_wrk reaps wrk with wait4, so the kernel counts wrk's CPU in this process's
    children's time (self_cpu_seconds): "other processes" in measure_wrk is the machine's
    busy time less ours, with wrk's CPU taken away once, not twice."""
    from types import SimpleNamespace

    from benchmarks import measure
    from benchmarks.workloads import Options

    busy = [100.0]
    others = 0.3  # CPU seconds that processes outside the bench use during the measured run
    monkeypatch.setattr(measure, "machine_busy_seconds", lambda: busy[0])

    def fake_wrk(run: wrk.Run, workdir: Path) -> wrk.WrkResult:
        """A child that spins for 0.5 s of CPU, reaped as run_wrk reaps wrk."""
        ours = measure.self_cpu_seconds()
        proc = subprocess.Popen([sys.executable, "-c",
                                 "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"])
        _, _, usage = os.wait4(proc.pid, 0)
        busy[0] += measure.self_cpu_seconds() - ours + others  # the machine saw it, and the others
        return wrk.WrkResult(100, 1.0, 100.0, {}, cpu_s=usage.ru_utime + usage.ru_stime)

    monkeypatch.setattr(measure.wrk, "run_wrk", fake_wrk)
    bench = SimpleNamespace(args=SimpleNamespace(wait_quiet=0, profile=False, seed=0, timeout=10),
                            stack=SimpleNamespace(procs=[], dir=tmp_path), has_sim=False, sim=None, sim_url=None)
    started = time.monotonic()
    m = measure.measure_wrk(bench, Target("t", "direct", "http://127.0.0.1:9"), Load(concurrency=1, duration=1.0),
                            Options(), label="t", round_no=0, warmup_s=0)
    assert m.by_wrk is not None and m.by_wrk.cpu_s >= 0.5
    # others, less what this process spent between the reads of its own CPU and the ticks
    # os.times counts in; it read 0 (clamped) when wrk's 0.5 s was taken away a second time
    assert m.background_cores * (time.monotonic() - started) >= others - 0.05
