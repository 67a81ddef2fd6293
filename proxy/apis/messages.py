"""POST /v1/messages (Anthropic's Messages API, inbound): parse + validate, scope and keys,
the two wires, rendering in Anthropic's shapes.

A flight carries Messages stream events (`message_start`, `content_block_start`,
`content_block_delta`, `content_block_stop`, `message_delta`, `message_stop`, `ping`),
whichever upstream answers:

* an Anthropic upstream gets the client's body as it came (NATIVE_WIRE, called by
  AnthropicUpstream.call with the client's `anthropic-version` and `anthropic-beta`): its
  events are passed on byte for byte, thinking blocks, tool use and cache_control included;
* an OpenAI-compatible upstream (OpenAI, vLLM) gets the request translated to a chat
  completion (MESSAGES_WIRE, with proxy.upstream.anthropic's translation), and its chunks
  come back as Messages events.

Stream waiters get the events replayed from `message_start`; non-stream waiters the message
object (the upstream's own when it answered in one piece, else assembled from the events).
Errors take Anthropic's shape, `{"type": "error", "error": {"type": ..., "message": ...}}`,
before a stream starts and as an `error` event after.

Scope = API + tenant (a keyed hash of `x-api-key` or the bearer token, with organization
and project) + route + `anthropic-version` + `anthropic-beta` (its flags as a set) + every
field but `messages` and `stream` (system, max_tokens, sampling, tools, tool_choice,
thinking, metadata, and any field herd does not know). The exact key adds the messages; the
semantic group the messages but the last, when that is a user message of plain text.
Anthropic's default temperature is 1, so a request without one is sampled (proxy.sampling).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.apis.base import (
    Api,
    ApiRequest,
    Wire,
    canonical_params,
    check_error_object,
    check_range,
    digest,
    dumps_sorted,
    fail,
    is_int,
    load_object,
    malformed_answer,
    require_model,
    require_stream_flag,
)
from proxy.apis.chat import CHAT_WIRE
from proxy.chunks import Chunk, malformed_completion
from proxy.errors import HerdError, InvalidRequest, UpstreamError
from proxy.sampling import is_sampled
from proxy.sse import typed_event

STREAM_ONLY = frozenset({"stream"})
FLOAT_PARAMS = frozenset({"temperature", "top_p"})
UNORDERED_PARAMS = frozenset({"metadata"})
VERSION_HEADER = "anthropic-version"
BETA_HEADER = "anthropic-beta"
# Anthropic's error types by HTTP status (what its API answers with each)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
               504: "timeout_error", 529: "overloaded_error"}
# The status of an `error` event inside an upstream's stream (its HTTP status was 200)
EVENT_STATUS = {kind: status for status, kind in ERROR_TYPES.items()} | {"api_error": 500, "overloaded_error": 529}


def event_chunk(data: dict[str, Any], raw: bytes | None = None) -> Chunk:
    """A Messages stream event as a flight's chunk (a typed event: a `message_delta`'s usage
    is part of the event, never a usage-only chunk; see Chunk)."""
    chunk = Chunk(data, raw)
    chunk.usage = None  # read by MessagesWire.usage, which knows where Anthropic puts it
    return chunk


def malformed_event(data: dict[str, Any]) -> str | None:
    """Why a Messages stream event is not one herd can pass on and assemble, or None (the
    fields herd reads must have their types; anything else passes as it came)."""
    kind = data["type"]
    if kind == "message_start" and not (isinstance(data.get("message"), dict)
                                        and isinstance(data["message"].get("usage", {}), dict)):
        return "a message_start without a message object"
    if kind.startswith("content_block_") and not is_int(data.get("index")):
        return f"a {kind} without an integer index"
    if kind == "content_block_start" and not isinstance(data.get("content_block"), dict):
        return "a content_block_start without a block object"
    if kind == "content_block_delta":
        delta = data.get("delta")
        if not isinstance(delta, dict) or not all(isinstance(delta.get(k, ""), str) for k in
                                                  ("type", "text", "thinking", "signature", "partial_json")):
            return "a content_block_delta whose delta is not an object of strings"
    if kind == "message_delta" and not (isinstance(data.get("delta", {}), dict)
                                        and isinstance(data.get("usage", {}), dict)):
        return "a message_delta whose delta or usage is not an object"
    return None


def split_message(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The events a whole message object would have been streamed as."""
    usage: dict[str, Any] = message["usage"] if isinstance(message.get("usage"), dict) else {}
    started = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {**usage, "output_tokens": 0}}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": started}]
    for index, block in enumerate(message.get("content") or ()):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            events.append({"type": "content_block_start", "index": index, "content_block": {**block, "text": ""}})
            events.append({"type": "content_block_delta", "index": index,
                           "delta": {"type": "text_delta", "text": block.get("text") or ""}})
        elif kind == "thinking":
            events.append({"type": "content_block_start", "index": index,
                           "content_block": {**block, "thinking": "", "signature": ""}})
            events.append({"type": "content_block_delta", "index": index,
                           "delta": {"type": "thinking_delta", "thinking": block.get("thinking") or ""}})
            events.append({"type": "content_block_delta", "index": index,
                           "delta": {"type": "signature_delta", "signature": block.get("signature") or ""}})
        elif kind in ("tool_use", "server_tool_use"):
            events.append({"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}})
            events.append({"type": "content_block_delta", "index": index, "delta": {
                "type": "input_json_delta", "partial_json": orjson.dumps(block.get("input") or {}).decode()}})
        else:  # redacted thinking, server tool results: whole in their start event
            events.append({"type": "content_block_start", "index": index, "content_block": block})
        events.append({"type": "content_block_stop", "index": index})
    events.append({"type": "message_delta",
                   "delta": {"stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")},
                   "usage": usage})
    events.append({"type": "message_stop"})
    return events


def assemble_message(chunks: list[Chunk]) -> dict[str, Any]:
    """The message object a stream's events add up to."""
    message: dict[str, Any] = {}
    blocks: dict[int, dict[str, Any]] = {}
    json_parts: dict[int, list[str]] = {}
    for chunk in chunks:
        data = chunk.data
        kind = data.get("type")
        if kind == "message_start":
            message = dict(data.get("message") or {})
            message["usage"] = dict(message.get("usage") or {})
        elif kind == "content_block_start":
            blocks[data["index"]] = dict(data.get("content_block") or {})
        elif kind == "content_block_delta":
            block, delta = blocks.setdefault(data["index"], {}), data.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                block["text"] = (block.get("text") or "") + delta.get("text", "")
            elif dtype == "thinking_delta":
                block["thinking"] = (block.get("thinking") or "") + delta.get("thinking", "")
            elif dtype == "signature_delta":
                block["signature"] = delta.get("signature", "")
            elif dtype == "input_json_delta":
                json_parts.setdefault(data["index"], []).append(delta.get("partial_json", ""))
            elif dtype == "citations_delta":
                block.setdefault("citations", []).append(delta.get("citation"))
        elif kind == "message_delta":
            delta = data.get("delta") or {}
            for name in ("stop_reason", "stop_sequence"):
                if name in delta:
                    message[name] = delta[name]
            for name, value in (data.get("usage") or {}).items():
                if value is not None:
                    message.setdefault("usage", {})[name] = value
    for index, parts in json_parts.items():
        text = "".join(parts)
        try:
            blocks[index]["input"] = orjson.loads(text) if text else {}
        except orjson.JSONDecodeError:
            blocks[index]["input"] = {}
    message["content"] = [blocks[i] for i in sorted(blocks)]
    return message


def _anthropic_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Anthropic usage in chat terms (input counts cache reads and writes too)."""
    if not usage:
        return None
    prompt = sum(usage.get(k) or 0 for k in ("input_tokens", "cache_creation_input_tokens",
                                             "cache_read_input_tokens"))
    completion = usage.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _MessagesUsage(Wire):
    """What both Messages wires share: events in, usage in Anthropic's places."""

    def usage(self, chunks: list[Chunk]) -> dict[str, Any] | None:
        usage: dict[str, Any] = {}
        for chunk in chunks:  # Chunk.kind and .usage: read once per chunk, not parsed again per call
            if not isinstance(chunk.usage, dict):
                continue
            if chunk.kind == "message_start":  # its `message`'s usage
                usage.update(chunk.usage)
            elif chunk.kind == "message_delta":
                usage.update({k: v for k, v in chunk.usage.items() if v is not None})
        return _anthropic_usage(usage)

    def answer_usage(self, usage: dict[str, Any] | None) -> dict[str, Any] | None:
        return _anthropic_usage(usage)

    def content(self, data: dict) -> Any:
        return (data.get("type"), data.get("index"), data.get("delta"))


class NativeMessagesWire(_MessagesUsage):
    """The Messages API itself, on an Anthropic upstream: the body as it came (but `stream`)."""

    name = "messages"
    path = "messages"
    title = "Anthropic Messages API (POST /v1/messages)"

    def stream_payload(self, body: dict) -> dict:
        return {**body, "stream": True}

    def whole_payload(self, body: dict) -> dict:
        return {**body, "stream": False}

    def events(self, events, upstream: str) -> tuple[list[Chunk], bool, bool]:
        batch: list[Chunk] = []
        for event in events:
            if not event.data:
                continue
            data = orjson.loads(event.data)
            if not isinstance(data, dict) or not isinstance(data.get("type"), str):
                raise malformed_answer(upstream, "an event that is not an object with a type")
            if data["type"] == "error":
                detail: dict[str, Any] = data["error"] if isinstance(data.get("error"), dict) else {}
                raise UpstreamError(EVENT_STATUS.get(str(detail.get("type")), 502), event.data, upstream=upstream)
            if (why := malformed_event(data)) is not None:
                raise malformed_answer(upstream, why)
            batch.append(event_chunk(data, event.data))
            if data["type"] == "message_stop":
                return batch, True, True
        return batch, False, False

    def whole(self, raw: bytes, upstream: str) -> list[Chunk]:
        data = orjson.loads(raw)
        if isinstance(data, dict) and data.get("type") == "error":
            raise UpstreamError(502, raw, upstream=upstream)
        if not isinstance(data, dict) or not isinstance(data.get("content"), list):
            raise malformed_answer(upstream, "a body that is not a message")
        if not all(isinstance(block, dict) for block in data["content"]) or not isinstance(
                data.get("usage", {}), dict):
            raise malformed_answer(upstream, "a content block or usage that is not an object")
        chunks = [event_chunk(event) for event in split_message(data)]
        chunks[0].whole = raw
        return chunks


NATIVE_WIRE = NativeMessagesWire()


class MessagesWire(_MessagesUsage):
    """A Messages request as an OpenAI chat call; the chat answer as Messages events.

    Stateful per call (`per_call`): the translator remembers the blocks it opened."""

    name = "messages"
    path = "chat/completions"
    title = "Anthropic Messages API (POST /v1/messages)"

    def __init__(self) -> None:
        self._translator: Any = None

    def per_call(self) -> MessagesWire:
        from proxy.upstream.anthropic import MessagesTranslator

        wire = MessagesWire()
        wire._translator = MessagesTranslator()
        return wire

    def stream_payload(self, body: dict) -> dict:
        from proxy.upstream.anthropic import chat_request_of

        return CHAT_WIRE.stream_payload(chat_request_of(body))

    def whole_payload(self, body: dict) -> dict:
        from proxy.upstream.anthropic import chat_request_of

        return CHAT_WIRE.whole_payload(chat_request_of(body))

    def events(self, events, upstream: str) -> tuple[list[Chunk], bool, bool]:
        chunks, _, done = CHAT_WIRE.events(events, upstream)
        translator = self._translator
        out = [event_chunk(e) for chunk in chunks for e in translator.feed(chunk.data)]
        if done:
            out += [event_chunk(e) for e in translator.end()]
        return out, translator.done, done

    def whole(self, raw: bytes, upstream: str) -> list[Chunk]:
        from proxy.upstream.anthropic import message_of_completion

        data = orjson.loads(raw)
        check_error_object(data, raw, upstream)
        if (why := malformed_completion(data)) is not None:
            raise malformed_answer(upstream, why)
        message = message_of_completion(data)
        chunks = [event_chunk(event) for event in split_message(message)]
        chunks[0].whole = orjson.dumps(message)
        return chunks


MESSAGES_WIRE = MessagesWire()


@dataclass(eq=False)
class MessagesRequest(ApiRequest):
    messages: list[dict[str, Any]] = field(default_factory=list)


class MessagesApi(Api):
    name = "messages"
    path = "/v1/messages"
    wire = MESSAGES_WIRE
    stream_end = b""  # message_stop ends the stream

    def parse(self, raw: bytes) -> MessagesRequest:
        return parse_messages(raw)

    def read_headers(self, req: ApiRequest, headers: Mapping[str, str]) -> None:
        """`anthropic-version` (required, as Anthropic requires it) and `anthropic-beta`: sent
        to an Anthropic upstream, and part of the scope."""
        version = (headers.get(VERSION_HEADER) or "").strip()
        if not version:
            raise InvalidRequest("anthropic-version: header is required", param=VERSION_HEADER)
        req.upstream_headers = {VERSION_HEADER: version}
        beta = (headers.get(BETA_HEADER) or "").strip()
        if beta:
            req.upstream_headers[BETA_HEADER] = beta

    def keys(self, req: ApiRequest, tenant: str, route: str) -> None:
        assign_keys(req, tenant, route)

    def assemble(self, chunks: list[Chunk]) -> dict[str, Any]:
        return assemble_message(chunks)

    def stream_error(self, error: HerdError) -> bytes:
        return typed_event("error", orjson.dumps(anthropic_error(error)))

    def error_body(self, error: HerdError) -> tuple[bytes, str]:
        return orjson.dumps(anthropic_error(error)), "application/json"


MESSAGES = MessagesApi()


def anthropic_error(error: HerdError) -> dict[str, Any]:
    """`error` in Anthropic's shape: an Anthropic upstream's own error as it came, anything
    else typed by its status."""
    body = error.body()
    if isinstance(error, UpstreamError):
        try:
            raw = orjson.loads(error.raw_body) if error.raw_body else None
        except orjson.JSONDecodeError:
            raw = None
        if isinstance(raw, dict) and raw.get("type") == "error" and isinstance(raw.get("error"), dict):
            return raw
    inner: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
    kind = ERROR_TYPES.get(error.status) or ("api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": inner.get("message") or error.message}}


