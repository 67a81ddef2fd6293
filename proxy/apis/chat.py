"""POST /v1/chat/completions: parse + validate, scope and keys, the chat wire, rendering.

Scope = API + tenant + upstream route + model + every output-affecting parameter. Only the
fields listed in STREAM_ONLY leave the scope; any field herd does not know stays in it,
so an unknown parameter can never make two different requests share an answer.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.apis.base import (
    Api,
    ApiRequest,
    ChoicesWire,
    canonical_params,
    check_error_object,
    check_range,
    digest,
    dumps_sorted,
    fail,
    load_object,
    malformed_answer,
    require_model,
    require_stream_flag,
)
from proxy.chunks import Chunk, assemble, malformed, malformed_completion, split
from proxy.sampling import is_sampled
from proxy.sse import DONE

# Fields that change how an answer is delivered, never what it says.
STREAM_ONLY = frozenset({"stream", "stream_options"})
# Numeric parameters where 1 and 1.0 mean the same thing.
FLOAT_PARAMS = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty"})
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Parameters whose objects are plain maps: the order of their keys means nothing. In any
# other object (a JSON schema in response_format or tools, an unknown parameter) the order
# is kept: structured outputs write an answer's fields in its schema's order.
UNORDERED_PARAMS = frozenset({"logit_bias", "metadata", "audio", "prediction", "web_search_options"})
# Content parts whose payload is one string field, checked as the API checks them: that
# field is required and a string, and nothing else may be in the part. (Other kinds of part
# go to the upstream and into the keys as they are.)
STRING_PARTS = {"text": "text", "refusal": "refusal"}


class ChatWire(ChoicesWire):
    """OpenAI chat completions: `chat.completion.chunk`s, ended by a finish_reason and [DONE]."""

    name = "chat"
    path = "chat/completions"
    title = "chat completions"

    def malformed(self, data: Any) -> str | None:
        return malformed(data)

    def whole(self, raw: bytes, upstream: str) -> list[Chunk]:
        data = orjson.loads(raw)
        check_error_object(data, raw, upstream)
        if (why := malformed_completion(data)) is not None:
            raise malformed_answer(upstream, why)
        chunks = split(data, raw)
        for chunk in chunks:
            if (why := malformed(chunk.data)) is not None:
                raise malformed_answer(upstream, why)
        return chunks


CHAT_WIRE = ChatWire()


@dataclass(eq=False)
class ChatRequest(ApiRequest):
    messages: list[dict[str, Any]] = field(default_factory=list)


class ChatApi(Api):
    name = "chat"
    path = "/v1/chat/completions"
    wire = CHAT_WIRE
    stream_end = DONE

    def parse(self, raw: bytes) -> ChatRequest:
        return parse_chat(raw)

    def keys(self, req: ApiRequest, tenant: str, route: str) -> None:
        assert isinstance(req, ChatRequest)
        assign_keys(req, tenant, route)

    def assemble(self, chunks: list[Chunk]) -> dict[str, Any]:
        return assemble(chunks)


CHAT = ChatApi()


def _check_message(i: int, m: Any) -> None:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise fail(f"'{where}' must be an object", where, "invalid_type")
    role = m.get("role")
    if not isinstance(role, str):
        raise fail(f"'{where}.role' is required and must be a string", f"{where}.role", "missing_required_parameter")
    if role not in ROLES:
        raise fail(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}, got {role!r}", f"{where}.role")
    content = m.get("content")
    if content is None:
        if role in ("user", "system", "developer"):
            raise fail(f"'{where}.content' is required for role {role!r}", f"{where}.content",
                       "missing_required_parameter")
        return
    if isinstance(content, str):
        return
    if isinstance(content, list):
        for j, part in enumerate(content):
            _check_part(f"{where}.content[{j}]", part)
        return
    raise fail(f"'{where}.content' must be a string or an array of content parts", f"{where}.content", "invalid_type")


def _check_part(where: str, part: Any) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise fail(f"'{where}' must be an object with a 'type'", where, "invalid_type")
    field_name = STRING_PARTS.get(part["type"])
    if field_name is None:
        return
    value = part.get(field_name)
    if value is None:
        raise fail(f"'{where}.{field_name}' is required", f"{where}.{field_name}", "missing_required_parameter")
    if not isinstance(value, str):
        raise fail(
            f"'{where}.{field_name}' must be a string, got {type(value).__name__}", f"{where}.{field_name}",
            "invalid_type",
        )
    extra = sorted(set(part) - {"type", field_name})
    if extra:
        raise fail(f"Additional properties are not allowed ({extra[0]!r} was unexpected) in '{where}'", where,
                   "invalid_value")


def parse_chat(raw: bytes) -> ChatRequest:
    """Parse and validate a chat completion request body; raise InvalidRequest (400) on bad input."""
    body = load_object(raw)
    model = require_model(body)
    messages = body.get("messages")
    if messages is None:
        raise fail("'messages' is a required property", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise fail("'messages' must be an array", "messages", "invalid_type")
    if not messages:
        raise fail("'messages' must contain at least one message", "messages", "empty_array")
    for i, m in enumerate(messages):
        _check_message(i, m)
    stream = require_stream_flag(body)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise fail("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = bool(options and options.get("include_usage"))
    if options and "include_usage" in options and not isinstance(options["include_usage"], bool):
        raise fail("'stream_options.include_usage' must be a boolean", "stream_options.include_usage", "invalid_type")
    check_range(body, "temperature", 0, 2)
    check_range(body, "top_p", 0, 1)
    check_range(body, "presence_penalty", -2, 2)
    check_range(body, "frequency_penalty", -2, 2)
    check_range(body, "n", 1, 128, integer=True)
    check_range(body, "max_tokens", 1, 2**31, integer=True)
    check_range(body, "max_completion_tokens", 1, 2**31, integer=True)
    check_range(body, "top_logprobs", 0, 20, integer=True)
    check_range(body, "seed", -(2**63), 2**63, integer=True)
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4)
    ):
        raise fail("'stop' must be a string or an array of at most 4 strings", "stop", "invalid_type")
    for name in ("tools", "functions"):
        value = body.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(t, dict) for t in value)):
            raise fail(f"'{name}' must be an array of objects", name, "invalid_type")
    for name in ("response_format", "logit_bias", "metadata"):
        value = body.get(name)
        if value is not None and not isinstance(value, dict):
            raise fail(f"'{name}' must be an object", name, "invalid_type")
    for name in ("logprobs", "parallel_tool_calls"):
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise fail(f"'{name}' must be a boolean", name, "invalid_type")
    return ChatRequest(api=CHAT, body=body, model=model, messages=messages, stream=stream,
                       include_usage=include_usage, sampled=is_sampled(body))


def text_of(content: Any) -> str | None:
    """The text of a message's content: a string, or a list of exactly one (validated) text part.

    Several text parts are left alone: how the API joins them is its business, so they
    never merge with one string that holds the same characters.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list) and len(content) == 1 and content[0].get("type") == "text":
        return content[0]["text"]
    return None


def _canonical_message(m: dict) -> dict:
    # A content list made of one text part says the same as a plain string.
    content = m.get("content")
    if isinstance(content, list):
        text = text_of(content)
        if text is not None:
            return {**m, "content": text}
    return m


def assign_keys(req: ChatRequest, tenant: str, route: str) -> ChatRequest:
    """Fill scope, exact key, semantic group and final text of `req`."""
    params = dumps_sorted(canonical_params(req.body, STREAM_ONLY | {"messages"}, FLOAT_PARAMS, UNORDERED_PARAMS))
    req.scope = digest(CHAT.name.encode(), tenant.encode(), route.encode(), params)
    messages = [_canonical_message(m) for m in req.messages]
    req.key = digest(b"exact", req.scope.encode(), dumps_sorted(messages))
    last = messages[-1]
    if last.get("role") == "user" and set(last) <= {"role", "content"}:
        text = text_of(last.get("content"))
        if text is not None:
            req.final_text = unicodedata.normalize("NFC", text)
            req.group = digest(b"group", req.scope.encode(), dumps_sorted(messages[:-1]))
    return req
