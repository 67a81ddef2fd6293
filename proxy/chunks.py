"""OpenAI chat chunks: the unit a flight carries, and the assembly of a whole completion.

herd always calls upstreams in streaming mode; a non-stream client's JSON body is assembled
from the same chunks, so stream and non-stream requests for one prompt share one flight.
"""

from __future__ import annotations

from typing import Any

import orjson


class Chunk:
    """One `chat.completion.chunk`: its JSON bytes and what herd reads of it.

    A chunk that came as bytes from an upstream keeps only those bytes and the little herd
    reads of every chunk (its event `kind`, its `usage`); its object is parsed again when
    asked for (`data`), which happens once per flight at most (assembling the JSON body), so
    a flight of 20,000 chunks holds 20,000 small bytes rather than 20,000 dicts. Code that
    runs per chunk or per waiter reads `kind` and `usage`, never `data`. A chunk made from
    an object keeps it and serializes it once. Its SSE event is rendered with the rest of
    its flight's (proxy.answer.Stream).

    `whole` is set on the first chunk of an answer the upstream sent in one piece (a
    non-stream call): its own `chat.completion` body, which non-stream waiters get as it is.
    """

    __slots__ = ("_data", "_raw", "kind", "usage", "usage_only", "whole")

    def __init__(self, data: dict[str, Any], raw: bytes | None = None) -> None:
        self._data = data if raw is None else None
        self._raw = raw
        kind = data.get("type")  # a typed event (Responses, Messages); None for a chat chunk
        self.kind: str | None = kind if isinstance(kind, str) else None
        self.usage: Any = _usage(data)
        # the final usage chunk (`choices: []`), sent only to clients that asked for it; a
        # typed event (Responses, Messages: `type`) never is one, whatever it carries
        self.usage_only = not data.get("choices") and data.get("usage") is not None and "type" not in data
        self.whole: bytes | None = None

    @property
    def data(self) -> dict[str, Any]:
        return self._data if self._data is not None else orjson.loads(self._raw)  # type: ignore[arg-type]

    @property
    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = orjson.dumps(self._data)
        return self._raw


def _usage(data: dict[str, Any]) -> Any:
    """The usage an event carries, where its API puts it: at the top (chat, a Messages
    `message_delta`), or in the object it wraps (a Responses event's `response`, a Messages
    `message_start`'s `message`); None if none."""
    usage = data.get("usage")
    if usage is None:
        for outer in ("response", "message"):
            inner = data.get(outer)
            if isinstance(inner, dict) and inner.get("usage") is not None:
                return inner["usage"]
    return usage or None


_TEXT = (str, type(None))
_OBJECT = (dict, type(None))
_LIST = (list, type(None))


def malformed(data: Any) -> str | None:
    """Why `data` is not a `chat.completion.chunk` herd can pass on and assemble, or None.

    Cheap enough for every chunk (about a microsecond): the fields herd reads must have
    their types; anything else in a chunk is passed on as it came.
    """
    if type(data) is not dict:
        return "a chunk that is not a JSON object"
    choices = data.get("choices")
    if type(choices) is not list:
        if choices is not None:
            return "choices that are not a list"
        choices = ()
    if not isinstance(data.get("usage"), _OBJECT):
        return "usage that is not an object"
    for choice in choices:
        if type(choice) is not dict:
            return "a choice that is not an object"
        if type(choice.get("index", 0)) is not int or not isinstance(choice.get("finish_reason"), _TEXT):
            return "a choice's index or finish_reason of the wrong type"
        logprobs = choice.get("logprobs")
        if logprobs is not None and (type(logprobs) is not dict or not all(
                isinstance(logprobs.get(k), _LIST) for k in ("content", "refusal"))):
            return "logprobs that are not an object of lists"
        delta = choice.get("delta")
        if delta is None:
            continue
        if type(delta) is not dict:
            return "a delta that is not an object"
        if len(delta) == 1 and type(delta.get("content")) is str:
            continue  # the common case: one piece of text
        if not (isinstance(delta.get("content"), _TEXT) and isinstance(delta.get("role"), _TEXT)
                and isinstance(delta.get("refusal"), _TEXT)):
            return "a delta's role, content or refusal that is not a string"
        calls = delta.get("tool_calls")
        if calls is not None and (type(calls) is not list or not all(_tool_call(c) for c in calls)):
            return "tool_calls that are not a list of tool calls"
        call = delta.get("function_call")
        if call is not None and not _function(call):
            return "a function_call that is not a name and arguments"
    return None


#: A tool call's index in a chunk is at most this: an index is where the call is assembled.
MAX_TOOL_CALLS = 1024


def _function(fn: Any) -> bool:
    return type(fn) is dict and isinstance(fn.get("name"), _TEXT) and isinstance(fn.get("arguments"), _TEXT)