def _check_content(where: str, content: Any) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise fail(f"{where}: Input should be a valid string or a list of content blocks", where, "invalid_type")
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise fail(f"{where}.{j}: Input should be a valid content block", f"{where}.{j}", "invalid_type")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise fail(f"{where}.{j}.text: Field required", f"{where}.{j}.text", "missing_required_parameter")


def parse_messages(raw: bytes) -> MessagesRequest:
    """Parse and validate a Messages request body; raise InvalidRequest (400) on bad input."""
    body = load_object(raw)
    model = require_model(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise fail("max_tokens: Field required", "max_tokens", "missing_required_parameter")
    if not is_int(max_tokens) or max_tokens < 1:
        raise fail("max_tokens: Input should be an integer greater than or equal to 1", "max_tokens",
                   "invalid_type")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise fail("messages: Field required", "messages", "missing_required_parameter")
    if not messages:
        raise fail("messages: at least one message is required", "messages", "empty_array")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise fail(f"messages.{i}: Input should be a valid dictionary", f"messages.{i}", "invalid_type")
        if m.get("role") not in ("user", "assistant"):
            raise fail(f"messages.{i}.role: Input should be 'user' or 'assistant'", f"messages.{i}.role")
        if "content" not in m:
            raise fail(f"messages.{i}.content: Field required", f"messages.{i}.content", "missing_required_parameter")
        _check_content(f"messages.{i}.content", m["content"])
    stream = require_stream_flag(body)
    if body.get("system") is not None:
        _check_content("system", body["system"])
    check_range(body, "temperature", 0, 1)
    check_range(body, "top_p", 0, 1)
    check_range(body, "top_k", 0, 2**31, integer=True)
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise fail("stop_sequences: Input should be a valid list of strings", "stop_sequences", "invalid_type")
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise fail("tools: Input should be a valid list of tools", "tools", "invalid_type")
    for name in ("tool_choice", "metadata", "thinking"):
        value = body.get(name)
        if value is not None and not isinstance(value, dict):
            raise fail(f"{name}: Input should be a valid dictionary", name, "invalid_type")
    return MessagesRequest(api=MESSAGES, body=body, model=model, stream=stream, sampled=is_sampled(body),
                           messages=messages)


def _canonical_message(m: dict) -> dict:
    # one text block with nothing else says the same as a plain string
    content = m.get("content")
    if (isinstance(content, list) and len(content) == 1 and content[0].get("type") == "text"
            and set(content[0]) == {"type", "text"}):
        return {**m, "content": content[0]["text"]}
    return m


def _betas(value: str | None) -> list[str]:
    return sorted({flag.strip() for flag in (value or "").split(",") if flag.strip()})


def assign_keys(req: ApiRequest, tenant: str, route: str) -> ApiRequest:
    """Fill scope, exact key and, when the last message is a user's plain text, the semantic
    group and final text of `req`."""
    params = canonical_params(req.body, STREAM_ONLY | {"messages"}, FLOAT_PARAMS, UNORDERED_PARAMS)
    headers = {"version": req.upstream_headers.get(VERSION_HEADER, ""),
               "beta": _betas(req.upstream_headers.get(BETA_HEADER))}
    req.scope = digest(MESSAGES.name.encode(), tenant.encode(), route.encode(), dumps_sorted(headers),
                       dumps_sorted(params))
    messages = [_canonical_message(m) for m in req.body["messages"]]
    req.key = digest(b"exact", req.scope.encode(), dumps_sorted(messages))
    last = messages[-1]
    if last.get("role") == "user" and set(last) == {"role", "content"} and isinstance(last["content"], str):
        req.final_text = unicodedata.normalize("NFC", last["content"])
        req.group = digest(b"group", req.scope.encode(), dumps_sorted(messages[:-1]))
    return req
