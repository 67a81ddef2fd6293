"""What each answer cost, and what herd saved: tokens and estimated dollars per model.

The leader's (or a bypass request's) usage was spent upstream; a follower or a cache hit
got the same answer for nothing, so its usage counts as saved. Label values are bounded:
past a cap, new models or tenants are counted as "other".
"""

from __future__ import annotations

import fnmatch
import functools
from typing import Any

from proxy.config import MODEL_MEMO, MetricsConfig
from proxy.metrics import Metrics

SPENT_ROLES = frozenset({"leader", "bypass"})
SAVED_ROLES = frozenset({"follower", "cache"})


class LabelCap:
    """Keeps the first `limit` distinct values of a label; later ones become "other"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return "other"


class Accountant:
    def __init__(self, cfg: MetricsConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._models = LabelCap(100)
        self._tenants = LabelCap(cfg.max_tenant_labels)
        # model names come from clients: a bounded memo of the glob lookup
        self.price = functools.lru_cache(maxsize=MODEL_MEMO)(self._price)

    def _price(self, model: str) -> tuple[float, float] | None:
        """USD per million (prompt, completion) tokens, from the first matching glob."""
        for pattern, price in self.cfg.prices.items():
            if fnmatch.fnmatchcase(model, pattern):
                return float(price.get("input", 0.0)), float(price.get("output", 0.0))
        return None

    def record(self, role: str, model: str, tenant: str, usage: dict[str, Any] | None) -> None:
        if not usage or role not in SPENT_ROLES | SAVED_ROLES:
            return
        outcome = "spent" if role in SPENT_ROLES else "saved"
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        label = self._models(model)
        self.metrics.tokens.labels(label, "prompt", outcome).inc(prompt)
        self.metrics.tokens.labels(label, "completion", outcome).inc(completion)
        price = self.price(model)
        if price is None:
            return
        dollars = (prompt * price[0] + completion * price[1]) / 1e6
        self.metrics.dollars.labels(label, outcome).inc(dollars)
        if self.cfg.tenant_labels:
            self.metrics.tenant_dollars.labels(self._tenants(tenant), outcome).inc(dollars)


def usage_of(chunks: list) -> dict[str, Any] | None:
    """The usage a flight's chunks report (the last chunk that carries one)."""
    for chunk in reversed(chunks):
        usage = chunk.usage if hasattr(chunk, "usage") else chunk.get("usage")
        if usage:
            return usage
    return None