def _tool_call(call: Any) -> bool:
    if type(call) is not dict:
        return False
    index = call.get("index", 0)
    return (type(index) is int and 0 <= index < MAX_TOOL_CALLS
            and isinstance(call.get("id"), _TEXT) and isinstance(call.get("type"), _TEXT)
            and (call.get("function") is None or _function(call["function"])))


def _merge_tool_calls(target: list[dict], deltas: list[dict]) -> None:
    for delta in deltas:
        index = delta.get("index", len(target))
        while len(target) <= index:
            target.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        call = target[index]
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        fn = delta.get("function") or {}
        if fn.get("name"):
            call["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            call["function"]["arguments"] += fn["arguments"]


def assemble(chunks: list[Chunk]) -> dict[str, Any]:
    """Build the `chat.completion` object that the chunks of one stream add up to."""
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        data = chunk.data
        if not head:
            head = data
        if data.get("usage"):
            usage = data["usage"]
        for c in data.get("choices") or ():
            index = c.get("index", 0)
            choice = choices.get(index)
            if choice is None:
                choice = choices[index] = {
                    "index": index,
                    "message": {"role": "assistant", "content": None},
                    "logprobs": None,
                    "finish_reason": None,
                    "_content": [],
                }
            delta = c.get("delta") or {}
            message = choice["message"]
            if delta.get("role"):
                message["role"] = delta["role"]
            if delta.get("content") is not None:
                choice["_content"].append(delta["content"])
            if delta.get("refusal") is not None:
                message["refusal"] = (message.get("refusal") or "") + delta["refusal"]
            if delta.get("tool_calls"):
                _merge_tool_calls(message.setdefault("tool_calls", []), delta["tool_calls"])
            if delta.get("function_call"):
                fc = message.setdefault("function_call", {"name": "", "arguments": ""})
                fc["name"] += delta["function_call"].get("name") or ""
                fc["arguments"] += delta["function_call"].get("arguments") or ""
            if c.get("logprobs"):
                lp = choice["logprobs"] = choice["logprobs"] or {}
                for kind in ("content", "refusal"):
                    if c["logprobs"].get(kind):
                        lp.setdefault(kind, []).extend(c["logprobs"][kind])
            if c.get("finish_reason"):
                choice["finish_reason"] = c["finish_reason"]
    out_choices = []
    for index in sorted(choices):
        choice = choices[index]
        parts = choice.pop("_content")
        if parts:
            choice["message"]["content"] = "".join(parts)
        out_choices.append(choice)
    result: dict[str, Any] = {
        "id": head.get("id", ""),
        "object": "chat.completion",
        "created": head.get("created", 0),
        "model": head.get("model", ""),
        "choices": out_choices,
    }
    for key in ("system_fingerprint", "service_tier"):
        if head.get(key) is not None:
            result[key] = head[key]
    if usage is not None:
        result["usage"] = usage
    return result


def malformed_completion(data: Any) -> str | None:
    """Why `data` is not a `chat.completion` herd can split into chunks, or None."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return "a body that is not a chat completion"
    for choice in data["choices"]:
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), (dict, type(None))):
            return "a choice or message that is not an object"
        calls = (choice.get("message") or {}).get("tool_calls")
        if calls is not None and (type(calls) is not list or not all(type(c) is dict for c in calls)):
            return "tool_calls that are not a list of objects"
    return None


def split(completion: dict[str, Any], whole: bytes | None = None) -> list[Chunk]:
    """The chunks a non-stream `chat.completion` would have been streamed as.

    `whole`: the completion's own JSON bytes, kept on the first chunk (see Chunk.whole).
    The completion passed `malformed_completion`; check the chunks with `malformed`.
    """
    fields = ("id", "created", "model", "system_fingerprint")
    base: dict[str, Any] = {k: completion[k] for k in fields if k in completion}
    base["object"] = "chat.completion.chunk"
    out = []
    for choice in completion.get("choices") or ():
        message = dict(choice.get("message") or {})
        delta = {k: v for k, v in message.items() if v is not None}
        if delta.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(delta["tool_calls"])]
        item: dict[str, Any] = {"index": choice.get("index", 0), "delta": delta, "finish_reason": None}
        if choice.get("logprobs") is not None:
            item["logprobs"] = choice["logprobs"]
        out.append(Chunk({**base, "choices": [item]}))
        end = {"index": item["index"], "delta": {}, "finish_reason": choice.get("finish_reason")}
        out.append(Chunk({**base, "choices": [end]}))
    if completion.get("usage") is not None:
        out.append(Chunk({**base, "choices": [], "usage": completion["usage"]}))
    if out and whole is not None:
        out[0].whole = whole
    return out
