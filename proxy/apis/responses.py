"""POST /v1/responses (OpenAI's Responses API): parse + validate, scope and keys, the wire,
rendering.

The flight carries the upstream's typed events as they came (`response.created` ...
`response.completed`, each with the upstream's `sequence_number`); stream waiters get them
replayed from the first, non-stream waiters the final `response` object. A one-piece
(non-stream) upstream answer is split into the events it would have been streamed as.

Scope = API + tenant (with its organization and project) + route + model + every field
but `input`, `stream` and `stream_options`: instructions, tools, tool_choice, text,
reasoning, sampling, max_output_tokens, truncation, include, previous_response_id, store,
metadata, parallel_tool_calls and any field herd does not know. The exact key adds the
input; the semantic group the input but its final user message.

Never shared (a private flight through the same dispatcher): `background: true` (the
upstream answers with a queued response to poll, not an answer) and `conversation` (each
call appends its turn to a server-side conversation). `store` and `previous_response_id`
are shared like any field in the scope: followers get the one response the upstream stored
(one id) within one tenant, organization and project; see the README.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.apis.base import (
    Api,
    ApiRequest,
    Wire,
    canonical_params,
    check_range,
    check_types,
    digest,
    dumps_sorted,
    fail,
    load_object,
    malformed_answer,
    require_model,
    require_stream_flag,
)
from proxy.chunks import Chunk
from proxy.errors import HerdError, UpstreamError
from proxy.sampling import is_sampled
from proxy.sse import typed_event

STREAM_ONLY = frozenset({"stream", "stream_options"})
FLOAT_PARAMS = frozenset({"temperature", "top_p"})
UNORDERED_PARAMS = frozenset({"metadata"})
# The events that end a response stream: the answer, cut short, or failed.
FINAL_EVENTS = {"response.completed": "completed", "response.incomplete": "incomplete",
                "response.failed": "failed"}
FINAL_BY_STATUS = {status: kind for kind, status in FINAL_EVENTS.items()}


class ResponsesWire(Wire):
    """The Responses API's typed events; the stream ends with a final `response.*` event."""

    name = "responses"
    path = "responses"
    title = "Responses API (POST /v1/responses)"

    def stream_payload(self, body: dict) -> dict:
        payload = {k: v for k, v in body.items() if k != "stream_options"}
        payload["stream"] = True
        return payload

    def whole_payload(self, body: dict) -> dict:
        payload = {k: v for k, v in body.items() if k != "stream_options"}
        payload["stream"] = False
        return payload

    def events(self, events, upstream: str) -> tuple[list[Chunk], bool, bool]:
        batch: list[Chunk] = []
        for event in events:
            if event.data == b"[DONE]":
                return batch, False, True
            data = orjson.loads(event.data)
            if not isinstance(data, dict) or not isinstance(data.get("type"), str):
                raise malformed_answer(upstream, "an event that is not an object with a type")
            if data["type"] == "error":  # the upstream's own error event, kept in OpenAI's error shape
                inner = {"message": data.get("message") or "the upstream's stream failed", "type": "upstream_error",
                         "param": data.get("param"), "code": data.get("code")}
                raise UpstreamError(502, orjson.dumps({"error": inner}), upstream=upstream)
            batch.append(Chunk(data, event.data))
            if data["type"] in FINAL_EVENTS:
                if not isinstance(data.get("response"), dict):
                    raise malformed_answer(upstream, "a final event without its response")
                return batch, True, True  # nothing follows the final event
        return batch, False, False

    def whole(self, raw: bytes, upstream: str) -> list[Chunk]:
        data = orjson.loads(raw)
        if isinstance(data, dict) and "error" in data and "output" not in data:
            raise UpstreamError(502, raw, upstream=upstream)  # an error object with a 200 status
        if not isinstance(data, dict) or not isinstance(data.get("output"), list):
            raise malformed_answer(upstream, "a body that is not a response")
        if not all(isinstance(item, dict) for item in data["output"]):
            raise malformed_answer(upstream, "an output item that is not an object")
        chunks = [Chunk(event) for event in split_response(data)]
        chunks[0].whole = raw
        return chunks

    def usage(self, chunks: list[Chunk]) -> dict[str, Any] | None:
        for chunk in reversed(chunks):
            if isinstance(chunk.usage, dict):  # its `response`'s (Chunk.usage: read once, not parsed again)
                return self.answer_usage(chunk.usage)
        return None

    def answer_usage(self, usage: dict[str, Any] | None) -> dict[str, Any] | None:
        if not usage:
            return None
        prompt, completion = usage.get("input_tokens") or 0, usage.get("output_tokens") or 0
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": usage.get("total_tokens") or prompt + completion}

    def cacheable(self, chunks: list[Chunk]) -> bool:
        return bool(chunks) and chunks[-1].data.get("type") != "response.failed"

    def content(self, data: dict) -> Any:
        return (data.get("type"), data.get("delta"), data.get("output_index"), data.get("content_index"))


