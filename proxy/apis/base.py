"""What every client API herd coalesces provides, so the gateway needs to know none of them.

Two halves, because what a client speaks and what a flight carries can differ (an
Anthropic Messages client answered from an OpenAI chat upstream):

* `Wire`: the upstream side, the protocol of the chunks a flight carries. Where the call
  goes below an upstream's base URL, its stream and non-stream bodies, how a stream's
  events become chunks (and which one ends it), how a one-piece answer splits into the
  chunks it would have been streamed as, and the usage the answer reports.
* `Api`: the client side. Parse and validate a body into an `ApiRequest` (its upstream
  call, its scope and keys, the semantic text, whether it is a random draw), and render a
  flight to one waiter: SSE events, the end of a stream, one JSON body, errors.

`ApiRequest` is the API-neutral plan the gateway runs: it reads `model`, `body`,
`stream`, `sampled`, `private`, `key`, `group`, `final_text`, `wire` and nothing else.
A flight's SSE events and JSON body are rendered once for all its waiters (proxy.answer):
a chunk whose data has a `type` goes out as a typed event (`event:` line), others as data.
Nothing here knows HTTP frameworks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from proxy import sse
from proxy.chunks import Chunk
from proxy.errors import HerdError, InvalidRequest, UpstreamError, UpstreamUnavailable

if TYPE_CHECKING:
    from proxy.coalescer import Flight
    from proxy.sse import Event


def digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def dumps_sorted(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def fail(message: str, param: str | None, code: str | None = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def load_object(raw: bytes) -> dict[str, Any]:
    """A request body: a JSON object, else OpenAI's 400."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    return body


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise fail("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise fail("'model' must be a non-empty string", "model", "invalid_type")
    return model


def require_stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise fail("'stream' must be a boolean", "stream", "invalid_type")
    return bool(stream)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_range(body: dict, name: str, lo: float, hi: float, integer: bool = False) -> None:
    if name not in body or body[name] is None:
        return
    v = body[name]
    ok = is_int(v) if integer else is_number(v)
    if not ok:
        kind = "an integer" if integer else "a number"
        raise fail(f"'{name}' must be {kind}, got {type(v).__name__}", name, "invalid_type")
    if not lo <= v <= hi:
        raise fail(f"'{name}' must be between {lo:g} and {hi:g}, got {v}", name)


def check_types(body: dict, kinds: dict[str, tuple[type, str]]) -> None:
    """`name: (type, what)`: a present, non-null field must be of that type."""
    for name, (kind, what) in kinds.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
            raise fail(f"'{name}' must be {what}", name, "invalid_type")


def canonical_params(body: dict, skip: frozenset[str], floats: frozenset[str], unordered: frozenset[str]) -> dict:
    """The output-affecting fields of `body` for a key: all of them but `skip`. Numbers in
    `floats` compare as floats (1 == 1.0); objects in `unordered` are plain maps (sorted),
    every other object or array keeps its order (a JSON schema's order is meaning)."""
    out = {}
    for k, v in body.items():
        if k in skip:
            continue
        if k in floats and is_number(v):
            v = float(v) + 0.0  # + 0.0: -0.0 is 0.0 too
        elif isinstance(v, (dict, list)) and k not in unordered:
            v = orjson.Fragment(orjson.dumps(v))  # serialized as it came: not sorted
        out[k] = v
    return out


def check_error_object(data: Any, raw: bytes, upstream: str) -> None:
    """An OpenAI-compatible answer that is an error object (with a 200 status) is the
    upstream's error: raised as a 502 carrying its body."""
    if isinstance(data, dict) and "error" in data and "choices" not in data:
        raise UpstreamError(502, raw, upstream=upstream)


def malformed_answer(upstream: str, why: str) -> UpstreamUnavailable:
    """An answer herd cannot pass on or assemble: the upstream's fault, a 502, never cached."""
    return UpstreamUnavailable(f"upstream {upstream!r} sent a malformed answer: {why}", code="upstream_malformed")


class Wire:
    """The upstream protocol a flight's chunks speak (see the module docstring).

    The defaults are the OpenAI-compatible ones; an OpenAI-compatible upstream calls
    `path` under its base URL with `stream_payload` or `whole_payload`.
    """

    name: ClassVar[str] = "base"
    path: ClassVar[str] = ""
    title: ClassVar[str] = ""  # for messages: "the Responses API"

    def per_call(self) -> Wire:
        """The wire for one upstream call: itself, or a fresh copy where reading an answer
        keeps state (a translation that remembers what it has opened)."""
        return self

    def stream_payload(self, body: dict) -> dict:
        return {**body, "stream": True}

    def whole_payload(self, body: dict) -> dict:
        return {**body, "stream": False}

    def events(self, events: list[Event], upstream: str) -> tuple[list[Chunk], bool, bool]:
        """The chunks these SSE events carry; whether the answer is complete; whether the
        stream said it has nothing more ([DONE])."""
        raise NotImplementedError

    def whole(self, raw: bytes, upstream: str) -> list[Chunk]:
        """A one-piece (non-stream) answer as the chunks it would have been streamed as,
        its own bytes kept on the first (Chunk.whole) for non-stream waiters."""
        raise NotImplementedError

    def usage(self, chunks: list[Chunk]) -> dict[str, Any] | None:
        """The usage the chunks report, in chat terms (prompt_tokens, completion_tokens,
        total_tokens), for accounting and rate limits: by default the last `usage`."""
        for chunk in reversed(chunks):
            if chunk.usage:  # read once when the chunk was made (a chunk's object is not kept)
                return chunk.usage
        return None

    def answer_usage(self, usage: dict[str, Any] | None) -> dict[str, Any] | None:
        """A stored answer's usage (proxy.answer.Answer.usage, in the API's own terms) in chat terms."""
        return usage

    def flight_usage(self, flight: Flight) -> dict[str, Any] | None:
        """The usage a flight's answer reports, in chat terms (for accounting)."""
        if flight.answer is not None and not flight.chunks:  # a cached answer: no chunks to read
            return self.answer_usage(flight.answer.usage)
        return self.usage(flight.chunks)

    def cacheable(self, chunks: list[Chunk]) -> bool:
        """Whether a cleanly finished answer may be kept in the cache (a Responses stream
        that ended in `response.failed` may not)."""
        return True

    def content(self, data: dict) -> Any:
        """What two answers' n-th chunks must share to be the same answer (ids and times
        aside): a replica that takes over a stream checks its own against what was sent."""
        return data.get("choices") or []


class ChoicesWire(Wire):
    """The OpenAI wires whose chunks carry `choices` (chat completions, legacy completions):
    a stream asks for usage, ends with [DONE], and an error object in place of a chunk is
    the upstream's error. Each wire says what a malformed chunk of its own is."""

    def malformed(self, data: Any) -> str | None:
        """Why `data` is not a chunk of this wire herd can pass on and assemble, or None."""
        raise NotImplementedError

    def stream_payload(self, body: dict) -> dict:
        return {**body, "stream": True, "stream_options": {"include_usage": True}}

    def whole_payload(self, body: dict) -> dict:
        payload = {k: v for k, v in body.items() if k != "stream_options"}
        payload["stream"] = False
        return payload

    def events(self, events: list[Event], upstream: str) -> tuple[list[Chunk], bool, bool]:
        batch: list[Chunk] = []
        finished = False
        for event in events:
            if event.data == b"[DONE]":
                return batch, finished, True
            data = orjson.loads(event.data)
            check_error_object(data, event.data, upstream)
            if (why := self.malformed(data)) is not None:
                raise malformed_answer(upstream, why)
            if any(c.get("finish_reason") for c in data.get("choices") or ()):
                finished = True
            batch.append(Chunk(data, event.data))
        return batch, finished, False


@dataclass(eq=False)
class ApiRequest:
    """One parsed, validated request of any API: what the gateway runs."""

    api: Api
    body: dict[str, Any]  # the upstream call's body (the client's, as validated)
    model: str
    stream: bool  # the client wants SSE
    include_usage: bool = True  # usage-only chunks (chat's last) go to this stream waiter
    sampled: bool = False  # a random draw (proxy.sampling.is_sampled)
    # Never coalesced or cached (background work, calls that change server state): its
    # reason, for logs. Such a request gets a private flight through the same dispatcher.
    private: str | None = None
    # filled by Api.keys()
    scope: str = ""
    key: str = ""
    group: str = ""  # scope + everything but the final user text (semantic grouping)
    final_text: str | None = None  # the text a semantic merge compares, when there is one
    # the API's own request headers that go with the upstream call (anthropic-version)
    upstream_headers: dict[str, str] = field(default_factory=dict)

    @property
    def wire(self) -> Wire:
        return self.api.wire


class Api:
    """A client API: parse, keys, render (see the module docstring)."""

    name: ClassVar[str] = "base"  # metric label, access log, key domain
    path: ClassVar[str] = ""  # its route, e.g. "/v1/chat/completions"
    wire: ClassVar[Wire]
    stream_end: ClassVar[bytes] = b""  # written after the last event of a clean stream

    def parse(self, raw: bytes) -> ApiRequest:
        raise NotImplementedError

    def read_headers(self, req: ApiRequest, headers: Mapping[str, str]) -> None:
        """Read the API's own request headers into `req` (by default, none)."""

    def keys(self, req: ApiRequest, tenant: str, route: str) -> None:
        """Fill req.scope, req.key and, for semantic matching, req.group and req.final_text.
        The API's name is part of every key: two APIs never share an answer."""
        raise NotImplementedError

    def assemble(self, chunks: list[Chunk]) -> dict[str, Any]:
        """The one JSON object a non-stream client gets for a flight's chunks (when the
        upstream did not send it whole)."""
        raise NotImplementedError

    def stream_error(self, error: HerdError) -> bytes:
        """What ends a stream that failed after it started: the error as a last SSE event,
        then the stream's end marker (chat: [DONE], so clients that wait for it stop)."""
        return sse.event(orjson.dumps(error.body())) + self.stream_end

    def error_body(self, error: HerdError) -> tuple[bytes, str]:
        """(body, content type) of an error answered before anything was sent."""
        return error.body_bytes(), error.content_type

