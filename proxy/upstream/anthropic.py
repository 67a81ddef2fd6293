"""Anthropic's Messages API as an upstream, through the official `anthropic` SDK.

An OpenAI chat request is translated to a Messages request (`to_messages_request`); the
Messages event stream comes back as OpenAI `chat.completion.chunk`s (`StreamTranslator`),
usage and finish reasons mapped. What the translation cannot express is refused with a 400
that names the parameter: a request is never silently changed. herd does its own retries,
so the SDK's are off; its errors become proxy.errors types with an OpenAI-format body.

`base_url` is the API root without `/v1` (https://api.anthropic.com): the SDK adds `/v1`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import anthropic
import httpx2
import orjson

from proxy.chunks import Chunk, malformed
from proxy.config import AnthropicUpstreamConfig
from proxy.errors import (
    AuthenticationError,
    InvalidRequest,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    retry_headers,
)
from proxy.upstream.base import NOT_RELAYED, CallOptions, ForwardResponse, Upstream, connection_error, url_under
from proxy.upstream.openai import OpenAIUpstream

if TYPE_CHECKING:
    from proxy.apis.base import Wire

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# The status of an error event that arrives inside a stream (the HTTP status was 200).
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
EFFORTS = ("low", "medium", "high")


def unsupported(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"herd cannot send '{param}' to an Anthropic upstream: {why}.",
        param=param,
        code="unsupported_parameter",
    )


# -- request: OpenAI chat -> Anthropic Messages ------------------------------------------


def _text_of(content: Any, where: str, allowed: tuple[str, ...] = ("text",)) -> list[dict]:
    """Text blocks of a string or a list of text parts (empty strings carry nothing)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for j, part in enumerate(content):
        if part.get("type") not in allowed:
            raise unsupported(
                f"{where}.content[{j}].type",
                f"a {part.get('type')!r} part is not possible here",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(
                f"'{where}.content[{j}].text' must be a string",
                param=f"{where}.content[{j}].text",
            )
        if text:
            blocks.append({"type": "text", "text": text})
    return blocks


def _image(part: dict, where: str) -> dict:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise InvalidRequest(f"'{where}.image_url.url' must be a string", param=f"{where}.image_url.url")
    detail = image.get("detail") if isinstance(image, dict) else None
    if detail not in (None, "auto"):
        raise unsupported(
            f"{where}.image_url.detail",
            "Anthropic has no image detail setting (only 'auto' is possible)",
        )
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    if url.startswith("data:"):
        head, _, data = url[5:].partition(",")
        media_type, _, encoding = head.partition(";")
        if encoding != "base64" or media_type not in IMAGE_TYPES or not data:
            raise unsupported(
                f"{where}.image_url.url",
                f"images must be base64 data URLs of {', '.join(IMAGE_TYPES)}",
            )
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    raise unsupported(f"{where}.image_url.url", "an image must be an http(s) URL or a base64 data URL")


def _user_blocks(content: Any, where: str) -> list[dict]:
    if isinstance(content, str) or content is None:
        return _text_of(content, where)
    blocks: list[dict] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(
                    f"'{where}.content[{j}].text' must be a string",
                    param=f"{where}.content[{j}].text",
                )
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part, f"{where}.content[{j}]"))
        else:
            raise unsupported(
                f"{where}.content[{j}].type",
                f"{kind!r} content parts have no Anthropic equivalent here",
            )
    return blocks


def _tool_use(call: Any, where: str) -> dict:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise unsupported(f"{where}.type", "only function tool calls can be sent")
    fn = call.get("function") or {}
    try:
        arguments = orjson.loads(fn.get("arguments") or "{}")
    except orjson.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise unsupported(
            f"{where}.function.arguments",
            "Anthropic needs a tool call's arguments as a JSON object",
        )
    return {
        "type": "tool_use",
        "id": call.get("id"),
        "name": fn.get("name"),
        "input": arguments,
    }


MESSAGE_KEYS = {
    "system": {"role", "content"},
    "developer": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "tool_calls", "refusal"},
    "tool": {"role", "content", "tool_call_id"},
}


