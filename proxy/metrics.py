"""Prometheus metrics, on a registry of the app's own (no globals, no secrets, bounded labels)."""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the route)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.values import MutexValue

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OUTCOMES = ("leader", "follower", "cache", "bypass", "error")


def _memoize_labels(metric) -> None:
    """`metric.labels(...)` becomes one dict lookup after the first call for a label set,
    and the child it returns counts on the fast path (_fast).

    Every request counts into a few labelled metrics; prometheus-client's own `labels()`
    validates and locks each time. herd's label values are bounded (outcomes, upstream
    names, capped models and tenants), so the memo is too; herd never removes a label set.
    """
    labels = metric.labels

    def fast_labels(*values: str):
        return _fast(labels(*values))

    metric.labels = functools.lru_cache(maxsize=None)(fast_labels)


def _fast(metric):
    """`metric` (a counter or histogram that is not a labelled parent) with an `inc` or
    `observe` that does what prometheus-client's does in one call, not five: the same
    values under the same locks, so /metrics reads the same. Left alone where the values
    are not plain in-process ones (prometheus-client's multiprocess mode) or where an
    exemplar or a negative count asks for the library's own checks."""
    if isinstance(metric, Counter):
        value = getattr(metric, "_value", None)  # a private of prometheus-client's: checked, not assumed
        if type(value) is not MutexValue:
            return metric
        lock = value._lock

        def inc(amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
            if amount < 0 or exemplar:
                return Counter.inc(metric, amount, exemplar)
            with lock:
                value._value += amount

        metric.inc = inc  # type: ignore[method-assign]  # this one metric, not the class
    elif isinstance(metric, Histogram):
        total, buckets = getattr(metric, "_sum", None), getattr(metric, "_buckets", None) or []
        bounds = list(getattr(metric, "_upper_bounds", ()))
        if (type(total) is not MutexValue or len(bounds) != len(buckets)
                or any(type(b) is not MutexValue for b in buckets)):
            return metric

        def observe(amount: float, exemplar: dict[str, str] | None = None) -> None:
            if exemplar or amount != amount:  # NaN falls in no bucket: the library's way
                return Histogram.observe(metric, amount, exemplar)
            with total._lock:
                total._value += amount
            bucket = buckets[bisect.bisect_left(bounds, amount)]  # the first bound >= amount (+Inf last)
            with bucket._lock:
                bucket._value += 1

        metric.observe = observe  # type: ignore[method-assign]
    return metric


def _total(counter: Counter, where: Callable[[dict[str, str]], bool] = lambda labels: True) -> float:
    """A counter's count over its label sets (those `where` accepts)."""
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total") and where(s.labels))


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "herd_requests", "Requests to the coalesced APIs, counted when answered, by how: leader, follower, cache, "
            "bypass or error",
            ["outcome"], registry=r,
        )
        self.api_requests = Counter(
            "herd_api_requests",
            "Requests by API (chat, responses, completions, forward, ...) and how they were answered: leader, "
            "follower, cache, bypass or error", ["api", "outcome"], registry=r,
        )
        self.embedding_inputs = Counter(
            "herd_embedding_inputs", "Inputs of POST /v1/embeddings by how each distinct input of a request was "
            "answered: upstream (in this request's own call), joined (another request's call) or cache",
            ["source"], registry=r,
        )
        self.errors = Counter("herd_errors", "Error answers by HTTP status", ["status"], registry=r)
        self.upstream_calls = Counter("herd_upstream_calls", "Calls made to upstreams", ["upstream"], registry=r)
        self.upstream_errors = Counter(
            "herd_upstream_errors", "Upstream calls that failed", ["upstream", "kind"], registry=r
        )
        self.upstream_latency = Histogram(
            "herd_upstream_seconds", "Upstream call duration", ["upstream"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.upstream_ttft = Histogram(
            "herd_upstream_ttft_seconds", "Upstream time to first chunk (of a non-stream call: to its whole answer)",
            ["upstream"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.flights = Gauge("herd_inflight_flights", "Flights in progress", registry=r)
        self.waiters = Gauge("herd_inflight_waiters", "Requests waiting on flights", registry=r)
        self.similarity = Histogram(
            "herd_semantic_similarity",
            "Similarity of semantic merges",
            buckets=(0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0),
            registry=r,
        )
        self.tokens = Counter(
            "herd_tokens", "Tokens by model, kind (prompt|completion) and whether herd spent or saved them",
            ["model", "kind", "outcome"], registry=r,
        )
        self.dollars = Counter(
            "herd_dollars", "Estimated USD by model, spent upstream or saved by herd ([metrics] prices)",
            ["model", "outcome"], registry=r,
        )
        self.tenant_dollars = Counter(
            "herd_tenant_dollars", "Estimated USD by hashed tenant ([metrics] tenant_labels)",
            ["tenant", "outcome"], registry=r,
        )
        self.coalesce_ratio_gauge = Gauge(
            "herd_coalesce_ratio", "Share of served requests that needed no upstream call of their own", registry=r
        )
        self.embedding_seconds = Histogram(
            "herd_embedding_seconds", "Duration of one embedding run (a micro-batch)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r,
        )
        self.embedding_batch_size = Histogram(
            "herd_embedding_batch_size", "Texts embedded together in one run",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r,
        )
        self.fanout_lag = Histogram(
            "herd_fanout_lag_seconds",
            "From a flight's end to each of its waiters' answer being written in full (the fan-out)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r,
        )
        self.shared_samples = Counter(
            "herd_shared_samples",
            "Sampled requests (temperature > 0, no seed) answered with a draw made for another request, by how",
            ["outcome"], registry=r,
        )
        for outcome in ("follower", "cache"):
            self.shared_samples.labels(outcome)
        self.disconnects = Counter(
            "herd_client_disconnects", "Requests whose client went away before its answer", ["role"], registry=r
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        # resilience and capacity (proxy.dispatch, proxy.resilience, proxy.upstream.vllm)
        self.upstream_retries = Counter(
            "herd_upstream_retries", "Upstream calls tried again after a retryable failure", ["upstream"], registry=r
        )
        self.upstream_fallbacks = Counter(
            "herd_upstream_fallbacks", "Flights handed to a fallback upstream", ["upstream", "fallback"], registry=r
        )
        self.circuit_state = Gauge(
            "herd_circuit_state", "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open", ["upstream"],
            registry=r,
        )
        self.rate_limit_wait = Histogram(
            "herd_rate_limit_wait_seconds", "Time calls waited for herd's own rate limits", ["upstream"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.rate_limited = Counter(
            "herd_rate_limited", "Calls refused by herd's own rate limits (429)", ["upstream"], registry=r
        )
        self.concurrency_limit = Gauge(
            "herd_upstream_concurrency_limit", "Adaptive concurrency limit of a GPU backend", ["upstream"], registry=r
        )
        self.concurrency = Gauge("herd_upstream_concurrency", "Calls running on a GPU backend", ["upstream"],
                                 registry=r)
        self.queue_depth = Gauge(
            "herd_upstream_queue_depth", "Calls queued in herd for a GPU backend's slot", ["upstream"], registry=r
        )
        # the memory cache (proxy.cache): bounded by [cache] max_bytes and max_entries
        self.cache_bytes = Gauge("herd_cache_bytes", "Bytes the memory cache's answers take", registry=r)
        self.cache_entries = Gauge("herd_cache_entries", "Answers in the memory cache", registry=r)
        self.cache_evictions = Counter(
            "herd_cache_evictions", "Cached answers dropped (least recently used first) to stay within the bounds",
            registry=r,
        )
        # [server] workers > 1 without Redis (proxy.node.NodeCache): a miss here that a sibling kept
        self.node_cache_asks = Counter(
            "herd_node_cache_asks",
            "Answers asked of the sibling worker that kept them: hit, or miss (it no longer has them)",
            ["result"], registry=r,
        )
        # clients cut off by herd (proxy.responses): past their deadline, unsent bytes dropped
        self.clients_cut = Counter(
            "herd_clients_cut", "Connections herd dropped because the client did not read its answer in time",
            registry=r,
        )
        # Redis (proxy.redis): present only with [redis] url
        self.redis_up = Gauge(
            "herd_redis_up", "1 while Redis answers; 0 while herd serves local-only", ["backend"], registry=r
        )
        self.redis_errors = Counter(
            "herd_redis_errors", "Redis operations that failed or timed out, by kind", ["kind"], registry=r
        )
        self.shared_flights = Counter(
            "herd_shared_flights", "Cross-replica flights by role (lead, follow, takeover)", ["role"], registry=r
        )
        for metric in vars(self).values():
            if getattr(metric, "_labelnames", None):
                _memoize_labels(metric)
            elif isinstance(metric, (Counter, Histogram)):
                _fast(metric)

    def observe_embedding(self, size: int, seconds: float) -> None:
        self.embedding_batch_size.observe(size)
        self.embedding_seconds.observe(seconds)

    def coalesce_ratio(self) -> float:
        served = _total(self.requests, lambda labels: labels["outcome"] in ("leader", "follower", "cache", "bypass"))
        calls = _total(self.upstream_calls)
        return 1.0 - calls / served if served else 0.0

    def render(self) -> bytes:
        self.coalesce_ratio_gauge.set(self.coalesce_ratio())
        return generate_latest(self.registry)
