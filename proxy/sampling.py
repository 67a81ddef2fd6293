"""Sampled requests: may two of them share one sample?

A request is *sampled* when its answer is a random draw: the effective temperature is above
0 and it carries no `seed`. Two identical sampled requests may still share one draw
(`share`: the saving herd exists for) or each get their own (`distinct`: best-of-n,
self-consistency votes, pass@k harnesses, "give me five variations"). Deterministic requests
are shared under either policy.

The policy is chosen, most specific first, by the request's `x-herd-sampled` header, the
client key's tenant ([[auth.keys]] sampled), the route ([[routes]] sampled), then
[coalesce] sampled. Nothing here knows HTTP; every API that coalesces calls `is_sampled`
with its own default temperature (chat, Responses, Messages: 1; embeddings: always
deterministic, so they need not ask).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.errors import InvalidRequest

SHARE = "share"
DISTINCT = "distinct"
POLICIES = (SHARE, DISTINCT)
HEADER = "x-herd-sampled"


def is_sampled(params: Mapping[str, Any], default_temperature: float = 1.0) -> bool:
    """Whether a request with these (validated) parameters asks for a random draw.

    - `seed` (any value but null) makes the draw reproducible: not sampled.
    - temperature absent or null means the API's default (OpenAI, Anthropic: 1).
    - temperature 0 is greedy decoding; so are top_p = 0 (only the likeliest token is left)
      and top_k = 1 (vLLM, Anthropic).
    - n > 1 adds nothing of its own: at temperature 0 the n choices are one answer n times,
      above 0 the request is sampled already.
    """
    if params.get("seed") is not None:
        return False
    temperature = params.get("temperature")
    if temperature is None:
        temperature = default_temperature
    if not _positive(temperature):
        return False
    top_p, top_k = params.get("top_p"), params.get("top_k")
    if top_p is not None and _number(top_p) and top_p <= 0:
        return False
    return not (top_k is not None and _number(top_k) and top_k == 1)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive(v: Any) -> bool:
    # a value the parser let through but that is not a number stays "sampled": refusing a
    # merge costs one call, a wrong merge hands one sample to a client that asked for its own
    return not _number(v) or v > 0


def parse_header(value: str | None) -> str | None:
    """The request's own policy from its `x-herd-sampled` header; None when absent or empty
    (as an empty x-herd-coalesce is)."""
    policy_ = (value or "").strip().lower()
    if not policy_:
        return None
    if policy_ not in POLICIES:
        raise InvalidRequest(f"{HEADER} must be share or distinct, got {value!r}", param=HEADER)
    return policy_


def policy(header: str | None, tenant: str, route: str, default: str) -> str:
    """The policy that applies: the most specific one set (an empty string is not set)."""
    return header or tenant or route or default


def distinct(sampled: bool, header: str | None, tenant: str, route: str, default: str) -> bool:
    """True when this request must get its own draw: a private flight, no cache read or write."""
    return sampled and policy(header, tenant, route, default) == DISTINCT
