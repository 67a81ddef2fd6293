"""A fast, deterministic fake LLM upstream for herd's tests and benchmarks.

It speaks enough of three dialects for the official SDKs to parse every answer:

* OpenAI: ``POST /v1/chat/completions`` (JSON or SSE, ``n``, ``max_tokens`` /
  ``max_completion_tokens``, ``stop``, tools, ``stream_options.include_usage``),
  ``POST /v1/responses`` (the Responses API: JSON or its typed SSE events, string or item
  ``input``, ``instructions``, ``max_output_tokens``, function tools),
  ``POST /v1/completions`` (legacy), ``POST /v1/embeddings``, ``GET /v1/models``.
* Anthropic: ``POST /v1/messages`` (JSON or the real SSE event sequence, tools,
  ``stop_sequences``, header and body validation with Anthropic-format errors).
* vLLM: ``GET /metrics`` (Prometheus gauges) and a ``max_running`` admission queue.

The answer is a pure function of the request, :func:`expected_text`:
``"echo: " + <last user message text>`` (words joined by single spaces), padded with
filler words up to ``reply_tokens`` words, cut at a stop sequence, then truncated to
``max_tokens``.  A token is one word plus its trailing space; each stream chunk
carries one token.  When the request has tools and its last message is a user
message containing "call tool", the answer is instead a call of the first tool
with arguments ``{"q": <last user text>}``.

Knobs (``settings``; CLI flags, constructor keywords, ``POST /_sim/settings``):

=================  =======  =====================================================
``ttft_ms``        0        delay before the first chunk (or the JSON body)
``tokens_per_s``   0        rate of chunks after the first; 0 = no delay
``reply_tokens``   0        pad the reply with filler words up to this many words
``max_running``    0        admit at most this many calls at once; 0 = unlimited
``waiting``        0        added to ``vllm:num_requests_waiting``
``kv_cache_usage`` 0.0      ``vllm:kv_cache_usage_perc`` (0..1)
``models``         [...]    ``GET /v1/models``; the first names the metrics label
``embedding_dim``  8        default embedding size (a request's ``dimensions`` wins)
=================  =======  =====================================================

A non-stream answer waits ``ttft + (tokens - 1) / tokens_per_s``, when its stream
twin would send its last token.

Control endpoints (JSON): ``GET /_sim/stats`` (``?log=0`` leaves out the log),
``POST /_sim/reset`` (back to the start-up settings), ``GET|POST /_sim/settings``,
``GET|POST /_sim/faults``; also ``GET /health``.  Fault rules: see
:func:`normalize_fault`.  ``calls`` and the log cover every API request (any path but
``/_sim/*``, ``/metrics`` and ``/health``), rejected and faulted ones included;
``disconnects`` counts calls whose client went away before the answer was complete.

Ways to run it::

    python -m benchmarks.simulator --port 9000 --ttft-ms 50 --tokens-per-s 0

    async with SimulatorServer(port=0, ttft_ms=5) as sim:   # on the current loop
        ... sim.url, sim.stats(), sim.add_faults([...]) ...

    with ThreadedSimulator(reply_tokens=20) as sim:        # own loop, own thread
        ...
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import copy
import hashlib
import itertools
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import orjson
from aiohttp import web

__all__ = [
    "DEFAULT_SETTINGS",
    "Reply",
    "Simulator",
    "SimulatorServer",
    "ThreadedSimulator",
    "compute_reply",
    "expected_embedding",
    "expected_text",
    "last_user_text",
    "main",
    "normalize_fault",
]

DEFAULT_SETTINGS: dict[str, Any] = {
    "ttft_ms": 0.0,
    "tokens_per_s": 0.0,
    "reply_tokens": 0,
    "max_running": 0,
    "waiting": 0,
    "kv_cache_usage": 0.0,
    "models": ["gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-latest", "meta-llama/Llama-3.1-8B-Instruct"],
    "embedding_dim": 8,
}
_FLOAT_SETTINGS = {"ttft_ms", "tokens_per_s", "kv_cache_usage"}
_INT_SETTINGS = {"reply_tokens", "max_running", "waiting", "embedding_dim"}

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
RESPONSES_PATH = "/v1/responses"
MODEL_PATHS = frozenset({CHAT_PATH, COMPLETIONS_PATH, EMBEDDINGS_PATH, MESSAGES_PATH, RESPONSES_PATH})

_FILLER = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud"
).split()
_SYSTEM_FINGERPRINT = "fp_herdsim"


# --------------------------------------------------------------------------- replies


class Reply(NamedTuple):
    """What the simulated model answers to one request (one choice)."""

    text: str  # the content ("" for a tool call)
    tokens: list[str]  # text split into stream chunks; "".join(tokens) == text
    finish: str  # "stop" | "length" | "stop_sequence" | "tool"
    stop_sequence: str | None  # the matched stop string when finish == "stop_sequence"
    tool_name: str | None  # set when finish == "tool"
    tool_args: str | None  # JSON text of the tool arguments when finish == "tool"


def _content_text(content: Any) -> str:
    """Text of a message content: a string, or the concatenated ``text`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def _responses_messages(value: Any) -> list[Any]:
    """A Responses ``input`` as chat messages: a string is one user message; ``input_text``
    parts read as text parts."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    out = []
    for item in value:
        if isinstance(item, dict) and isinstance(item.get("content"), list):
            parts = [dict(p, type="text") if isinstance(p, dict) and p.get("type") == "input_text" else p
                     for p in item["content"]]
            item = {**item, "content": parts}
        out.append(item)
    return out


def last_user_text(body: Mapping[str, Any]) -> str:
    """The text of the last ``user`` message (or a completion prompt / embedding input)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                return _content_text(m.get("content"))
        return ""
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0]
    return ""


def _split_tokens(text: str) -> list[str]:
    parts = text.split(" ")
    tokens = [p + " " for p in parts[:-1]]
    if parts[-1]:
        tokens.append(parts[-1])
    return tokens


def _stop_list(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop_sequences", body.get("stop"))
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list):
        return [s for s in stop if isinstance(s, str) and s]
    return []


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _tool_name(body: Mapping[str, Any]) -> str | None:
    """Name of the first tool when the request asks for a tool call, else None."""
    tools = body.get("tools")
    if not tools or not isinstance(tools, list) or not isinstance(tools[0], dict):
        return None
    choice = body.get("tool_choice")
    if choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none"):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    if "call tool" not in _content_text(last.get("content")).lower():
        return None
    tool = tools[0]
    fn = tool.get("function")
    name = fn.get("name") if isinstance(fn, dict) else tool.get("name")
    return name if isinstance(name, str) else "tool"


def _reply_tokens_setting(settings: Any) -> int:
    if settings is None:
        return 0
    if isinstance(settings, Mapping):
        return int(settings.get("reply_tokens", 0) or 0)
    return int(getattr(settings, "reply_tokens", 0) or 0)


def compute_reply(body: Mapping[str, Any], settings: Any = None, prompt: str | None = None) -> Reply:
    """The full deterministic reply to ``body`` (``prompt`` overrides the user text)."""
    text_in = last_user_text(body) if prompt is None else prompt
    tool = _tool_name(body) if prompt is None else None
    if tool is not None:
        args = orjson.dumps({"q": text_in}).decode()
        return Reply("", [], "tool", None, tool, args)
    words = ["echo:", *text_in.split()]
    want = _reply_tokens_setting(settings)
    if want > len(words):
        words.extend(itertools.islice(itertools.cycle(_FILLER), want - len(words)))
    text = " ".join(words)
    finish, matched = "stop", None
    stops = _stop_list(body)
    if stops:
        cut = len(text)
        for s in stops:
            i = text.find(s)
            if 0 <= i < cut:
                cut, matched = i, s
        if matched is not None:
            text, finish = text[:cut], "stop_sequence"
    tokens = _split_tokens(text)
    limit = _max_tokens(body)
    if limit is not None and len(tokens) > limit:
        tokens = tokens[:limit]
        text = "".join(tokens)
        finish, matched = "length", None
    return Reply(text, tokens, finish, matched, None, None)


def expected_text(body: Mapping[str, Any], settings: Any = None) -> str:
    """The content the simulator answers to ``body`` ("" when it calls a tool).

    ``settings`` is a mapping (or object) with ``reply_tokens``; None means 0.
    """
    return compute_reply(body, settings).text


def expected_embedding(text: str, dim: int = 8) -> list[float]:
    """The deterministic unit vector the simulator returns for ``text``."""
    raw = b""
    counter = 0
    while len(raw) < 2 * dim:
        raw += hashlib.blake2b(f"{counter}:{text}".encode(), digest_size=64).digest()
        counter += 1
    values = [(v / 32767.5) - 1.0 for v in struct.unpack(f"<{dim}H", raw[: 2 * dim])]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    # round-trip through float32 so the JSON and base64 forms agree exactly
    return list(struct.unpack(f"<{dim}f", struct.pack(f"<{dim}f", *(v / norm for v in values))))


def _count_words(body: Mapping[str, Any]) -> int:
    n = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                n += len(_content_text(m.get("content")).split())
    system = body.get("system")
    if system is not None:
        n += len(_content_text(system).split())
    return n


def _fragments(s: str, parts: int = 4) -> list[str]:
    step = max(1, -(-len(s) // parts))
    return [s[i : i + step] for i in range(0, len(s), step)] or [""]


# --------------------------------------------------------------------------- faults


def normalize_fault(rule: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one fault rule and fill in its defaults.

    ``{"kind": "status" | "reset" | "stall", "times": 1, "match": None, "path": None,
    "status": 500, "body": None, "headers": {}, "after_chunks": 0, "stall_s": 3600}``

    * ``times``: how many matching calls the rule consumes; a negative value = all.
    * ``match``: substring of the last user message; ``path``: exact request path.
      Without ``path`` a rule applies only to the model paths (chat, completions,
      embeddings, messages, responses); with it, any path (one the simulator does not
      serve answers a ``status`` fault there, else its 404).
    * ``status``: answer ``status`` with ``body`` (default an error in the path's
      format, OpenAI or Anthropic) and ``headers`` before any chunk, at once.
    * ``reset``: abort the connection (TCP RST) after ``after_chunks`` SSE events
      (0 = before any response byte; for a JSON answer, any value > 0 means
      "after the headers and half the body").
    * ``delay_ms``: a ``status`` fault answers after this long (default 0: at once).
    * ``stall``: send ``after_chunks`` events, then sleep ``stall_s`` without closing,
      then go on with the normal answer.

    Faults firing before any byte (``status``, or ``after_chunks`` 0) act at once:
    no ``ttft_ms`` and no ``max_running`` queue.
    """
    if not isinstance(rule, Mapping):
        raise ValueError("a fault rule must be a JSON object")
    unknown = set(rule) - {"kind", "times", "match", "path", "status", "body", "headers", "after_chunks", "stall_s",
                           "delay_ms"}
    if unknown:
        raise ValueError(f"unknown fault field(s): {sorted(unknown)}")
    kind = rule.get("kind")
    if kind not in ("status", "reset", "stall"):
        raise ValueError("fault kind must be 'status', 'reset' or 'stall'")
    times = int(rule.get("times", 1))
    if times == 0:
        raise ValueError("fault times must be non-zero (negative = unlimited)")
    headers = rule.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise ValueError("fault headers must be an object")
    return {
        "kind": kind,
        "times": times,
        "match": rule.get("match"),
        "path": rule.get("path"),
        "status": int(rule.get("status", 500)),
        "body": rule.get("body"),
        "headers": {str(k): str(v) for k, v in headers.items()},
        "after_chunks": max(0, int(rule.get("after_chunks", 0))),
        "stall_s": float(rule.get("stall_s", 3600)),
        "delay_ms": max(0.0, float(rule.get("delay_ms", 0))),
    }


# --------------------------------------------------------------------------- errors

_JSON_HEADERS = {"Content-Type": "application/json"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    h = dict(_JSON_HEADERS)
    if headers:
        h.update(headers)
    return web.Response(body=orjson.dumps(obj), status=status, headers=h)


def _openai_error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    if status == 429:
        etype = "rate_limit_error"
    elif status >= 500:
        etype = "server_error"
    elif status == 401:
        etype = "authentication_error"
    else:
        etype = "invalid_request_error"
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def _anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    etype = _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": etype, "message": message}}


def _openai_error(status: int, message: str, code: str | None = None) -> web.Response:
    return _json(_openai_error_body(status, message, code), status)


def _anthropic_error(status: int, message: str) -> web.Response:
    return _json(_anthropic_error_body(status, message), status)


class _BadRequest(Exception):
    pass


# --------------------------------------------------------------------------- simulator


def _check_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in DEFAULT_SETTINGS:
            raise ValueError(f"unknown setting {key!r}; known: {sorted(DEFAULT_SETTINGS)}")
        if key in _FLOAT_SETTINGS:
            value = float(value)
        elif key in _INT_SETTINGS:
            value = int(value)
        elif key == "models":
            if isinstance(value, str):
                value = [m for m in value.split(",") if m]
            if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
                raise ValueError("models must be a non-empty list of names")
            value = list(value)
        out[key] = value
    return out


class Simulator:
    """The simulator's state and request handling, independent of how it is served.

    ``settings`` is a live dict; prefer :meth:`update_settings` to change it (that also
    wakes calls queued by ``max_running``).
    """

    def __init__(self, **settings: Any) -> None:
        self._defaults = {**copy.deepcopy(DEFAULT_SETTINGS), **_check_settings(settings)}
        self.settings: dict[str, Any] = copy.deepcopy(self._defaults)
        self.faults: list[dict[str, Any]] = []
        self.calls = 0
        self.by_path: dict[str, int] = {}
        self.active = 0
        self.max_active = 0
        self.running = 0
        self.disconnects = 0
        self.faults_applied = 0
        self.embedded_inputs = 0  # inputs embedded, over every /v1/embeddings call
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=10_000)
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self._api = {
            ("POST", CHAT_PATH): self._chat,
            ("POST", COMPLETIONS_PATH): self._completions,
            ("POST", RESPONSES_PATH): self._responses,
            ("POST", EMBEDDINGS_PATH): self._embeddings,
            ("POST", MESSAGES_PATH): self._messages,
            ("POST", COUNT_TOKENS_PATH): self._count_tokens,
            ("GET", "/v1/models"): self._models,
        }
        self._control = {
            ("GET", "/_sim/stats"): self._ctl_stats,
            ("POST", "/_sim/reset"): self._ctl_reset,
            ("GET", "/_sim/settings"): self._ctl_get_settings,
            ("POST", "/_sim/settings"): self._ctl_settings,
            ("GET", "/_sim/faults"): self._ctl_get_faults,
            ("POST", "/_sim/faults"): self._ctl_faults,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/health"): self._health,
        }

    # ---------------------------------------------------------------- public API

    def stats(self, log: bool = True) -> dict[str, Any]:
        """A snapshot of the counters (the ``GET /_sim/stats`` document)."""
        out: dict[str, Any] = {
            "calls": self.calls,
            "by_path": dict(self.by_path),
            "active": self.active,
            "max_active": self.max_active,
            "running": self.running,
            "waiting": len(self._queue),
            "disconnects": self.disconnects,
            "faults_applied": self.faults_applied,
            "faults_pending": len(self.faults),
            "embedded_inputs": self.embedded_inputs,
        }
        if log:
            out["log"] = list(self.log)
        return out

    def reset(self) -> None:
        """Zero the counters, clear the log and faults, restore the start-up settings."""
        self.calls = 0
        self.by_path = {}
        self.max_active = self.active
        self.disconnects = 0
        self.faults_applied = 0
        self.embedded_inputs = 0
        self.log.clear()
        self.faults.clear()
        self.settings.clear()
        self.settings.update(copy.deepcopy(self._defaults))
        self._wake()

    def update_settings(self, values: Mapping[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """Merge settings (unknown names raise ValueError); returns the new settings."""
        merged = _check_settings({**(values or {}), **kw})
        self.settings.update(merged)
        self._wake()
        return dict(self.settings)

    def add_faults(self, rules: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> int:
        """Append fault rules (see :func:`normalize_fault`); returns the number pending."""
        if isinstance(rules, Mapping):
            rules = [rules]
        new = [normalize_fault(r) for r in rules]
        self.faults.extend(new)
        return len(self.faults)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        key = (request.method, request.path)
        ctl = self._control.get(key)
        if ctl is not None:
            return await ctl(request)
        return await self._api_call(request, key)

    def cancel_all(self) -> None:
        """Cancel in-flight calls (used at shutdown; not counted as disconnects)."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()

    # ---------------------------------------------------------------- control endpoints

    async def _ctl_stats(self, request: web.BaseRequest) -> web.Response:
        return _json(self.stats(log=request.query.get("log", "1") not in ("0", "false", "no")))

    async def _ctl_reset(self, request: web.BaseRequest) -> web.Response:
        self.reset()
        return _json({"ok": True})

    async def _ctl_get_settings(self, request: web.BaseRequest) -> web.Response:
        return _json(self.settings)

    async def _ctl_settings(self, request: web.BaseRequest) -> web.Response:
        try:
            values = orjson.loads(await request.read())
            if not isinstance(values, dict):
                raise ValueError("settings must be a JSON object")
            return _json(self.update_settings(values))
        except (ValueError, TypeError) as e:
            return _openai_error(400, str(e))

    async def _ctl_get_faults(self, request: web.BaseRequest) -> web.Response:
        return _json(self.faults)

    async def _ctl_faults(self, request: web.BaseRequest) -> web.Response:
        try:
            rules = orjson.loads(await request.read())
            if isinstance(rules, dict) and isinstance(rules.get("faults"), list):
                rules = rules["faults"]
            if not isinstance(rules, (list, dict)):
                raise ValueError("send a fault rule or a list of them")
            return _json({"pending": self.add_faults(rules)})
        except (ValueError, TypeError) as e:
            return _openai_error(400, str(e))

    async def _health(self, request: web.BaseRequest) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        s = self.settings
        model = str(s["models"][0]).replace("\\", "\\\\").replace('"', '\\"')
        label = f'{{model_name="{model}"}}'
        kv = float(s["kv_cache_usage"])
        gauges = (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", self.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             int(s["waiting"]) + len(self._queue)),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv),
            ("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.", kv),
        )
        lines = []
        for name, help_, value in gauges:
            lines.append(f"# HELP {name} {help_}\n# TYPE {name} gauge\n{name}{label} {float(value)}\n")
        return web.Response(
            body="".join(lines).encode(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    # ---------------------------------------------------------------- API calls

    async def _api_call(self, request: web.BaseRequest, key: tuple[str, str]) -> web.StreamResponse:
        arrival = time.monotonic()
        path = key[1]
        self.calls += 1
        self.by_path[path] = self.by_path.get(path, 0) + 1
        self.active += 1
        if self.active > self.max_active:
            self.max_active = self.active
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        call = _Call()
        try:
            raw = await request.read()
            body: Any = None
            bad_json = False
            if raw:
                try:
                    body = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    bad_json = True
            is_dict = isinstance(body, dict)
            self.log.append(
                {
                    "t": arrival,
                    "path": path,
                    "model": body.get("model") if is_dict else None,
                    "stream": bool(body.get("stream")) if is_dict else False,
                    "body": body,
                    "headers": {k.lower(): v for k, v in request.headers.items()},
                }
            )
            handler = self._api.get(key)
            if handler is None:
                # a path it does not serve (a forwarded call) still takes `status` faults named for it
                fault = self._take_fault(path, "")
                if fault is not None and fault["kind"] == "status":
                    return await self._fault_response(fault, path)
                return _openai_error(
                    404, f"Unknown request URL: {request.method} {path}. Please check the URL.", "unknown_url"
                )
            if path in MODEL_PATHS and not is_dict:
                msg = ("We could not parse the JSON body of your request." if bad_json or raw
                       else "Request body is empty.")
                if path == MESSAGES_PATH:
                    return _anthropic_error(400, msg)
                return _openai_error(400, msg)
            return await handler(request, body, call)
        except asyncio.CancelledError:
            if not self._closing and not call.aborted and not call.done:
                self.disconnects += 1
            raise
        except ConnectionResetError:  # a write found the client gone
            if not call.aborted and not call.done:
                self.disconnects += 1
            return web.Response(status=499)
        finally:
            self.active -= 1
            if task is not None:
                self._tasks.discard(task)

    def _take_fault(self, path: str, text: str) -> dict[str, Any] | None:
        for i, rule in enumerate(self.faults):
            rpath = rule["path"]
            if rpath is None:
                if path not in MODEL_PATHS:
                    continue
            elif rpath != path:
                continue
            match = rule["match"]
            if match is not None and match not in text:
                continue
            if rule["times"] > 0:
                rule["times"] -= 1
                if rule["times"] == 0:
                    del self.faults[i]
            self.faults_applied += 1
            return rule
        return None

    async def _fault_response(self, rule: dict[str, Any], path: str) -> web.Response:
        if rule["delay_ms"]:
            await asyncio.sleep(rule["delay_ms"] / 1000)
        status = rule["status"]
        body = rule["body"]
        if body is None:
            msg = f"simulated fault: HTTP {status}"
            body = _anthropic_error_body(status, msg) if path == MESSAGES_PATH else _openai_error_body(status, msg)
        return _json(body, status, rule["headers"])

    async def _acquire(self) -> None:
        limit = self.settings["max_running"]
        if not self._queue and (limit <= 0 or self.running < limit):
            self.running += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # we had been given a slot
            else:
                try:
                    self._queue.remove(fut)
                except ValueError:
                    pass
            raise

    def _release(self) -> None:
        self.running -= 1
        self._wake()

    def _wake(self) -> None:
        limit = self.settings["max_running"]
        while self._queue and (limit <= 0 or self.running < limit):
            fut = self._queue.popleft()
            if fut.done():
                continue
            self.running += 1
            fut.set_result(None)

    def _next_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):016x}"

    # ---------------------------------------------------------------- delivery

    async def _fault_at_start(
        self, request: web.BaseRequest, fault: dict[str, Any] | None, call: _Call
    ) -> tuple[dict[str, Any] | None, web.StreamResponse | None]:
        """Apply a fault due before the first chunk: a reset ends the call (its response is
        returned); a stall waits, then the answer goes on. Returns the fault still pending."""
        if fault is None or fault["after_chunks"] != 0:
            return fault, None
        if fault["kind"] == "reset":
            return None, await self._abort(request, call)
        await asyncio.sleep(fault["stall_s"])
        return None, None

    async def _deliver_stream(
        self,
        request: web.BaseRequest,
        steps: list[list[bytes]],
        fault: dict[str, Any] | None,
        call: _Call,
        headers: Mapping[str, str],
    ) -> web.StreamResponse:
        """Send SSE ``steps`` (a step = the events sent together, one token apart)."""
        fault, aborted = await self._fault_at_start(request, fault, call)
        if aborted is not None:
            return aborted
        s = self.settings
        ttft = s["ttft_ms"] / 1000.0
        tps = s["tokens_per_s"]
        interval = 1.0 / tps if tps > 0 else 0.0
        await self._acquire()
        try:
            if ttft > 0:
                await asyncio.sleep(ttft)
            resp = web.StreamResponse(headers=headers)
            await resp.prepare(request)
            if fault is None and interval == 0.0:
                await resp.write(b"".join(itertools.chain.from_iterable(steps)))
            else:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                sent = 0
                for k, step in enumerate(steps):
                    if k and interval:
                        delay = t0 + k * interval - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    if fault is not None and sent + len(step) >= fault["after_chunks"]:
                        cut = fault["after_chunks"] - sent
                        if cut:
                            await resp.write(b"".join(step[:cut]))
                        if fault["kind"] == "reset":
                            return await self._abort(request, call, resp)
                        await asyncio.sleep(fault["stall_s"])
                        fault = None
                        step = step[cut:]
                        if not step:
                            continue
                    await resp.write(b"".join(step))
                    sent += len(step)
            call.done = True
            await resp.write_eof()
            return resp
        finally:
            self._release()

    async def _deliver_json(
        self,
        request: web.BaseRequest,
        body: bytes,
        ntokens: int,
        fault: dict[str, Any] | None,
        call: _Call,
        headers: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        fault, aborted = await self._fault_at_start(request, fault, call)
        if aborted is not None:
            return aborted
        s = self.settings
        tps = s["tokens_per_s"]
        delay = s["ttft_ms"] / 1000.0
        if tps > 0 and ntokens > 1:
            delay += (ntokens - 1) / tps
        await self._acquire()
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            h = dict(_JSON_HEADERS)
            if headers:
                h.update(headers)
            if fault is None:
                call.done = True
                return web.Response(body=body, headers=h)
            resp = web.StreamResponse(headers=h)
            resp.content_length = len(body)
            await resp.prepare(request)
            half = len(body) // 2
            await resp.write(body[:half])
            if fault["kind"] == "reset":
                return await self._abort(request, call, resp)
            await asyncio.sleep(fault["stall_s"])
            await resp.write(body[half:])
            call.done = True
            await resp.write_eof()
            return resp
        finally:
            self._release()

    async def _abort(
        self, request: web.BaseRequest, call: _Call, resp: web.StreamResponse | None = None
    ) -> web.StreamResponse:
        """Reset the connection: RST, no clean end of the response."""
        call.aborted = True
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            transport.abort()
        # connection_lost cancels this handler (handler_cancellation=True); wait for it
        await asyncio.sleep(3600)
        return resp or web.Response(status=499)  # pragma: no cover

    # ---------------------------------------------------------------- OpenAI

    async def _chat(self, request: web.BaseRequest, body: dict[str, Any], call: _Call) -> web.StreamResponse:
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(model, str) or not model:
            return _openai_error(400, "you must provide a model parameter")
        if not isinstance(messages, list) or not messages:
            return _openai_error(400, "'messages' must be a non-empty array")
        n = body.get("n", 1)
        if n is None:
            n = 1
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
            return _openai_error(400, "n must be an integer between 1 and 128")
        text_in = last_user_text(body)
        fault = self._take_fault(CHAT_PATH, text_in)
        if fault is not None and fault["kind"] == "status":
            return await self._fault_response(fault, CHAT_PATH)

        reply = compute_reply(body, self.settings)
        finish = {"stop": "stop", "stop_sequence": "stop", "length": "length", "tool": "tool_calls"}[reply.finish]
        ident = "chatcmpl-" + self._next_id()
        created = int(time.time())
        prompt_tokens = _count_words(body)
        if reply.tool_name is not None:
            frags = _fragments(reply.tool_args or "")
            per_choice = len(frags)
            call_ids = [f"call_{self._next_id()}" for _ in range(n)]
        else:
            frags = []
            per_choice = len(reply.tokens)
            call_ids = []
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": per_choice * n,
            "total_tokens": prompt_tokens + per_choice * n,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        xh = {"x-request-id": "req_" + self._next_id()}

        if not body.get("stream"):
            choices = []
            for i in range(n):
                if reply.tool_name is not None:
                    message = {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": call_ids[i],
                                "type": "function",
                                "function": {"name": reply.tool_name, "arguments": reply.tool_args},
                            }
                        ],
                        "refusal": None,
                        "annotations": [],
                    }
                else:
                    message = {"role": "assistant", "content": reply.text, "refusal": None, "annotations": []}
                choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": finish})
            out = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": _SYSTEM_FINGERPRINT,
            }
            return await self._deliver_json(request, orjson.dumps(out), per_choice, fault, call, xh)

        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        head = orjson.dumps(
            {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": _SYSTEM_FINGERPRINT,
            }
        )[:-1]
        tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        pre = [b"data: " + head + b',"choices":[{"index":%d,"delta":' % i for i in range(n)]
        mid_open = b',"logprobs":null,"finish_reason":null}]' + tail

        steps: list[list[bytes]] = []
        first: list[bytes] = []
        for i in range(n):
            role: dict[str, Any] = {"role": "assistant", "content": None if reply.tool_name else "", "refusal": None}
            first.append(pre[i] + orjson.dumps(role) + mid_open)
        if reply.tool_name is not None:
            for i in range(n):
                start = {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": call_ids[i],
                            "type": "function",
                            "function": {"name": reply.tool_name, "arguments": ""},
                        }
                    ]
                }
                first.append(pre[i] + orjson.dumps(start) + mid_open)
            deltas = [
                orjson.dumps({"tool_calls": [{"index": 0, "function": {"arguments": f}}]}) for f in frags
            ]
        else:
            deltas = [b'{"content":' + orjson.dumps(t) + b"}" for t in reply.tokens]
        steps.append(first)
        for k, d in enumerate(deltas):
            events = [pre[i] + d + mid_open for i in range(n)]
            if k == 0:
                first.extend(events)
            else:
                steps.append(events)
        last = steps[-1]
        fin = b',"logprobs":null,"finish_reason":"' + finish.encode() + b'"}]' + tail
        for i in range(n):
            last.append(pre[i] + b"{}" + fin)
        if include_usage:
            last.append(b"data: " + head + b',"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n")
        last.append(b"data: [DONE]\n\n")
        return await self._deliver_stream(request, steps, fault, call, {**_SSE_HEADERS, **xh})

    async def _responses(self, request: web.BaseRequest, body: dict[str, Any], call: _Call) -> web.StreamResponse:
        """The Responses API: one output item (a message, or a function call), its typed
        events one token apart, numbered from 0, ending with response.completed (or
        response.incomplete at max_output_tokens)."""
        model = body.get("model")
        value = body.get("input")
        if not isinstance(model, str) or not model:
            return _openai_error(400, "you must provide a model parameter")
        if not (isinstance(value, str) or (isinstance(value, list) and value)):
            return _openai_error(400, "'input' must be a string or a non-empty array of input items")
        # read as a chat request: `input` as messages, `instructions` as the system prompt
        body = {**body, "messages": _responses_messages(value), "system": body.get("instructions")}
        fault = self._take_fault(RESPONSES_PATH, last_user_text(body))
        if fault is not None and fault["kind"] == "status":
            return await self._fault_response(fault, RESPONSES_PATH)
        reply = compute_reply(body, self.settings)
        ident = "resp_" + self._next_id()
        item_id = ("fc_" if reply.tool_name is not None else "msg_") + self._next_id()
        input_tokens = _count_words(body)
        if reply.tool_name is not None:
            frags = _fragments(reply.tool_args or "")
            item: dict[str, Any] = {"id": item_id, "type": "function_call", "status": "completed",
                                    "call_id": "call_" + self._next_id(), "name": reply.tool_name,
                                    "arguments": reply.tool_args}
        else:
            frags = reply.tokens
            item = {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}]}
        incomplete = reply.finish == "length"
        output_tokens = len(frags)
        response = {
            "id": ident, "object": "response", "created_at": int(time.time()),
            "status": "incomplete" if incomplete else "completed", "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": model, "output": [item], "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True), "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "top_p": body.get("top_p", 1.0), "truncation": "disabled",
            "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": input_tokens + output_tokens},
            "metadata": body.get("metadata") or {},
        }
        xh = {"x-request-id": "req_" + self._next_id()}
        if not body.get("stream"):
            return await self._deliver_json(request, orjson.dumps(response), output_tokens, fault, call, xh)

        seq = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            data = {"type": kind, "sequence_number": next(seq), **fields}
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

        started = {**response, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
        first = [event("response.created", response=started), event("response.in_progress", response=started)]
        if reply.tool_name is not None:
            where: dict[str, Any] = {"item_id": item_id, "output_index": 0}
            first.append(event("response.output_item.added", output_index=0,
                               item={**item, "status": "in_progress", "arguments": ""}))
            deltas = [event("response.function_call_arguments.delta", **where, delta=f) for f in frags]
            done = [event("response.function_call_arguments.done", **where, arguments=reply.tool_args)]
        else:
            where = {"item_id": item_id, "output_index": 0, "content_index": 0}
            part = item["content"][0]
            first.append(event("response.output_item.added", output_index=0,
                               item={**item, "status": "in_progress", "content": []}))
            first.append(event("response.content_part.added", **where, part={**part, "text": ""}))
            deltas = [event("response.output_text.delta", **where, delta=t, logprobs=[]) for t in frags]
            done = [event("response.output_text.done", **where, text=reply.text, logprobs=[]),
                    event("response.content_part.done", **where, part=part)]
        steps = [first]
        for k, d in enumerate(deltas):
            if k == 0:
                first.append(d)
            else:
                steps.append([d])
        done.append(event("response.output_item.done", output_index=0, item=item))
        done.append(event("response.incomplete" if incomplete else "response.completed", response=response))
        steps[-1].extend(done)
        return await self._deliver_stream(request, steps, fault, call, {**_SSE_HEADERS, **xh})

    async def _completions(self, request: web.BaseRequest, body: dict[str, Any], call: _Call) -> web.StreamResponse:
        model = body.get("model")
        prompt = body.get("prompt")
        if not isinstance(model, str) or not model:
            return _openai_error(400, "you must provide a model parameter")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        else:
            return _openai_error(400, "'prompt' must be a string or a list of strings")
        n = body.get("n", 1) or 1
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
            return _openai_error(400, "n must be an integer between 1 and 128")
        fault = self._take_fault(COMPLETIONS_PATH, prompts[0])
        if fault is not None and fault["kind"] == "status":
            return await self._fault_response(fault, COMPLETIONS_PATH)
        replies = [compute_reply(body, self.settings, prompt=p) for p in prompts]
        choices = [(pi * n + j, r) for pi, r in enumerate(replies) for j in range(n)]
        ident = "cmpl-" + self._next_id()
        created = int(time.time())
        prompt_tokens = sum(len(p.split()) for p in prompts)
        completion_tokens = sum(len(r.tokens) for _, r in choices)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        finish = {"stop": "stop", "stop_sequence": "stop", "length": "length"}
        if not body.get("stream"):
            out = {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": _SYSTEM_FINGERPRINT,
                "choices": [
                    {"text": r.text, "index": i, "logprobs": None, "finish_reason": finish[r.finish]}
                    for i, r in choices
                ],
                "usage": usage,
            }
            ntok = max(len(r.tokens) for r in replies)
            return await self._deliver_json(request, orjson.dumps(out), ntok, fault, call)
        head = b"data: " + orjson.dumps(
            {"id": ident, "object": "text_completion", "created": created, "model": model}
        )[:-1]
        steps: list[list[bytes]] = []
        ntok = max(len(r.tokens) for r in replies)
        for k in range(max(ntok, 1)):
            events = []
            for i, r in choices:
                if k < len(r.tokens):
                    c = {"text": r.tokens[k], "index": i, "logprobs": None, "finish_reason": None}
                    events.append(head + b',"choices":[' + orjson.dumps(c) + b"]}\n\n")
            steps.append(events)
        for i, r in choices:
            c = {"text": "", "index": i, "logprobs": None, "finish_reason": finish[r.finish]}
            steps[-1].append(head + b',"choices":[' + orjson.dumps(c) + b"]}\n\n")
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            steps[-1].append(head + b',"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n")
        steps[-1].append(b"data: [DONE]\n\n")
        return await self._deliver_stream(request, steps, fault, call, _SSE_HEADERS)

    async def _embeddings(self, request: web.BaseRequest, body: dict[str, Any], call: _Call) -> web.StreamResponse:
        model = body.get("model")
        inp = body.get("input")
        if not isinstance(model, str) or not model:
            return _openai_error(400, "you must provide a model parameter")
        if isinstance(inp, str):
            inputs = [inp]
        elif isinstance(inp, list) and inp:
            if all(isinstance(x, int) for x in inp):
                inputs = [" ".join(map(str, inp))]
            elif all(isinstance(x, str) or (isinstance(x, list) and all(isinstance(t, int) for t in x)) for x in inp):
                inputs = [x if isinstance(x, str) else " ".join(map(str, x)) for x in inp]
            else:
                return _openai_error(400, "'input' must be strings, tokens or arrays of tokens")
        else:
            return _openai_error(400, "'input' must be a string or a non-empty array")
        dim = body.get("dimensions") or self.settings["embedding_dim"]
        if not isinstance(dim, int) or not 1 <= dim <= 4096:
            return _openai_error(400, "dimensions must be an integer between 1 and 4096")
        fault = self._take_fault(EMBEDDINGS_PATH, inputs[0])
        if fault is not None and fault["kind"] == "status":
            return await self._fault_response(fault, EMBEDDINGS_PATH)
        b64 = body.get("encoding_format") == "base64"
        self.embedded_inputs += len(inputs)
        data = []
        for i, text in enumerate(inputs):
            vec = expected_embedding(text, dim)
            emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        ntok = sum(len(t.split()) for t in inputs)
        out = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": ntok, "total_tokens": ntok},
        }
        return await self._deliver_json(request, orjson.dumps(out), 1, fault, call)

    async def _models(self, request: web.BaseRequest, body: Any, call: _Call) -> web.StreamResponse:
        fault = self._take_fault(request.path, "")  # only a rule naming the path applies here
        if fault is not None and fault["kind"] == "status":
            return await self._fault_response(fault, request.path)
        data = [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "herd-simulator"}
            for m in self.settings["models"]
        ]
        return _json({"object": "list", "data": data})

    # ---------------------------------------------------------------- Anthropic

    @staticmethod
    def _validate_messages(request: web.BaseRequest, body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("model: Field required")
        mt = body.get("max_tokens")
        if mt is None:
            raise _BadRequest("max_tokens: Field required")
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise _BadRequest("max_tokens: Input should be a valid integer greater than or equal to 1")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise _BadRequest("messages: Field required")
        if not messages:
            raise _BadRequest("messages: at least one message is required")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise _BadRequest(f"messages.{i}: Input should be a valid dictionary")
            if m.get("role") not in ("user", "assistant"):
                raise _BadRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
            content = m.get("content")
            if isinstance(content, list):
                for j, block in enumerate(content):
                    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                        raise _BadRequest(f"messages.{i}.content.{j}: Input should be a valid content block")
            elif not isinstance(content, str):
                raise _BadRequest(f"messages.{i}.content: Field required")
        system = body.get("system")
        text_blocks = isinstance(system, list) and all(
            isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in system
        )
        if system is not None and not isinstance(system, str) and not text_blocks:
            raise _BadRequest("system: Input should be a valid string or a list of text blocks")
        stops = body.get("stop_sequences")
        if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
            raise _BadRequest("stop_sequences: Input should be a valid list of strings")
        tools = body.get("tools")
        if tools is not None and (
            not isinstance(tools, list)
            or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools)
        ):
            raise _BadRequest("tools: each tool needs a name")

    async def _count_tokens(self, request: web.BaseRequest, body: Any, call: _Call) -> web.StreamResponse:
        """Anthropic's token count: the words of the messages and the system prompt."""
        h = request.headers
        if not h.get("x-api-key") and not h.get("authorization", "").lower().startswith("bearer "):
            return _anthropic_error(401, "x-api-key header is required")
        if not h.get("anthropic-version"):
            return _anthropic_error(400, "anthropic-version: header is required")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _anthropic_error(400, "messages: Field required")
        return _json({"input_tokens": _count_words(body)})

    async def _messages(self, request: web.BaseRequest, body: dict[str, Any], call: _Call) -> web.StreamResponse:
        h = request.headers
        if not h.get("x-api-key") and not h.get("authorization", "").lower().startswith("bearer "):
            return _anthropic_error(401, "x-api-key header is required")
        if not h.get("anthropic-version"):
            return _anthropic_error(400, "anthropic-version: header is required")
        try:
            self._validate_messages(request, body)
        except _BadRequest as e:
            return _anthropic_error(400, str(e))
        text_in = last_user_text(body)
        fault = self._take_fault(MESSAGES_PATH, text_in)
        if fault is not None and fault["kind"] == "status":
            return await self._fault_response(fault, MESSAGES_PATH)

        reply = compute_reply(body, self.settings)
        stop_reason = {
            "stop": "end_turn",
            "stop_sequence": "stop_sequence",
            "length": "max_tokens",
            "tool": "tool_use",
        }[reply.finish]
        model = body["model"]
        ident = "msg_" + self._next_id()
        input_tokens = _count_words(body)
        xh = {"request-id": "req_" + self._next_id()}
        if reply.tool_name is not None:
            frags = _fragments(reply.tool_args or "")
            output_tokens = len(frags)
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": "toolu_" + self._next_id(),
                "name": reply.tool_name,
                "input": orjson.loads(reply.tool_args or "{}"),
            }
        else:
            frags = reply.tokens
            output_tokens = len(frags)
            block = {"type": "text", "text": reply.text}
        usage = {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
        }
        if not body.get("stream"):
            out = {
                "id": ident,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [block],
                "stop_reason": stop_reason,
                "stop_sequence": reply.stop_sequence,
                "usage": usage,
            }
            return await self._deliver_json(request, orjson.dumps(out), output_tokens, fault, call, xh)

        def event(name: bytes, data: Any) -> bytes:
            return b"event: " + name + b"\ndata: " + orjson.dumps(data) + b"\n\n"

        start_msg = {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        }
        start_block = dict(block, input={}) if reply.tool_name is not None else {"type": "text", "text": ""}
        first = [
            event(b"message_start", {"type": "message_start", "message": start_msg}),
            event(b"content_block_start", {"type": "content_block_start", "index": 0, "content_block": start_block}),
            b'event: ping\ndata: {"type":"ping"}\n\n',
        ]
        steps = [first]
        if reply.tool_name is not None:
            dprefix = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                       b'"delta":{"type":"input_json_delta","partial_json":')
        else:
            dprefix = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                       b'"delta":{"type":"text_delta","text":')
        for k, frag in enumerate(frags):
            ev = dprefix + orjson.dumps(frag) + b"}}\n\n"
            if k == 0:
                first.append(ev)
            else:
                steps.append([ev])
        steps[-1].extend(
            [
                b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
                event(
                    b"message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason, "stop_sequence": reply.stop_sequence},
                        "usage": {"output_tokens": output_tokens},
                    },
                ),
                b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
            ]
        )
        return await self._deliver_stream(request, steps, fault, call, {**_SSE_HEADERS, **xh})


class _Call:
    """Per-call flags: ``aborted`` (we reset it), ``done`` (the answer was handed over)."""

    __slots__ = ("aborted", "done")

    def __init__(self) -> None:
        self.aborted = False
        self.done = False


# --------------------------------------------------------------------------- servers


class SimulatorServer:
    """Serve a :class:`Simulator` on the running asyncio loop.

    ``async with SimulatorServer(port=0, ttft_ms=5) as sim: ...``; ``sim.url`` is
    ``http://host:port`` (no ``/v1``).  Port 0 binds a free port atomically.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **settings: Any) -> None:
        self.host = host
        self.port = port
        self.sim = Simulator(**settings)
        self._runner: web.ServerRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def settings(self) -> dict[str, Any]:
        return self.sim.settings

    def stats(self, log: bool = True) -> dict[str, Any]:
        return self.sim.stats(log)

    def add_faults(self, rules: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> int:
        return self.sim.add_faults(rules)

    def update_settings(self, values: Mapping[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        return self.sim.update_settings(values, **kw)

    def reset(self) -> None:
        self.sim.reset()

    async def start(self) -> SimulatorServer:
        self.sim._closing = False
        server = web.Server(self.sim.handle, handler_cancellation=True, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, backlog=4096, reuse_address=True)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is None:
            return
        self.sim.cancel_all()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> SimulatorServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class ThreadedSimulator:
    """A :class:`SimulatorServer` on its own event loop in a daemon thread, for sync code."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **settings: Any) -> None:
        self.server = SimulatorServer(host, port, **settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def settings(self) -> dict[str, Any]:
        return self.server.settings

    def start(self) -> ThreadedSimulator:
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        async def serve() -> None:
            self._stopped = asyncio.Event()
            try:
                await self.server.start()
            except BaseException as e:  # report bind errors to the caller
                errors.append(e)
                ready.set()
                return
            ready.set()
            try:
                await self._stopped.wait()
            finally:
                await self.server.stop()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(serve())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="herd-simulator", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            self._thread.join()
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        assert self._loop is not None and self._stopped is not None
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=10)
        self._thread = None

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        if self._loop is None or self._thread is None:
            return fn(*args, **kw)

        async def run() -> Any:
            return fn(*args, **kw)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    def stats(self, log: bool = True) -> dict[str, Any]:
        return self._call(self.server.stats, log)

    def add_faults(self, rules: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> int:
        return self._call(self.server.add_faults, rules)

    def update_settings(self, values: Mapping[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        return self._call(self.server.update_settings, values, **kw)

    def reset(self) -> None:
        self._call(self.server.reset)

    def __enter__(self) -> ThreadedSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.simulator", description="herd's fake LLM upstream")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000, help="0 picks a free port (printed at start)")
    p.add_argument("--ttft-ms", type=float, default=DEFAULT_SETTINGS["ttft_ms"])
    p.add_argument("--tokens-per-s", type=float, default=DEFAULT_SETTINGS["tokens_per_s"])
    p.add_argument("--reply-tokens", type=int, default=DEFAULT_SETTINGS["reply_tokens"])
    p.add_argument("--max-running", type=int, default=DEFAULT_SETTINGS["max_running"])
    p.add_argument("--waiting", type=int, default=DEFAULT_SETTINGS["waiting"])
    p.add_argument("--kv-cache-usage", type=float, default=DEFAULT_SETTINGS["kv_cache_usage"])
    p.add_argument("--embedding-dim", type=int, default=DEFAULT_SETTINGS["embedding_dim"])
    p.add_argument("--models", default=",".join(DEFAULT_SETTINGS["models"]), help="comma-separated names")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until SIGINT/SIGTERM; prints ``herd-sim listening on URL``."""
    args = _parse_args(argv)
    settings = {
        "ttft_ms": args.ttft_ms,
        "tokens_per_s": args.tokens_per_s,
        "reply_tokens": args.reply_tokens,
        "max_running": args.max_running,
        "waiting": args.waiting,
        "kv_cache_usage": args.kv_cache_usage,
        "embedding_dim": args.embedding_dim,
        "models": args.models,
    }

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # pragma: no cover
                pass
        async with SimulatorServer(args.host, args.port, **settings) as sim:
            print(f"herd-sim listening on {sim.url}", flush=True)
            await stop.wait()

    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            uvloop = None
        if uvloop is not None:
            if hasattr(uvloop, "run"):
                uvloop.run(serve())
                return 0
            uvloop.install()  # pragma: no cover
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
