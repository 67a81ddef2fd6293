"""POST /v1/embeddings, coalesced per input: parse + validate, per-input keys, the wire, the
raw vectors of an upstream answer, and the answer reassembled for one client.

Each input (a string, or an array of token ids) is its own key: API + tenant (with its
organization and project) + route + every field but `input` (model, dimensions,
encoding_format, user, and any field herd does not know) + the input itself. The gateway
(Gateway.embed) joins inputs already in flight, serves cached ones from the cache, and sends
only the missing ones upstream in one call; with [redis] share_flights, the missing ones are
first claimed across replicas (Gateway._embed_shared: an input's shared flight is one chunk,
its cache entry). Embeddings are deterministic: the sampled policy never applies.

Vectors are kept as the upstream wrote them: the raw bytes of each `embedding` value (a JSON
array of numbers in the upstream's own formatting, or its base64 string) are cut out of the
answer and written back unchanged, so an answer through herd carries exactly the vectors
the upstream sent.

Usage: the upstream reports one `usage` per call, not per input. Each input is attributed
its share of the call's prompt tokens, in proportion to its own tiktoken count (the largest
remainders rounded up, so a call's shares add up to what the upstream counted; an input of
token ids counts its ids). A client's usage is the sum of its inputs' shares, each input
counted once per time the client sent it, whether its vector came from its own call, a
flight it joined or the cache. For an OpenAI model the tiktoken count is the upstream's own,
so each share is exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.apis.base import (
    Wire,
    canonical_params,
    digest,
    dumps_sorted,
    fail,
    is_int,
    load_object,
    malformed_answer,
    require_model,
)
from proxy.chunks import Chunk
from proxy.errors import UpstreamError

NAME = "embeddings"
PATH = "/v1/embeddings"
MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
FORMATS = ("float", "base64")
# `"embedding": ` then the value: a base64 string (no escapes) or an array of numbers (no nesting)
_EMBEDDING = re.compile(rb'"embedding"\s*:\s*("[^"\\]*"|\[[^\]\[]*\])')


class EmbeddingsWire(Wire):
    """One non-stream call; its answer is one chunk holding the upstream's bytes."""

    name = NAME
    path = "embeddings"
    title = "Embeddings API (POST /v1/embeddings)"

    def stream_payload(self, body: dict) -> dict:
        return body  # embeddings never stream

    def whole_payload(self, body: dict) -> dict:
        return body

    def whole(self, raw: bytes, upstream: str) -> list[Chunk]:
        data = orjson.loads(raw)
        if isinstance(data, dict) and "error" in data and "data" not in data:
            raise UpstreamError(502, raw, upstream=upstream)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise malformed_answer(upstream, "a body that is not an embeddings list")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        chunk = Chunk({"usage": usage or None})
        chunk.whole = raw
        return [chunk]

    def events(self, events, upstream: str):  # pragma: no cover - never called: no stream
        raise malformed_answer(upstream, "an event stream for embeddings")


EMBEDDINGS_WIRE = EmbeddingsWire()


@dataclass(eq=False)
class EmbeddingsRequest:
    body: dict[str, Any]
    model: str
    inputs: list[Any]  # each a string or a list of token ids
    scope: str = ""
    keys: list[str] = field(default_factory=list)  # per input, filled by assign_keys


