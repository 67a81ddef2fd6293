"""Prometheus metrics move as they should, with no secret in any label."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import HerdServer, herd_settings, sim_faults, sim_reset

SECRET = "sk-metrics-secret-key"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def scrape(herd) -> dict[tuple[str, tuple], float]:
    text = httpx.get(herd.url + "/metrics").text
    assert SECRET not in text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def metered_herd(sim):
    settings = herd_settings(
        sim.url,
        cache={"enabled": True, "ttl_seconds": 60},
        metrics={"prices": {"m*": {"input": 1.0, "output": 2.0}}},
    )
    with HerdServer(settings) as h:
        yield h


async def test_each_outcome_moves_its_counter(metered_herd, sim):
    herd = metered_herd
    before = scrape(herd)
    sim_reset(sim.url, ttft_ms=800)
    c = openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key=SECRET, max_retries=0)
    # one leader and two followers
    await asyncio.gather(*[c.chat.completions.create(model="m1", messages=user("metered")) for _ in range(3)])
    # a cache hit
    await c.chat.completions.create(model="m1", messages=user("metered"))
    # a bypass
    await c.chat.completions.with_raw_response.create(model="m1", messages=user("metered bypass"),
                                                      extra_headers={"x-herd-coalesce": "off"})
    # errors: bad input, and an upstream failure
    async with httpx.AsyncClient() as http:
        assert (await http.post(herd.url + "/v1/chat/completions", content=b"{")).status_code == 400
    sim_faults(sim.url, {"kind": "status", "status": 503, "match": "metered failure"})
    with pytest.raises(openai.APIStatusError):
        await c.chat.completions.create(model="m1", messages=user("metered failure"))
    after = scrape(herd)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("herd_requests_total", outcome="leader") == 1  # the failed flight's leader counts as an error
    assert delta("herd_requests_total", outcome="follower") == 2
    assert delta("herd_requests_total", outcome="cache") == 1
    assert delta("herd_requests_total", outcome="bypass") == 1
    assert delta("herd_requests_total", outcome="error") == 2
    assert delta("herd_errors_total", status="400") == 1 and delta("herd_errors_total", status="503") == 1
    assert delta("herd_upstream_calls_total", upstream="sim") == 3
    # fan-out lag: the leader, its two followers and the bypass; not the cache hit, not the errors
    assert delta("herd_fanout_lag_seconds_count") == 4
    assert 0 < delta("herd_fanout_lag_seconds_sum") < 4 * 0.5
    # spent by the leader and the bypass, saved by two followers and the cache hit
    spent = delta("herd_tokens_total", model="m1", kind="completion", outcome="spent")
    saved = delta("herd_tokens_total", model="m1", kind="completion", outcome="saved")
    assert spent > 0 and saved > 0
    assert delta("herd_dollars_total", model="m1", outcome="saved") > delta("herd_dollars_total", model="m1",
                                                                            outcome="spent") > 0
    assert value(after, "herd_inflight_flights") == 0
    assert 0 < value(after, "herd_coalesce_ratio") < 1


def test_labels_stay_bounded_and_hold_no_secrets(metered_herd, sim):
    names = set()
    for key in scrape(metered_herd):
        names.add(key[0])
        for _, label_value in key[1]:
            assert SECRET not in label_value
    assert "herd_requests_total" in names


def test_dashboard_and_alerts_use_metrics_herd_exports(sim):
    """Every herd_* name in the dashboard and the alert rules is one herd can export."""
    from proxy.metrics import Metrics

    known = set()
    for metric in Metrics().registry.collect():
        for sample in metric.samples:
            known.add(sample.name)
        known.add(metric.name)
    root = Path(__file__).resolve().parents[1] / "config"
    used = set()
    dashboard = json.loads((root / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"herd_[a-z_]+", target["expr"]))
    used |= set(re.findall(r"herd_[a-z_]+", (root / "prometheus-alerts.yaml").read_text()))
    bases = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in known}
    missing = {n for n in used if n not in known and re.sub(r"_(bucket|sum|count|total)$", "", n) not in bases}
    assert not missing, missing


def test_the_fast_counting_path_exposes_what_prometheus_client_itself_would():
    """Metrics' counters and histograms count through proxy.metrics._fast (one call, not
    five); /metrics must read exactly as with prometheus-client's own inc and observe:
    every bucket edge, +Inf, zero, NaN, an exemplar, and a refused negative count."""
    import math

    import pytest
    from prometheus_client import Counter, Histogram

    from proxy.metrics import Metrics

    fast, plain = Metrics(), Metrics()
    amounts = [0.0, 0.005, 0.0051, 0.05, 0.1, 1, 119.9, 120, 121, 1e9, math.nan]
    for m, observe, inc in ((fast, None, None), (plain, Histogram.observe, Counter.inc)):
        for amount in amounts:
            for h in (m.upstream_latency.labels("u"), m.fanout_lag):
                observe(h, amount) if observe else h.observe(amount)
        for c, n in ((m.requests.labels("leader"), 1), (m.tokens.labels("m", "prompt", "spent"), 17),
                     (m.cache_evictions, 2.5)):
            inc(c, n) if inc else c.inc(n)
        with pytest.raises(ValueError):
            (inc or Counter.inc)(m.requests.labels("cache"), -1) if inc else m.requests.labels("cache").inc(-1)
        h = m.upstream_ttft.labels("u")
        observe(h, 0.2, {"trace": "t"}) if observe else h.observe(0.2, {"trace": "t"})

    def exposition(m: Metrics) -> list[str]:
        from prometheus_client import generate_latest

        return [line for line in generate_latest(m.registry).decode().splitlines()
                if not line.split(" ")[0].split("{")[0].endswith("_created") and "coalesce_ratio" not in line]

    assert exposition(fast) == exposition(plain)
    assert fast.requests.labels("leader") is fast.requests.labels("leader")  # still memoized
    assert fast.requests.labels("leader").inc != Counter.inc  # and on the fast path