def _conversation(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(system blocks, turns): leading system/developer messages become `system`; tool results
    join the user turn after them; consecutive turns of one role merge (as Anthropic would)."""
    system: list[dict] = []
    turns: list[dict] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in MESSAGE_KEYS:
            raise unsupported(
                f"{where}.role",
                f"the {role!r} role has no Anthropic equivalent (use tools and 'tool')",
            )
        extra = sorted(k for k, v in m.items() if k not in MESSAGE_KEYS[role] and v is not None)
        if extra:
            raise unsupported(
                f"{where}.{extra[0]}",
                f"a {role} message cannot carry '{extra[0]}' in the Messages API",
            )
        if role in ("system", "developer"):
            if turns:
                raise unsupported(
                    f"{where}.role",
                    "Anthropic takes system instructions only before the conversation",
                )
            system.extend(_text_of(m.get("content"), where))
            continue
        if role == "user":
            blocks = _user_blocks(m.get("content"), where)
        elif role == "tool":
            content = m.get("content")
            result = content if isinstance(content, str) else _text_of(content, where)
            blocks = [
                {
                    "type": "tool_result",
                    "tool_use_id": m.get("tool_call_id"),
                    "content": result,
                }
            ]
            role = "user"
        else:
            if m.get("refusal"):
                raise unsupported(f"{where}.refusal", "Anthropic has no refusal field on a message")
            blocks = _text_of(m.get("content"), where)
            blocks += [_tool_use(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(m.get("tool_calls") or ())]
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise unsupported(
            "messages",
            "Anthropic needs at least one user message besides the system prompt",
        )
    if turns[-1]["role"] == "assistant":
        raise unsupported(
            "messages",
            "the conversation ends with an assistant message, which Anthropic would continue "
            "instead of answering; end with a user or tool message",
        )
    return system, turns


def _tools(tools: list[dict]) -> list[dict]:
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type", "function") != "function":
            raise unsupported(f"tools[{i}].type", "only function tools can be sent")
        fn = tool.get("function") or {}
        extra = sorted(set(fn) - {"name", "description", "parameters", "strict"})
        if extra:
            raise unsupported(f"tools[{i}].function.{extra[0]}", "Anthropic tools have no such field")
        item: dict[str, Any] = {
            "name": fn.get("name"),
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
        }
        if fn.get("description"):
            item["description"] = fn["description"]
        if fn.get("strict"):
            item["strict"] = True
        out.append(item)
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict | None:
    if choice is None:
        mapped = None
    elif choice in ("auto", "none"):
        mapped = {"type": choice}
    elif choice == "required":
        mapped = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        mapped = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    else:
        raise unsupported(
            "tool_choice",
            "only 'auto', 'none', 'required' or one named function can be sent",
        )
    if parallel is False:
        mapped = mapped or {"type": "auto"}
        if mapped["type"] != "none":
            mapped["disable_parallel_tool_use"] = True
    return mapped


def _neutral(body: dict, name: str, *neutral: Any) -> None:
    """Accept `name` only at a value that asks for nothing Anthropic would do differently."""
    if name in body and body[name] not in (None, *neutral):
        raise unsupported(name, REFUSED[name])


# OpenAI parameters the translation refuses (unless at a neutral value), and why.
REFUSED = {
    "n": "Anthropic returns one choice per request (n must be 1)",
    "logprobs": "Anthropic returns no log probabilities",
    "top_logprobs": "Anthropic returns no log probabilities",
    "logit_bias": "Anthropic has no logit bias",
    "presence_penalty": "Anthropic has no presence penalty (only 0 is possible)",
    "frequency_penalty": "Anthropic has no frequency penalty (only 0 is possible)",
    "seed": "Anthropic has no seeded sampling",
    "store": "Anthropic does not store completions for OpenAI's dashboard",
    "metadata": "Anthropic's metadata takes only a user id (send 'user')",
    "modalities": "Anthropic answers in text only",
    "audio": "Anthropic answers in text only",
    "prediction": "Anthropic has no predicted outputs",
    "functions": "legacy functions are not translated; send 'tools'",
    "function_call": "legacy functions are not translated; send 'tool_choice'",
    "web_search_options": "web search is an Anthropic server tool, not an OpenAI option",
    "verbosity": "Anthropic has no verbosity setting",
    "prompt_cache_key": "Anthropic caches prompts by cache_control blocks, not by key",
    "prompt_cache_retention": "Anthropic caches prompts by cache_control blocks, not by retention",
}
# Parameters that change how herd delivers the answer, not what is asked.
DELIVERY = {"model", "messages", "stream", "stream_options"}
HANDLED = (
    DELIVERY
    | {
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "safety_identifier",
        "response_format",
        "reasoning_effort",
        "service_tier",
    }
    | set(REFUSED)
)


def to_messages_request(body: dict, default_max_tokens: int) -> dict[str, Any]:
    """Keyword arguments for `messages.create` that ask what the OpenAI chat `body` asks."""
    unknown = sorted(set(body) - HANDLED)
    if unknown:
        raise unsupported(unknown[0], "herd does not know how to translate it, and will not drop it")
    _neutral(body, "n", 1)
    _neutral(body, "logprobs", False)
    _neutral(body, "top_logprobs")
    _neutral(body, "logit_bias", {})
    _neutral(body, "presence_penalty", 0)
    _neutral(body, "frequency_penalty", 0)
    _neutral(body, "store", False)
    _neutral(body, "metadata", {})
    _neutral(body, "modalities", ["text"])
    for name in (
        "seed",
        "audio",
        "prediction",
        "functions",
        "function_call",
        "web_search_options",
        "verbosity",
        "prompt_cache_key",
        "prompt_cache_retention",
    ):
        _neutral(body, name)

    system, turns = _conversation(body["messages"])
    request: dict[str, Any] = {"model": body["model"], "messages": turns}
    if system:
        request["system"] = system

    limits = {body.get("max_completion_tokens"), body.get("max_tokens")} - {None}
    if len(limits) > 1:
        raise InvalidRequest(
            "max_tokens and max_completion_tokens disagree; send one",
            param="max_completion_tokens",
        )
    request["max_tokens"] = limits.pop() if limits else default_max_tokens

    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)

    sampling = {}  # not typed by this SDK version, so sent as extra body fields
    temperature = body.get("temperature")
    if temperature is not None:
        if temperature > 1:
            raise unsupported("temperature", "Anthropic's temperature goes from 0 to 1")
        sampling["temperature"] = temperature
    for name in ("top_p", "top_k"):
        if body.get(name) is not None:
            sampling[name] = body[name]
    if sampling:
        request["extra_body"] = sampling

    if body.get("tools"):
        request["tools"] = _tools(body["tools"])
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        request["tool_choice"] = choice

    users = {body.get("user"), body.get("safety_identifier")} - {None, ""}
    if len(users) > 1:
        raise unsupported(
            "safety_identifier",
            "Anthropic takes one user id; 'user' and 'safety_identifier' differ",
        )
    if users:
        request["metadata"] = {"user_id": users.pop()}

    output: dict[str, Any] = {}
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema") or {}
        if spec.get("description"):
            raise unsupported(
                "response_format.json_schema.description",
                "Anthropic's output format has no description",
            )
        if not isinstance(spec.get("schema"), dict):
            raise InvalidRequest(
                "response_format.json_schema.schema must be an object",
                param="response_format",
            )
        output["format"] = {"type": "json_schema", "schema": spec["schema"]}
    elif fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise unsupported(
            "response_format",
            "Anthropic has no JSON mode without a schema (send a json_schema)",
        )
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in EFFORTS:
            raise unsupported(
                "reasoning_effort",
                f"Anthropic's effort takes {', '.join(EFFORTS)} (of OpenAI's values)",
            )
        output["effort"] = effort
    if output:
        request["output_config"] = output

    tier = body.get("service_tier")
    if tier is not None:
        tiers = {"auto": "auto", "default": "standard_only"}
        if tier not in tiers:
            raise unsupported(
                "service_tier",
                "Anthropic's service tiers are 'auto' and 'default' (standard only)",
            )
        request["service_tier"] = tiers[tier]
    return request


# -- answer: Anthropic events -> OpenAI chunks -------------------------------------------


def _malformed(why: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(f"the Anthropic upstream sent a malformed answer: {why}", code="upstream_malformed")


class StreamTranslator:
    """Feed it Messages stream events (as dicts); it returns the OpenAI chunks they make."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.tools: dict[int, int] = {}  # Anthropic content block index -> OpenAI tool call index
        self.input_tokens = 0
        self.cached_tokens = 0
        self.output_tokens = 0
        self.stop_reason: str | None = None
        self.done = False

    def _chunk(self, delta: dict, finish: str | None = None) -> Chunk:
        return Chunk(
            {
                **self.head,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
            }
        )

    def feed(self, event: dict[str, Any]) -> list[Chunk]:
        """The chunks `event` makes; an event herd cannot read is an UpstreamUnavailable (502)."""
        try:
            chunks = self._feed(event)
        except (KeyError, TypeError, AttributeError, ValueError):
            raise _malformed(f"a {event.get('type', 'stream')!s:.40} event with missing or mistyped fields") from None
        for chunk in chunks:
            if (why := malformed(chunk.data)) is not None:
                raise _malformed(why)
        return chunks

    def _feed(self, event: dict[str, Any]) -> list[Chunk]:
        kind = event.get("type")
        if kind == "message_start":
            message = event["message"]
            self.head = {
                "id": message.get("id", ""),
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": message.get("model", ""),
            }
            self._usage(message.get("usage") or {})
            return [self._chunk({"role": "assistant"})]
        if kind == "content_block_start":
            block = event["content_block"]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            if block.get("type") == "tool_use":
                index = self.tools[event["index"]] = len(self.tools)
                arguments = orjson.dumps(block["input"]).decode() if block.get("input") else ""
                call = {
                    "index": index,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
                return [self._chunk({"tool_calls": [call]})]
            return []  # thinking and server-tool blocks are never asked for
        if kind == "content_block_delta":
            delta = event["delta"]
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": delta["text"]})]
            if delta.get("type") == "input_json_delta" and event["index"] in self.tools:
                call = {
                    "index": self.tools[event["index"]],
                    "function": {"arguments": delta["partial_json"]},
                }
                return [self._chunk({"tool_calls": [call]})]
            return []
        if kind == "message_delta":
            self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason
            self._usage(event.get("usage") or {})
            return []
        if kind == "message_stop":
            self.done = True
            finish = FINISH_REASONS.get(self.stop_reason or "end_turn", "stop")
            prompt = self.input_tokens
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": self.output_tokens,
                "total_tokens": prompt + self.output_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            }
            return [
                self._chunk({}, finish),
                Chunk({**self.head, "choices": [], "usage": usage}),
            ]
        return []  # content_block_stop, ping

    def _usage(self, usage: dict[str, Any]) -> None:
        if usage.get("input_tokens") is not None:
            created = usage.get("cache_creation_input_tokens") or 0
            self.cached_tokens = usage.get("cache_read_input_tokens") or 0
            self.input_tokens = usage["input_tokens"] + created + self.cached_tokens
        if usage.get("output_tokens") is not None:
            self.output_tokens = usage["output_tokens"]


# -- the adapter -------------------------------------------------------------------------


# The Messages API version herd asks for when a call carries none of its own.
DEFAULT_VERSION = "2023-06-01"


class NativeMessages(OpenAIUpstream):
    """The Anthropic upstream's plain HTTP client for calls that go as the client sent them
    (POST /v1/messages and its count_tokens): the OpenAI adapter's streaming machinery
    (timeouts, SSE, errors) under Anthropic's URL and headers."""

    kind = "anthropic"

    def _chat_headers(self, options: CallOptions, accept: str) -> dict[str, str]:
        key = self.api_key(options)
        if not key:
            raise AuthenticationError(
                f"herd holds no key for the Anthropic upstream {self.name!r}: send your Anthropic key as x-api-key"
            )
        headers = {**self.cfg.headers, "x-api-key": key, "content-type": "application/json", "accept": accept,
                   "anthropic-version": options.api_headers.get("anthropic-version") or DEFAULT_VERSION}
        if options.api_headers.get("anthropic-beta"):
            headers["anthropic-beta"] = options.api_headers["anthropic-beta"]
        return headers

    def _url(self, wire: Wire) -> str:
        return f"{self.cfg.base_url.rstrip('/')}/v1/{wire.path}"

    async def forward(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, options: CallOptions
    ) -> ForwardResponse:
        """A call below /v1 that goes as the client sent it (count_tokens), with Anthropic's
        headers (the key, anthropic-version and -beta from `options`), not the client's."""
        out = self._chat_headers(options, "application/json")
        with self._failures():
            resp = await self.session.request(method, url_under(self.cfg.base_url, f"v1/{path}", query),
                                              data=body or None, headers=out, timeout=self._timeout())
        back = [(k, v) for k, v in resp.headers.items() if k.lower() not in NOT_RELAYED]
        return ForwardResponse(resp.status, back, resp.content.iter_any(), resp.release)


class AnthropicUpstream(Upstream):
    kind = "anthropic"

    cfg: AnthropicUpstreamConfig

    def __init__(self, cfg: AnthropicUpstreamConfig) -> None:
        super().__init__(cfg)
        self._client: anthropic.AsyncAnthropic | None = None
        self.native = NativeMessages(cfg)

    def speaks(self, wire: Wire) -> bool:
        return wire.name in ("chat", "messages")

    async def call(
        self, wire: Wire, body: dict, options: CallOptions, stream: bool = True
    ) -> AsyncGenerator[list[Chunk], None]:
        """Chat calls are translated (`chat`); Messages calls go as they came (NATIVE_WIRE)."""
        if wire.name == "messages":
            from proxy.apis.messages import NATIVE_WIRE

            calls = self.native.call(NATIVE_WIRE, body, options, stream)
        else:
            calls = super().call(wire, body, options, stream)
        async with contextlib.aclosing(calls) as batches:
            async for batch in batches:
                yield batch

    # Forwarded calls herd passes to an Anthropic upstream as they came (the rest are refused).
    FORWARDED = frozenset({("POST", "messages/count_tokens")})

    async def forward(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, options: CallOptions
    ) -> ForwardResponse:
        if (method, path) in self.FORWARDED:
            return await self.native.forward(method, path, query, headers, body, options)
        return await super().forward(method, path, query, headers, body, options)

    async def start(self) -> None:
        cfg = self.cfg
        timeout = httpx2.Timeout(
            cfg.total_timeout_s,
            connect=cfg.connect_timeout_s,
            read=max(cfg.first_byte_timeout_s, cfg.idle_timeout_s),
        )
        limits = httpx2.Limits(
            max_connections=cfg.max_connections,
            max_keepalive_connections=min(cfg.max_connections, 100),
        )
        await self.native.start()
        self._client = anthropic.AsyncAnthropic(
            base_url=cfg.base_url,
            api_key=cfg.api_key or "unset",  # a client's own key replaces it per call
            max_retries=0,
            timeout=timeout,
            default_headers=cfg.headers or None,
            http_client=anthropic.DefaultAioHttpClient(timeout=timeout, limits=limits),
        )

    async def aclose(self) -> None:
        await self.native.aclose()
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _client_for(self, options: CallOptions) -> anthropic.AsyncAnthropic:
        if self._client is None:
            raise RuntimeError(f"upstream {self.name!r} is not started")
        if self.cfg.api_key:
            return self._client
        if not options.client_key:
            raise AuthenticationError(
                f"herd holds no key for the Anthropic upstream {self.name!r}: "
                "send your Anthropic key as the bearer token"
            )
        return self._client.with_options(api_key=options.client_key)

    async def chat(self, body: dict, options: CallOptions, stream: bool = True) -> AsyncGenerator[list[Chunk], None]:
        # Always a streaming Messages call: the translation is one code path, and `stream`
        # (a hint that every waiter so far wants one JSON body) costs little here.
        request = to_messages_request(body, self.cfg.default_max_tokens)
        client = self._client_for(options)
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.total_timeout_s
        translator = StreamTranslator()
        response: anthropic.AsyncStream[anthropic.types.RawMessageStreamEvent] | None = None
        try:
            # Timeouts wrap each wait, never a `yield`: the consumer's own awaits are its business.
            async with asyncio.timeout(min(cfg.first_byte_timeout_s, deadline - loop.time())):
                response = await client.messages.create(**request, stream=True)
            events = aiter(response)
            wait = cfg.first_byte_timeout_s
            while not translator.done:
                async with asyncio.timeout(min(wait, deadline - loop.time())):
                    event = await anext(events, None)
                if event is None:
                    break
                wait = cfg.idle_timeout_s
                if batch := translator.feed(event.model_dump(mode="json")):
                    yield batch
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {self.name!r} did not answer in time") from None
        except anthropic.APITimeoutError:
            raise UpstreamTimeout(f"upstream {self.name!r} did not answer in time") from None
        except anthropic.APIConnectionError as e:
            raise connection_error(self.name, e, self.cfg.base_url) from None
        except anthropic.APIStatusError as e:
            raise self._error(e) from None
        except (anthropic.APIResponseValidationError, ValueError):
            raise UpstreamUnavailable(
                f"upstream {self.name!r} sent an answer herd cannot read (not in the Messages API's format)"
            ) from None
        finally:
            if response is not None:
                await response.close()
        if not translator.done:
            raise UpstreamUnavailable(f"upstream {self.name!r} ended the stream before it was complete")

    def _error(self, e: anthropic.APIStatusError) -> UpstreamError:
        """The SDK's error as the upstream's status with an OpenAI-format body."""
        detail = e.body.get("error") if isinstance(e.body, dict) else None
        detail = detail if isinstance(detail, dict) else {}
        kind = detail.get("type") or "api_error"
        status = e.status_code if e.status_code >= 400 else ERROR_STATUS.get(kind, 502)
        message = detail.get("message") or f"upstream answered HTTP {status}"
        body = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
        return UpstreamError(status, orjson.dumps(body), headers=retry_headers(e.response.headers.items()),
                             upstream=self.name)


# -- the other direction: an Anthropic Messages client on an OpenAI-compatible route ----------
#
# proxy.apis.messages serves POST /v1/messages. To an Anthropic upstream the request goes as
# it came (AnthropicUpstream.call); to an OpenAI-compatible one it is translated here, with
# the tables above read backwards, and the chat answer comes back as Messages stream events.
# As above, what cannot be said is refused with a 400 naming the field, never dropped;
# `cache_control` marks are the one thing left out (a caching hint: the answer is the same).

# An OpenAI finish reason as Anthropic's stop reason (FINISH_REASONS read backwards).
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
MESSAGES_FIELDS = frozenset({"model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p",
                             "top_k", "tools", "tool_choice", "metadata", "stream", "service_tier", "thinking"})
# Anthropic's service tiers as OpenAI's (the `service_tier` table of to_messages_request, backwards)
TIERS = {"auto": "auto", "standard_only": "default"}


def untranslatable(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"herd cannot send '{param}' to this model's OpenAI-compatible upstream: {why}.",
        param=param, code="unsupported_parameter",
    )


def _texts(blocks: list[dict], where: str) -> list[dict]:
    parts = []
    for j, block in enumerate(blocks):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise untranslatable(f"{where}[{j}]", f"a {block.get('type')!r} block cannot be sent here")
        parts.append({"type": "text", "text": block["text"]})
    return parts


def _image_part(block: dict, where: str) -> dict:
    source = block.get("source") or {}
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    data = source.get("data")
    if source.get("type") == "base64" and source.get("media_type") in IMAGE_TYPES and isinstance(data, str):
        return {"type": "image_url", "image_url": {"url": f"data:{source['media_type']};base64,{source['data']}"}}
    raise untranslatable(f"{where}.source", "an image must be a URL or base64 data of " + ", ".join(IMAGE_TYPES))


def _tool_result(block: dict, where: str) -> dict:
    if block.get("is_error"):
        raise untranslatable(f"{where}.is_error", "OpenAI tool results have no error flag")
    content = block.get("content")
    if isinstance(content, list):
        content = _texts(content, f"{where}.content")
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": content if content is not None else ""}


def _chat_messages(messages: list[dict]) -> list[dict]:
    out: list[dict] = []
    for i, m in enumerate(messages):
        where, role, content = f"messages[{i}].content", m["role"], m["content"]
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if role == "user":
            parts: list[dict] = []
            for j, block in enumerate(content):
                kind = block.get("type")
                if kind == "text":
                    parts += _texts([block], where)
                elif kind == "image":
                    parts.append(_image_part(block, f"{where}[{j}]"))
                elif kind == "tool_result":
                    out.append(_tool_result(block, f"{where}[{j}]"))  # tool results answer the turn before
                else:
                    raise untranslatable(f"{where}[{j}]", f"a {kind!r} block has no OpenAI equivalent")
            if parts:
                out.append({"role": "user", "content": parts})
            continue
        texts, calls = [], []
        for j, block in enumerate(content):
            kind = block.get("type")
            if kind == "text":
                texts.append(block.get("text") or "")
            elif kind == "tool_use":
                calls.append({"id": block.get("id"), "type": "function", "function": {
                    "name": block.get("name"), "arguments": orjson.dumps(block.get("input") or {}).decode()}})
            else:
                raise untranslatable(f"{where}[{j}]", f"a {kind!r} block has no OpenAI equivalent")
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


def _chat_tools(tools: list[dict]) -> list[dict]:
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom"):
            raise untranslatable(f"tools[{i}].type", f"the Anthropic server tool {tool.get('type')!r} runs only there")
        extra = sorted(set(tool) - {"type", "name", "description", "input_schema", "cache_control", "strict"})
        if extra:
            raise untranslatable(f"tools[{i}].{extra[0]}", "OpenAI function tools have no such field")
        fn: dict[str, Any] = {"name": tool.get("name"), "parameters": tool.get("input_schema") or {}}
        if tool.get("description"):
            fn["description"] = tool["description"]
        if tool.get("strict"):
            fn["strict"] = True
        out.append({"type": "function", "function": fn})
    return out


def chat_request_of(body: dict) -> dict[str, Any]:
    """The OpenAI chat request that asks what the (validated) Messages `body` asks.

    herd validates the fields it reads to coalesce; the shapes inside blocks, tools and
    options are Anthropic's to check. One that is not what the translation reads is the
    client's error (a 400), never herd's (a 500)."""
    try:
        return _chat_request_of(body)
    except (AttributeError, TypeError, KeyError, ValueError):
        raise InvalidRequest(
            "herd cannot translate this request for an OpenAI-compatible upstream: a field has a shape the "
            "Messages API does not give it", code="invalid_request") from None


def _chat_request_of(body: dict) -> dict[str, Any]:
    unknown = sorted(set(body) - MESSAGES_FIELDS)
    if unknown:
        raise untranslatable(unknown[0], "herd does not know how to translate it, and will not drop it")
    out: dict[str, Any] = {"model": body["model"]}
    messages = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": system if isinstance(system, str) else _texts(system, "system")})
    out["messages"] = messages + _chat_messages(body["messages"])
    out["max_tokens"] = body["max_tokens"]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    for name in ("temperature", "top_p", "top_k"):  # top_k: vLLM's and other servers' extension
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("tools"):
        out["tools"] = _chat_tools(body["tools"])
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type")
        mapped: Any = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
        if kind == "tool":
            mapped = {"type": "function", "function": {"name": choice.get("name")}}
        if mapped is None:
            raise untranslatable("tool_choice.type", f"{kind!r} has no OpenAI equivalent")
        out["tool_choice"] = mapped
        if choice.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    metadata = body.get("metadata") or {}
    extra = sorted(set(metadata) - {"user_id"})
    if extra:
        raise untranslatable(f"metadata.{extra[0]}", "only metadata.user_id has an OpenAI equivalent (user)")
    if metadata.get("user_id"):
        out["user"] = metadata["user_id"]
    thinking = body.get("thinking")
    if thinking is not None and thinking.get("type") != "disabled":
        raise untranslatable("thinking", "extended thinking is Anthropic's; OpenAI-compatible servers have no budget")
    tier = body.get("service_tier")
    if tier is not None:
        if tier not in TIERS:
            raise untranslatable("service_tier", "only 'auto' and 'standard_only' have OpenAI equivalents")
        out["service_tier"] = TIERS[tier]
    return out


class MessagesTranslator:
    """Feed it OpenAI chat chunks (dicts); it returns the Messages stream events they make
    (StreamTranslator backwards). `end()` after the last chunk closes the message."""

    def __init__(self) -> None:
        self.message: dict[str, Any] | None = None
        self.blocks = 0  # content blocks started
        self.open: Any = None  # "text", or ("tool", OpenAI tool call index), of the open block
        self.tools: dict[int, int] = {}  # OpenAI tool call index -> content block index
        self.stop_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.done = False

    def _start(self, kind: Any, block: dict) -> list[dict]:
        events = self._close()
        self.open = kind
        events.append({"type": "content_block_start", "index": self.blocks, "content_block": block})
        self.blocks += 1
        return events

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.blocks - 1}]

    def feed(self, chunk: dict[str, Any]) -> list[dict]:
        events: list[dict] = []
        if self.message is None:
            self.message = {"id": chunk.get("id") or "", "type": "message", "role": "assistant",
                            "model": chunk.get("model") or "", "content": [], "stop_reason": None,
                            "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
            events += [{"type": "message_start", "message": self.message}, {"type": "ping"}]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = (delta.get("content") or "") + (delta.get("refusal") or "")
            if text:
                if self.open != "text":
                    events += self._start("text", {"type": "text", "text": ""})
                events.append({"type": "content_block_delta", "index": self.blocks - 1,
                               "delta": {"type": "text_delta", "text": text}})
            for call in delta.get("tool_calls") or ():
                k = call.get("index", 0)
                fn = call.get("function") or {}
                if k not in self.tools:
                    events += self._start(("tool", k), {"type": "tool_use", "id": call.get("id") or f"toolu_{k}",
                                                        "name": fn.get("name") or "", "input": {}})
                    self.tools[k] = self.blocks - 1
                if fn.get("arguments"):
                    events.append({"type": "content_block_delta", "index": self.tools[k],
                                   "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]}})
            if choice.get("finish_reason"):
                self.stop_reason = STOP_REASONS.get(choice["finish_reason"], "end_turn")
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        return events

    def end(self) -> list[dict]:
        if self.done or self.message is None:
            return []
        self.done = True
        usage = {"input_tokens": self.usage.get("prompt_tokens") or 0,
                 "output_tokens": self.usage.get("completion_tokens") or 0}
        return [*self._close(),
                {"type": "message_delta", "delta": {"stop_reason": self.stop_reason or "end_turn",
                                                    "stop_sequence": None}, "usage": usage},
                {"type": "message_stop"}]


def message_of_completion(completion: dict[str, Any]) -> dict[str, Any]:
    """A non-stream `chat.completion` as the Messages API's message object."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict] = []
    text = (message.get("content") or "") + (message.get("refusal") or "")
    if text:
        content.append({"type": "text", "text": text})
    for k, call in enumerate(message.get("tool_calls") or ()):
        fn = call.get("function") or {}
        try:
            arguments = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            arguments = {}
        content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{k}", "name": fn.get("name") or "",
                        "input": arguments})
    usage = completion.get("usage") or {}
    return {"id": completion.get("id") or "", "type": "message", "role": "assistant",
            "model": completion.get("model") or "", "content": content,
            "stop_reason": STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn"), "stop_sequence": None,
            "usage": {"input_tokens": usage.get("prompt_tokens") or 0,
                      "output_tokens": usage.get("completion_tokens") or 0}}
