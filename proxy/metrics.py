"""Prometheus metrics, on a registry of the app's own (no globals, no secrets, bounded labels)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OUTCOMES = ("leader", "follower", "cache", "bypass", "error")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("herd_requests", "Chat requests by how they were served", ["outcome"], registry=r)
        self.errors = Counter("herd_errors", "Error answers by HTTP status", ["status"], registry=r)
        self.upstream_calls = Counter("herd_upstream_calls", "Calls made to upstreams", ["upstream"], registry=r)
        self.upstream_errors = Counter(
            "herd_upstream_errors", "Upstream calls that failed", ["upstream", "kind"], registry=r
        )
        self.upstream_latency = Histogram(
            "herd_upstream_seconds", "Upstream call duration", ["upstream"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.upstream_ttft = Histogram(
            "herd_upstream_ttft_seconds", "Upstream time to first chunk", ["upstream"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.flights = Gauge("herd_inflight_flights", "Flights in progress", registry=r)
        self.waiters = Gauge("herd_inflight_waiters", "Requests waiting on flights", registry=r)
        self.similarity = Histogram(
            "herd_semantic_similarity",
            "Similarity of semantic merges",
            buckets=(0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0),
            registry=r,
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome)

    def coalesce_ratio(self) -> float:
        served = sum(self.requests.labels(o)._value.get() for o in ("leader", "follower", "cache", "bypass"))
        calls = sum(m._value.get() for m in self.upstream_calls._metrics.values())
        return 1.0 - calls / served if served else 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
