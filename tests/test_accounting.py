from __future__ import annotations

from proxy.accounting import Accountant, LabelCap, usage_of
from proxy.chunks import Chunk
from proxy.config import MetricsConfig
from proxy.metrics import Metrics


def value(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_leader_spends_followers_and_cache_save():
    metrics = Metrics()
    acct = Accountant(MetricsConfig(prices={"gpt-4o-mini*": {"input": 0.15, "output": 0.60}}), metrics)
    usage = {"prompt_tokens": 1000, "completion_tokens": 500}
    acct.record("leader", "gpt-4o-mini", "k:1", usage)
    acct.record("follower", "gpt-4o-mini", "k:1", usage)
    acct.record("cache", "gpt-4o-mini", "k:2", usage)
    assert value(metrics, "herd_tokens_total", model="gpt-4o-mini", kind="prompt", outcome="spent") == 1000
    assert value(metrics, "herd_tokens_total", model="gpt-4o-mini", kind="completion", outcome="saved") == 1000
    spent = value(metrics, "herd_dollars_total", model="gpt-4o-mini", outcome="spent")
    assert abs(spent - (1000 * 0.15 + 500 * 0.60) / 1e6) < 1e-12
    assert abs(value(metrics, "herd_dollars_total", model="gpt-4o-mini", outcome="saved") - 2 * spent) < 1e-12
    # no tenant labels unless asked for
    assert value(metrics, "herd_tenant_dollars_total", tenant="k:1", outcome="spent") == 0


def test_unpriced_models_count_tokens_only_and_labels_are_capped():
    metrics = Metrics()
    acct = Accountant(MetricsConfig(tenant_labels=True, max_tenant_labels=1, prices={"*": {"input": 1, "output": 1}}),
                      metrics)
    acct.record("leader", "m", "tenant-a", {"prompt_tokens": 1, "completion_tokens": 1})
    acct.record("leader", "m", "tenant-b", {"prompt_tokens": 1, "completion_tokens": 1})
    assert value(metrics, "herd_tenant_dollars_total", tenant="tenant-a", outcome="spent") > 0
    assert value(metrics, "herd_tenant_dollars_total", tenant="other", outcome="spent") > 0
    cap = LabelCap(2)
    assert [cap(v) for v in "abcab"] == ["a", "b", "other", "a", "b"]
    plain = Accountant(MetricsConfig(), Metrics())
    assert plain.price("anything") is None


def test_usage_of_reads_the_last_usage_chunk():
    chunks = [Chunk({"choices": [{"delta": {"content": "x"}}], "usage": None}),
              Chunk({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})]
    assert usage_of(chunks) == {"prompt_tokens": 3, "completion_tokens": 1}
    assert usage_of(chunks[:1]) is None
