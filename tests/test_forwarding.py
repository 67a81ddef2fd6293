"""Forwarded calls (any other /v1 path) go through the dispatcher: the circuit breaker, herd's
rate limits, retries for idempotent methods only, and metrics."""

from __future__ import annotations

import httpx
import openai
import pytest

from benchmarks.simulator import ThreadedSimulator
from tests.harness import HerdServer, herd_settings, sim_faults, sim_reset, sim_stats


@pytest.fixture(scope="module")
def sim():
    with ThreadedSimulator() as s:
        yield s


def calls(sim_url: str, path: str) -> int:
    return int(sim_stats(sim_url, log=False)["by_path"].get(path, 0))


def guarded(sim_url: str, **upstream):
    cfg = {"retries": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "circuit_failures": 2,
           "circuit_reset_s": 30.0, **upstream}
    return HerdServer(herd_settings(sim_url, upstreams={"sim": cfg}))


def metric(text: str, line: str) -> float:
    for row in text.splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


def test_an_idempotent_forwarded_call_is_retried_and_counted(sim):
    sim_reset(sim.url)
    sim_faults(sim.url, {"kind": "status", "status": 503, "path": "/v1/files", "times": 2})
    with guarded(sim.url, circuit_failures=0) as herd:
        r = httpx.get(herd.url + "/v1/files", headers={"authorization": "Bearer sk-x"})
        assert r.status_code == 404  # the simulator's own answer, after two 503s were retried
        assert r.headers["x-herd"] == "bypass"
        assert calls(sim.url, "/v1/files") == 3
        m = httpx.get(herd.url + "/metrics").text
        assert metric(m, 'herd_upstream_calls_total{upstream="sim"}') == 3
        assert metric(m, 'herd_upstream_retries_total{upstream="sim"}') == 2
        assert metric(m, 'herd_api_requests_total{api="forward",outcome="bypass"}') == 1
        assert metric(m, 'herd_upstream_errors_total{kind="UpstreamError",upstream="sim"}') == 2


def test_a_forwarded_post_is_never_retried(sim):
    sim_reset(sim.url)
    sim_faults(sim.url, {"kind": "status", "status": 503, "path": "/v1/files", "times": 1})
    with guarded(sim.url, circuit_failures=0) as herd:
        r = httpx.post(herd.url + "/v1/files", content=b"upload", headers={"authorization": "Bearer sk-x"})
        assert r.status_code == 503 and r.json()["error"]["message"] == "simulated fault: HTTP 503"
        assert calls(sim.url, "/v1/files") == 1


def test_forwarded_failures_open_the_circuit_shared_with_flights(sim):
    sim_reset(sim.url)
    sim_faults(sim.url, {"kind": "status", "status": 500, "path": "/v1/batches", "times": -1})
    with guarded(sim.url, retries=0) as herd:
        auth = {"authorization": "Bearer k"}
        for _ in range(2):
            assert httpx.post(herd.url + "/v1/batches", json={}, headers=auth).status_code == 500
        assert calls(sim.url, "/v1/batches") == 2
        # the circuit is open now: neither a forwarded call nor a chat flight reaches the upstream
        r = httpx.post(herd.url + "/v1/batches", json={}, headers=auth)
        assert r.status_code == 503 and r.json()["error"]["code"] == "circuit_open" and "retry-after" in r.headers
        c = openai.OpenAI(base_url=herd.url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        assert calls(sim.url, "/v1/batches") == 2 and calls(sim.url, "/v1/chat/completions") == 0
        m = httpx.get(herd.url + "/metrics").text
        assert metric(m, 'herd_circuit_state{upstream="sim"}') == 2
        assert metric(m, 'herd_api_requests_total{api="forward",outcome="error"}') == 1


def test_forwarded_calls_wait_for_herds_rate_limit(sim):
    sim_reset(sim.url)
    with guarded(sim.url, requests_per_minute=60, rate_limit_wait_s=0) as herd:
        codes = [httpx.get(herd.url + "/v1/files", headers={"authorization": "Bearer k"}).status_code
                 for _ in range(30)]
        assert 429 in codes  # the bucket (60/min, a burst of 10 s) ran dry: refused, not sent
        assert calls(sim.url, "/v1/files") == codes.count(404)
        m = httpx.get(herd.url + "/metrics").text
        assert metric(m, 'herd_rate_limited_total{upstream="sim"}') == codes.count(429)


def test_listing_models_goes_through_the_dispatcher(sim):
    sim_reset(sim.url)
    sim_faults(sim.url, {"kind": "status", "status": 503, "path": "/v1/models", "times": 1})
    with guarded(sim.url, circuit_failures=0) as herd:
        models = openai.OpenAI(base_url=herd.url + "/v1", api_key="k", max_retries=0).models.list()
        assert "gpt-4o-mini" in [m.id for m in models.data]  # the 503 was retried
        assert calls(sim.url, "/v1/models") == 2
        m = httpx.get(herd.url + "/metrics").text
        assert metric(m, 'herd_upstream_calls_total{upstream="sim"}') == 2
        assert metric(m, 'herd_upstream_retries_total{upstream="sim"}') == 1


def test_the_grafana_dashboard_shows_requests_by_api():
    import json
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[1] / "config" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert any("herd_api_requests_total" in e and "api" in e for e in exprs)


def test_count_tokens_to_an_anthropic_route_goes_through_the_dispatcher():
    """POST /v1/messages/count_tokens to an Anthropic upstream is a forwarded call like any
    other: counted in the metrics, and its failures open the circuit (which then answers
    without calling). Before the fix it went straight to the upstream: no metrics, no breaker."""
    from tests.raw_http import RawUpstream, answer_json

    async def failing(request, writer) -> None:
        await answer_json(writer, {"type": "error", "error": {"type": "api_error", "message": "boom"}}, 500)

    with RawUpstream(failing) as raw:
        settings = herd_settings(raw.url, upstreams={"claude": {
            "kind": "anthropic", "base_url": raw.url, "retries": 0, "circuit_failures": 2, "circuit_reset_s": 30.0}},
            routes=[{"model": "claude-*", "upstream": "claude"}, {"model": "*", "upstream": "sim"}])
        with HerdServer(settings) as herd:
            ask = {"model": "claude-3-5-haiku-latest", "messages": [{"role": "user", "content": "count me"}]}
            headers = {"x-api-key": "sk-ant-x", "anthropic-version": "2023-06-01"}
            for _ in range(2):
                r = httpx.post(herd.url + "/v1/messages/count_tokens", json=ask, headers=headers)
                assert r.status_code == 500 and r.json()["type"] == "error"
            r = httpx.post(herd.url + "/v1/messages/count_tokens", json=ask, headers=headers)
            assert r.status_code == 503 and "retry-after" in r.headers
            assert len(raw.received) == 2
            assert raw.received[0].target == "/v1/messages/count_tokens"
            assert raw.received[0].headers["anthropic-version"] == "2023-06-01"
            m = httpx.get(herd.url + "/metrics").text
            assert metric(m, 'herd_upstream_calls_total{upstream="claude"}') == 2
            assert metric(m, 'herd_circuit_state{upstream="claude"}') == 2
            assert metric(m, 'herd_api_requests_total{api="forward",outcome="error"}') == 3
