"""POST /v1/completions (legacy text completions) on the same machinery as chat.

Scope = API + tenant + route + model + every field but `prompt`, `stream` and
`stream_options`; the exact key adds the prompt (a string, a list of strings, or token
ids, as sent). A prompt that is one string is the semantic text. The chunks are
`text_completion` objects ending with a finish_reason, the usage chunk and [DONE], as
OpenAI and vLLM stream them; a one-piece answer is split into those chunks.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
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
    is_int,
    load_object,
    malformed_answer,
    require_model,
    require_stream_flag,
)
from proxy.chunks import Chunk
from proxy.sampling import is_sampled
from proxy.sse import DONE

STREAM_ONLY = frozenset({"stream", "stream_options"})
FLOAT_PARAMS = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty"})
UNORDERED_PARAMS = frozenset({"logit_bias"})
LOGPROB_LISTS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def malformed_chunk(data: Any) -> str | None:
    """Why `data` is not a `text_completion` (chunk) herd can pass on and assemble, or None."""
    if not isinstance(data, dict):
        return "a chunk that is not a JSON object"
    choices = data.get("choices")
    if choices is not None and not isinstance(choices, list):
        return "choices that are not a list"
    if not isinstance(data.get("usage"), (dict, type(None))):
        return "usage that is not an object"
    for choice in choices or ():
        if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
            return "a choice that is not an object with an integer index"
        if not isinstance(choice.get("text"), (str, type(None))):
            return "a choice's text that is not a string"
        if not isinstance(choice.get("logprobs"), (dict, type(None))):
            return "logprobs that are not an object"
    return None


class CompletionsWire(ChoicesWire):
    name = "completions"
    path = "completions"
    title = "legacy completions API (POST /v1/completions)"

    def malformed(self, data: Any) -> str | None:
        return malformed_chunk(data)

    def whole(self, raw: bytes, upstream: str) -> list[Chunk]:
        data = orjson.loads(raw)
        check_error_object(data, raw, upstream)
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or malformed_chunk(data):
            raise malformed_answer(upstream, "a body that is not a text completion")
        head = {k: data[k] for k in ("id", "object", "created", "model", "system_fingerprint") if k in data}
        chunks = [Chunk({**head, "choices": [choice]}) for choice in data["choices"]]
        if data.get("usage") is not None:
            chunks.append(Chunk({**head, "choices": [], "usage": data["usage"]}))
        if not chunks:
            raise malformed_answer(upstream, "a text completion without choices")
        chunks[0].whole = raw
        return chunks


COMPLETIONS_WIRE = CompletionsWire()


def assemble(chunks: list[Chunk]) -> dict[str, Any]:
    """The `text_completion` object the chunks of one stream add up to."""
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        data = chunk.data
        head = head or data
        usage = data.get("usage") or usage
        for c in data.get("choices") or ():
            index = c.get("index", 0)
            choice = choices.setdefault(index, {"text": "", "index": index, "logprobs": None, "finish_reason": None})
            choice["text"] += c.get("text") or ""
            if c.get("logprobs"):
                lp = choice["logprobs"] = choice["logprobs"] or {k: [] for k in LOGPROB_LISTS}
                for k in LOGPROB_LISTS:
                    lp[k].extend(c["logprobs"].get(k) or ())
            if c.get("finish_reason"):
                choice["finish_reason"] = c["finish_reason"]
    result: dict[str, Any] = {
        "id": head.get("id", ""),
        "object": "text_completion",
        "created": head.get("created", 0),
        "model": head.get("model", ""),
        "choices": [choices[i] for i in sorted(choices)],
    }
    if head.get("system_fingerprint") is not None:
        result["system_fingerprint"] = head["system_fingerprint"]
    if usage is not None:
        result["usage"] = usage
    return result


@dataclass(eq=False)
class CompletionRequest(ApiRequest):
    prompt: Any = None


class CompletionsApi(Api):
    name = "completions"
    path = "/v1/completions"
    wire = COMPLETIONS_WIRE
    stream_end = DONE

    def parse(self, raw: bytes) -> CompletionRequest:
        return parse_completion(raw)

    def keys(self, req: ApiRequest, tenant: str, route: str) -> None:
        params = dumps_sorted(canonical_params(req.body, STREAM_ONLY | {"prompt"}, FLOAT_PARAMS, UNORDERED_PARAMS))
        req.scope = digest(self.name.encode(), tenant.encode(), route.encode(), params)
        prompt = req.body["prompt"]
        req.key = digest(b"exact", req.scope.encode(), orjson.dumps(prompt))
        if isinstance(prompt, str):
            req.final_text = unicodedata.normalize("NFC", prompt)
            req.group = digest(b"group", req.scope.encode())

    def assemble(self, chunks: list[Chunk]) -> dict[str, Any]:
        return assemble(chunks)


COMPLETIONS = CompletionsApi()


def _is_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    return (all(isinstance(v, str) for v in value) or all(is_int(v) for v in value)
            or all(isinstance(v, list) and v and all(is_int(t) for t in v) for v in value))


def parse_completion(raw: bytes) -> CompletionRequest:
    """Parse and validate a legacy completion request; raise InvalidRequest (400) on bad input."""
    body = load_object(raw)
    model = require_model(body)
    if "prompt" not in body or body["prompt"] is None:
        raise fail("'prompt' is a required property", "prompt", "missing_required_parameter")
    if not _is_prompt(body["prompt"]):
        raise fail("'prompt' must be a string, an array of strings, or an array of token ids (or of such arrays)",
                   "prompt", "invalid_type")
    stream = require_stream_flag(body)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise fail("'stream_options' must be an object", "stream_options", "invalid_type")
    check_range(body, "temperature", 0, 2)
    check_range(body, "top_p", 0, 1)
    check_range(body, "presence_penalty", -2, 2)
    check_range(body, "frequency_penalty", -2, 2)
    check_range(body, "n", 1, 128, integer=True)
    check_range(body, "best_of", 1, 20, integer=True)
    check_range(body, "max_tokens", 0, 2**31, integer=True)
    check_range(body, "logprobs", 0, 5, integer=True)
    check_range(body, "seed", -(2**63), 2**63, integer=True)
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4)
    ):
        raise fail("'stop' must be a string or an array of at most 4 strings", "stop", "invalid_type")
    return CompletionRequest(api=COMPLETIONS, body=body, model=model, stream=stream,
                             include_usage=bool(options and options.get("include_usage")),
                             sampled=is_sampled(body), prompt=body["prompt"])