RESPONSES_WIRE = ResponsesWire()


def split_response(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The events a whole `response` object would have been streamed as, numbered from 0."""
    events: list[dict[str, Any]] = []

    def emit(kind: str, **fields: Any) -> None:
        events.append({"type": kind, "sequence_number": len(events), **fields})

    started = {**response, "status": "in_progress", "output": [], "usage": None}
    emit("response.created", response=started)
    emit("response.in_progress", response=started)
    for index, item in enumerate(response["output"]):
        item_id = item.get("id")
        if item.get("type") == "message":
            emit("response.output_item.added", output_index=index,
                 item={**item, "status": "in_progress", "content": []})
            for part_index, part in enumerate(item.get("content") or ()):
                where = {"item_id": item_id, "output_index": index, "content_index": part_index}
                if isinstance(part, dict) and part.get("type") == "output_text":
                    emit("response.content_part.added", **where, part={**part, "text": ""})
                    emit("response.output_text.delta", **where, delta=part.get("text", ""), logprobs=[])
                    emit("response.output_text.done", **where, text=part.get("text", ""), logprobs=[])
                elif isinstance(part, dict) and part.get("type") == "refusal":
                    emit("response.content_part.added", **where, part={**part, "refusal": ""})
                    emit("response.refusal.delta", **where, delta=part.get("refusal", ""))
                    emit("response.refusal.done", **where, refusal=part.get("refusal", ""))
                else:
                    emit("response.content_part.added", **where, part=part)
                emit("response.content_part.done", **where, part=part)
        elif item.get("type") == "function_call":
            emit("response.output_item.added", output_index=index,
                 item={**item, "status": "in_progress", "arguments": ""})
            where = {"item_id": item_id, "output_index": index}
            emit("response.function_call_arguments.delta", **where, delta=item.get("arguments", ""))
            emit("response.function_call_arguments.done", **where, arguments=item.get("arguments", ""))
        else:
            emit("response.output_item.added", output_index=index, item=item)
        emit("response.output_item.done", output_index=index, item=item)
    emit(FINAL_BY_STATUS.get(str(response.get("status")), "response.completed"), response=response)
    return events


@dataclass(eq=False)
class ResponsesRequest(ApiRequest):
    input: Any = None


class ResponsesApi(Api):
    name = "responses"
    path = "/v1/responses"
    wire = RESPONSES_WIRE
    stream_end = b""  # the final response.* event ends the stream; no [DONE]

    def parse(self, raw: bytes) -> ResponsesRequest:
        return parse_responses(raw)

    def keys(self, req: ApiRequest, tenant: str, route: str) -> None:
        assign_keys(req, tenant, route)

    def assemble(self, chunks: list[Chunk]) -> dict[str, Any]:
        """The final response object (of the last event that carries one)."""
        for chunk in reversed(chunks):
            response = chunk.data.get("response")
            if isinstance(response, dict):
                return response
        return {}

    def stream_error(self, error: HerdError) -> bytes:
        """OpenAI's own `error` event of a Responses stream."""
        inner = error.body()["error"]
        data = {"type": "error", "code": inner.get("code") or inner.get("type"), "message": inner.get("message"),
                "param": inner.get("param")}
        return typed_event("error", orjson.dumps(data))


RESPONSES = ResponsesApi()


def parse_responses(raw: bytes) -> ResponsesRequest:
    """Parse and validate a Responses API request body; raise InvalidRequest (400) on bad input."""
    body = load_object(raw)
    model = require_model(body)
    stream = require_stream_flag(body)
    value = body.get("input")
    if value is not None:
        if isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise fail(f"'input[{i}]' must be an object", f"input[{i}]", "invalid_type")
        elif not isinstance(value, str):
            raise fail("'input' must be a string or an array of input items", "input", "invalid_type")
    check_range(body, "temperature", 0, 2)
    check_range(body, "top_p", 0, 1)
    check_range(body, "max_output_tokens", 1, 2**31, integer=True)
    check_range(body, "max_tool_calls", 0, 2**31, integer=True)
    check_range(body, "top_logprobs", 0, 20, integer=True)
    check_types(body, {
        "instructions": (str, "a string"),
        "previous_response_id": (str, "a string"),
        "truncation": (str, "a string"),
        "tools": (list, "an array of objects"),
        "include": (list, "an array of strings"),
        "text": (dict, "an object"),
        "reasoning": (dict, "an object"),
        "metadata": (dict, "an object"),
        "stream_options": (dict, "an object"),
        "background": (bool, "a boolean"),
        "store": (bool, "a boolean"),
        "parallel_tool_calls": (bool, "a boolean"),
    })
    if body.get("tools") is not None and not all(isinstance(t, dict) for t in body["tools"]):
        raise fail("'tools' must be an array of objects", "tools", "invalid_type")
    if body.get("include") is not None and not all(isinstance(t, str) for t in body["include"]):
        raise fail("'include' must be an array of strings", "include", "invalid_type")
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, (str, dict)):
        raise fail("'tool_choice' must be a string or an object", "tool_choice", "invalid_type")
    conversation = body.get("conversation")
    if conversation is not None and not isinstance(conversation, (str, dict)):
        raise fail("'conversation' must be a string or an object", "conversation", "invalid_type")
    private = None
    if body.get("background"):
        private = "background"  # a queued response to poll, not an answer to share
    elif conversation is not None:
        private = "conversation"  # each call adds its turn to a server-side conversation
    return ResponsesRequest(api=RESPONSES, body=body, model=model, stream=stream, sampled=is_sampled(body),
                            private=private, input=value)


