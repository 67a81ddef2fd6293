"""Request -> (validated ChatRequest) -> Scope + Prompt keys.

Scope = tenant + upstream route + model + every output-affecting parameter. Only the
fields listed in STREAM_ONLY leave the scope; any field herd does not know stays in it,
so an unknown parameter can never make two different requests share an answer.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.errors import InvalidRequest
from proxy.sampling import is_sampled

# Fields that change how an answer is delivered, never what it says.
STREAM_ONLY = frozenset({"stream", "stream_options"})
# Numeric parameters where 1 and 1.0 mean the same thing.
FLOAT_PARAMS = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty"})
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass
class ChatRequest:
    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    sampled: bool = False  # a random draw (proxy.sampling.is_sampled)
    # filled by `keys()`
    scope: str = ""
    key: str = ""
    group: str = ""  # scope + everything but the final user message (semantic grouping)
    final_text: str | None = None  # the final user message's text, if it is plain text
    extra: dict[str, Any] = field(default_factory=dict)


def digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def _fail(message: str, param: str | None, code: str | None = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_range(body: dict, name: str, lo: float, hi: float, integer: bool = False) -> None:
    if name not in body or body[name] is None:
        return
    v = body[name]
    ok = _is_int(v) if integer else _is_number(v)
    if not ok:
        kind = "an integer" if integer else "a number"
        raise _fail(f"'{name}' must be {kind}, got {type(v).__name__}", name, "invalid_type")
    if not lo <= v <= hi:
        raise _fail(f"'{name}' must be between {lo:g} and {hi:g}, got {v}", name)


def _check_message(i: int, m: Any) -> None:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _fail(f"'{where}' must be an object", where, "invalid_type")
    role = m.get("role")
    if not isinstance(role, str):
        raise _fail(f"'{where}.role' is required and must be a string", f"{where}.role", "missing_required_parameter")
    if role not in ROLES:
        raise _fail(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}, got {role!r}", f"{where}.role")
    content = m.get("content")
    if content is None:
        if role in ("user", "system", "developer"):
            raise _fail(f"'{where}.content' is required for role {role!r}", f"{where}.content", "missing_required_parameter")
        return
    if isinstance(content, str):
        return
    if isinstance(content, list):
        for j, part in enumerate(content):
            _check_part(f"{where}.content[{j}]", part)
        return
    raise _fail(f"'{where}.content' must be a string or an array of content parts", f"{where}.content", "invalid_type")


# Content parts whose payload is one string field, checked as the API checks them: that
# field is required and a string, and nothing else may be in the part. (Other kinds of part
# go to the upstream and into the keys as they are.)
STRING_PARTS = {"text": "text", "refusal": "refusal"}


def _check_part(where: str, part: Any) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _fail(f"'{where}' must be an object with a 'type'", where, "invalid_type")
    field_name = STRING_PARTS.get(part["type"])
    if field_name is None:
        return
    value = part.get(field_name)
    if value is None:
        raise _fail(f"'{where}.{field_name}' is required", f"{where}.{field_name}", "missing_required_parameter")
    if not isinstance(value, str):
        raise _fail(
            f"'{where}.{field_name}' must be a string, got {type(value).__name__}", f"{where}.{field_name}",
            "invalid_type",
        )
    extra = sorted(set(part) - {"type", field_name})
    if extra:
        raise _fail(f"Additional properties are not allowed ({extra[0]!r} was unexpected) in '{where}'", where,
                    "invalid_value")


def parse_chat(raw: bytes) -> ChatRequest:
    """Parse and validate a chat completion request body; raise InvalidRequest (400) on bad input."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    model = body.get("model")
    if model is None:
        raise _fail("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise _fail("'model' must be a non-empty string", "model", "invalid_type")
    messages = body.get("messages")
    if messages is None:
        raise _fail("'messages' is a required property", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise _fail("'messages' must be an array", "messages", "invalid_type")
    if not messages:
        raise _fail("'messages' must contain at least one message", "messages", "empty_array")
    for i, m in enumerate(messages):
        _check_message(i, m)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _fail("'stream' must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _fail("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = bool(options and options.get("include_usage"))
    if options and "include_usage" in options and not isinstance(options["include_usage"], bool):
        raise _fail("'stream_options.include_usage' must be a boolean", "stream_options.include_usage", "invalid_type")
    _check_range(body, "temperature", 0, 2)
    _check_range(body, "top_p", 0, 1)
    _check_range(body, "presence_penalty", -2, 2)
    _check_range(body, "frequency_penalty", -2, 2)
    _check_range(body, "n", 1, 128, integer=True)
    _check_range(body, "max_tokens", 1, 2**31, integer=True)
    _check_range(body, "max_completion_tokens", 1, 2**31, integer=True)
    _check_range(body, "top_logprobs", 0, 20, integer=True)
    _check_range(body, "seed", -(2**63), 2**63, integer=True)
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4)
    ):
        raise _fail("'stop' must be a string or an array of at most 4 strings", "stop", "invalid_type")
    for name in ("tools", "functions"):
        value = body.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(t, dict) for t in value)):
            raise _fail(f"'{name}' must be an array of objects", name, "invalid_type")
    for name in ("response_format", "logit_bias", "metadata"):
        value = body.get(name)
        if value is not None and not isinstance(value, dict):
            raise _fail(f"'{name}' must be an object", name, "invalid_type")
    for name in ("logprobs", "parallel_tool_calls"):
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise _fail(f"'{name}' must be a boolean", name, "invalid_type")
    return ChatRequest(body=body, model=model, messages=messages, stream=bool(stream), include_usage=include_usage,
                       sampled=is_sampled(body))


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


# Parameters whose objects are plain maps: the order of their keys means nothing. In any
# other object (a JSON schema in response_format or tools, an unknown parameter) the order
# is kept: structured outputs write an answer's fields in its schema's order.
UNORDERED_PARAMS = frozenset({"logit_bias", "metadata", "audio", "prediction", "web_search_options"})


def _canonical_params(body: dict) -> dict:
    out = {}
    for k, v in body.items():
        if k in STREAM_ONLY or k == "messages":
            continue
        if k in FLOAT_PARAMS and _is_number(v):
            v = float(v)
        elif isinstance(v, (dict, list)) and k not in UNORDERED_PARAMS:
            v = orjson.Fragment(orjson.dumps(v))  # serialized as it came: not sorted by _dumps
        out[k] = v
    return out


def assign_keys(req: ChatRequest, tenant: str, route: str) -> ChatRequest:
    """Fill scope, exact key, semantic group and final text of `req`."""
    params = _dumps(_canonical_params(req.body))
    req.scope = digest(tenant.encode(), route.encode(), params)
    messages = [_canonical_message(m) for m in req.messages]
    req.key = digest(b"exact", req.scope.encode(), _dumps(messages))
    last = messages[-1]
    if last.get("role") == "user" and set(last) <= {"role", "content"}:
        text = text_of(last.get("content"))
        if text is not None:
            req.final_text = unicodedata.normalize("NFC", text)
            req.group = digest(b"group", req.scope.encode(), _dumps(messages[:-1]))
    return req