def parse_embeddings(raw: bytes) -> EmbeddingsRequest:
    """Parse and validate an embeddings request body; raise InvalidRequest (400) on bad input."""
    body = load_object(raw)
    model = require_model(body)
    value = body.get("input")
    if value is None:
        raise fail("'input' is a required property", "input", "missing_required_parameter")
    inputs: list[Any]
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and value and all(is_int(t) for t in value):
        inputs = [value]  # one input of token ids
    elif isinstance(value, list):
        if not value:
            raise fail("'input' must not be empty", "input", "empty_array")
        for i, item in enumerate(value):
            if isinstance(item, str) or (isinstance(item, list) and item and all(is_int(t) for t in item)):
                continue
            raise fail(f"'input[{i}]' must be a string or a non-empty array of token ids", f"input[{i}]",
                       "invalid_type")
        inputs = list(value)
    else:
        raise fail("'input' must be a string, an array of strings, or an array of token ids", "input",
                   "invalid_type")
    if len(inputs) > MAX_INPUTS:
        raise fail(f"'input' may hold at most {MAX_INPUTS} inputs, got {len(inputs)}", "input")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in FORMATS:
        raise fail(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (not is_int(dims) or dims < 1):
        raise fail("'dimensions' must be a positive integer", "dimensions", "invalid_type")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise fail("'user' must be a string", "user", "invalid_type")
    return EmbeddingsRequest(body=body, model=model, inputs=inputs)


def assign_keys(req: EmbeddingsRequest, tenant: str, route: str) -> None:
    """The scope (every field but `input`, with the format's default written out) and one key per input."""
    params = {k: v for k, v in req.body.items() if k != "encoding_format"}
    params["encoding_format"] = req.body.get("encoding_format") or "float"
    req.scope = digest(NAME.encode(), tenant.encode(), route.encode(),
                       dumps_sorted(canonical_params(params, frozenset({"input"}), frozenset(), frozenset())))
    scope = req.scope.encode()
    req.keys = [digest(b"input", scope, orjson.dumps(item)) for item in req.inputs]


def vectors(raw: bytes, upstream: str, count: int) -> tuple[list[bytes], str | None, int | None]:
    """The raw `embedding` values of an upstream answer to `count` inputs, in input order;
    the model it names; its prompt tokens."""
    data = orjson.loads(raw)
    items = data["data"]
    found = [m.group(1) for m in _EMBEDDING.finditer(raw)]
    if len(items) != count or len(found) != count:
        raise malformed_answer(upstream, f"{len(items)} embeddings for {count} inputs")
    out: list[bytes | None] = [None] * count
    for position, (item, value) in enumerate(zip(items, found, strict=True)):
        index = item.get("index", position) if isinstance(item, dict) else -1
        if not is_int(index) or not 0 <= index < count or out[index] is not None:
            raise malformed_answer(upstream, "embeddings whose indexes are not 0..n-1")
        out[index] = value
    usage = data.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    model = data.get("model")
    return out, model if isinstance(model, str) else None, tokens if is_int(tokens) else None  # type: ignore[return-value]


def shares(total: int | None, weights: list[int]) -> list[int]:
    """`total` split over inputs in proportion to `weights`, adding up to `total` (largest
    remainders first); the weights themselves when the upstream reported no total."""
    if total is None:
        return list(weights)
    whole = sum(weights)
    if whole <= 0:
        base = [total // len(weights)] * len(weights)
        for i in range(total - sum(base)):
            base[i] += 1
        return base
    exact = [total * w / whole for w in weights]
    base = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - base[i], reverse=True)
    for i in order[: total - sum(base)]:
        base[i] += 1
    return base


def entry(vector: bytes, tokens: int, model: str) -> bytes:
    """One input's answer as the cache keeps it: its tokens, the model, then its raw vector last."""
    return b'{"tokens":' + str(tokens).encode() + b',"model":' + orjson.dumps(model) + b',"embedding":' + vector + b"}"


def read_entry(raw: bytes) -> tuple[bytes, int, str]:
    """(vector, tokens, model) of an `entry`."""
    head, _, vector = raw.partition(b',"embedding":')
    meta = orjson.loads(head + b"}")
    return vector[:-1], meta["tokens"], meta["model"]


def render(entries: list[bytes], model: str) -> bytes:
    """The client's answer: its inputs' entries in its order, OpenAI's list shape."""
    parts, tokens = [], 0
    for i, raw in enumerate(entries):
        vector, n, _ = read_entry(raw)
        tokens += n
        parts.append(b'{"object":"embedding","index":' + str(i).encode() + b',"embedding":' + vector + b"}")
    usage = b'{"prompt_tokens":' + str(tokens).encode() + b',"total_tokens":' + str(tokens).encode() + b"}"
    return (b'{"object":"list","data":[' + b",".join(parts) + b'],"model":' + orjson.dumps(model)
            + b',"usage":' + usage + b"}")