def _canonical_content(content: Any) -> Any:
    # one input_text part says the same as a plain string
    if (isinstance(content, list) and len(content) == 1 and isinstance(content[0], dict)
            and content[0].get("type") == "input_text" and set(content[0]) == {"type", "text"}
            and isinstance(content[0]["text"], str)):
        return content[0]["text"]
    return content


def _canonical_items(value: Any) -> list[Any]:
    """The input as a list of items: a string is one user message with that text (as the
    API reads it); an item's one input_text part is its text. Nothing else is rewritten."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    items = []
    for item in value:
        if isinstance(item, dict) and "content" in item and "role" in item:
            item = {**item, "content": _canonical_content(item["content"])}
            if item.get("type") == "message":  # the type a bare {role, content} item has by default
                item = {k: v for k, v in item.items() if k != "type"}
        items.append(item)
    return items


def assign_keys(req: ApiRequest, tenant: str, route: str) -> ApiRequest:
    """Fill scope, exact key and, when the input ends with a plain user message, the semantic
    group and final text of `req`."""
    params = dumps_sorted(canonical_params(req.body, STREAM_ONLY | {"input"}, FLOAT_PARAMS, UNORDERED_PARAMS))
    req.scope = digest(RESPONSES.name.encode(), tenant.encode(), route.encode(), params)
    items = _canonical_items(req.body.get("input"))
    # items are objects the API reads by name: their keys are sorted, their order kept
    req.key = digest(b"exact", req.scope.encode(), dumps_sorted(items))
    if items:
        last = items[-1]
        if (isinstance(last, dict) and last.get("role") == "user" and set(last) == {"role", "content"}
                and isinstance(last["content"], str)):
            req.final_text = unicodedata.normalize("NFC", last["content"])
            req.group = digest(b"group", req.scope.encode(), dumps_sorted(items[:-1]))
    return req
