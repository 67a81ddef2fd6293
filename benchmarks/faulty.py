"""A small misbehaving OpenAI-compatible upstream, for herd's fault tests and `herd bench chaos`.

It answers `POST /v1/chat/completions` with "echo: <last user text>" (streamed one word a
chunk, usage in the last chunk, then [DONE]; or one JSON body) unless a fault is on. One
fault at a time, set with `POST /_faulty/fault` (JSON) or `FaultyUpstream.set_fault`:

    {"mode": MODE, "for_s": seconds, "times": calls, ...mode options}

`for_s` (time) and `times` (calls) bound the fault; past either it answers normally again
(neither: until the next fault). Modes:

    status        HTTP `status` (500) with an OpenAI error body; `retry_after` adds the header
    reset         the connection is reset before any byte
    reset_mid     half the answer (SSE events, or half the JSON body), then a reset
    stall         headers and half the events, then nothing for `stall_s` (60)
    keepalive     half the events, then only `: keep-alive` comments (5 a second) for `stall_s`
    drip          the whole answer, a few bytes per write (events split across reads)
    bad_json      200 application/json, a truncated body
    bad_sse       200 text/event-stream, an event whose data is not JSON
    non_object    200 with valid JSON that is not an object (`[1, 2]`; SSE `data: 5`)
    string_delta  200 whose chunk says `"delta": "oops"` (JSON: `"message": "oops"`)
    echo_key      HTTP 500 whose error message repeats the Authorization header it got

`ttft_ms` (a setting, `POST /_faulty/settings`) delays every answer, so bursts overlap.
`GET /_faulty/stats`: calls, calls answered by each mode, and when each came. `POST /_faulty/reset`.

    with FaultyUpstream() as up:            # its own loop, in a thread
        up.set_fault(mode="status", for_s=1.0) ... up.url ... up.stats()
    python -m benchmarks.faulty --port 9100  # a process
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any, Self

import orjson
from aiohttp import web

MODES = ("ok", "status", "reset", "reset_mid", "stall", "keepalive", "drip", "bad_json", "bad_sse", "non_object",
         "string_delta", "echo_key")


def answer_text(body: dict) -> str:
    """What a healthy answer says: "echo: " and the last user message's text."""
    text = ""
    for message in body.get("messages") or ():
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            text = content if isinstance(content, str) else ""
    return "echo: " + text


class Faulty:
    def __init__(self, ttft_ms: float = 0.0) -> None:
        self.ttft_ms = ttft_ms
        self.reset()

    def reset(self) -> None:
        self.fault: dict[str, Any] = {"mode": "ok"}
        self.until: float | None = None
        self.left: int | None = None
        self.calls = 0
        self.by_mode: dict[str, int] = {}
        self.times: list[float] = []  # when each call came (time.monotonic())

    def set_fault(self, mode: str = "ok", for_s: float | None = None, times: int | None = None, **options: Any) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.fault = {"mode": mode, **options}
        self.until = time.monotonic() + for_s if for_s is not None else None
        self.left = times

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "by_mode": dict(self.by_mode), "fault": self.fault["mode"],
                "times": list(self.times)}

    def _take(self) -> dict[str, Any]:
        fault = self.fault
        if (self.until is not None and time.monotonic() >= self.until) or self.left == 0:
            fault = self.fault = {"mode": "ok"}
            self.until = self.left = None
        elif self.left is not None:
            self.left -= 1
        return fault

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/_faulty/stats":
            return web.json_response(self.stats())
        if path == "/_faulty/reset":
            self.reset()
            return web.json_response({"ok": True})
        if path == "/_faulty/fault":
            self.set_fault(**await request.json())
            return web.json_response({"ok": True})
        if path == "/_faulty/settings":
            self.ttft_ms = float((await request.json()).get("ttft_ms", self.ttft_ms))
            return web.json_response({"ok": True})
        if path == "/health":
            return web.json_response({"ok": True})
        if path != "/v1/chat/completions":
            return web.json_response({"error": {"message": "not found", "type": "invalid_request_error"}}, status=404)
        body = orjson.loads(await request.read())
        self.calls += 1
        self.times.append(time.monotonic())
        fault = self._take()
        mode = fault["mode"]
        self.by_mode[mode] = self.by_mode.get(mode, 0) + 1
        if self.ttft_ms:
            await asyncio.sleep(self.ttft_ms / 1000)
        stream = bool(body.get("stream"))
        if mode == "status":
            headers = {"retry-after": str(fault["retry_after"])} if "retry_after" in fault else None
            status = int(fault.get("status", 500))
            error = {"error": {"message": f"faulty upstream: HTTP {status}", "type": "server_error", "code": None}}
            return web.json_response(error, status=status, headers=headers)
        if mode == "echo_key":
            seen = request.headers.get("authorization", "")
            error = {"error": {"message": f"bad credentials: {seen}", "type": "invalid_request_error"}}
            return web.json_response(error, status=500)
        if mode == "reset":
            return await _reset(request)
        events = _events(body, mode)
        if not stream:
            raw = _json_answer(body, mode)
            if mode == "reset_mid":
                resp = web.StreamResponse(headers={"content-type": "application/json",
                                                   "content-length": str(len(raw))})
                await resp.prepare(request)
                await resp.write(raw[: len(raw) // 2])
                return await _reset(request)
            return web.Response(body=raw, content_type="application/json")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        half = len(events) // 2
        for i, event in enumerate(events):
            if i == half and mode == "reset_mid":
                return await _reset(request)
            if i == half and mode == "stall":
                await asyncio.sleep(float(fault.get("stall_s", 60)))
                return resp
            if i == half and mode == "keepalive":
                for _ in range(int(float(fault.get("stall_s", 60)) * 5)):
                    await resp.write(b": keep-alive\n\n")
                    await asyncio.sleep(0.2)
                return resp
            if mode == "drip":
                for k in range(0, len(event), 7):
                    await resp.write(event[k:k + 7])
                    await asyncio.sleep(0.001)
                continue
            await resp.write(event)
        await resp.write_eof()
        return resp


def _chunk(id_: str, delta: Any, finish: str | None = None, **extra: Any) -> bytes:
    data = {"id": id_, "object": "chat.completion.chunk", "created": 1, "model": "faulty",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _events(body: dict, mode: str) -> list[bytes]:
    text = answer_text(body)
    id_ = "chatcmpl-faulty"
    words = text.split(" ")
    events = [_chunk(id_, {"role": "assistant", "content": ""})]
    events += [_chunk(id_, {"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
    if mode == "bad_sse":
        events.insert(2, b'data: {"id": "chatcmpl-faulty", "choices": [\n\n')
    elif mode == "non_object":
        events.insert(2, b"data: 5\n\n")
    elif mode == "string_delta":
        events.insert(2, _chunk(id_, "oops"))
    events.append(_chunk(id_, {}, "stop"))
    usage = {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": 1 + len(words)}
    events.append(b"data: " + orjson.dumps({"id": id_, "object": "chat.completion.chunk", "created": 1,
                                            "model": "faulty", "choices": [], "usage": usage}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def _json_answer(body: dict, mode: str) -> bytes:
    if mode == "non_object":
        return b"[1, 2]"
    message: Any = {"role": "assistant", "content": answer_text(body)}
    if mode == "string_delta":
        message = "oops"
    raw = orjson.dumps({"id": "chatcmpl-faulty", "object": "chat.completion", "created": 1, "model": "faulty",
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    return raw[: len(raw) // 2] if mode == "bad_json" else raw


async def _reset(request: web.Request) -> web.StreamResponse:
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    await asyncio.sleep(3600)  # the handler is cancelled when the connection goes
    return web.Response(status=499)  # pragma: no cover


class FaultyUpstream:
    """A Faulty upstream on its own event loop in a daemon thread, for tests."""

    def __init__(self, ttft_ms: float = 0.0) -> None:
        self.faulty = Faulty(ttft_ms)
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> Self:
        ready = threading.Event()

        async def serve() -> None:
            self._stop = asyncio.Event()
            runner = await _start(self.faulty, 0)
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(serve())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="faulty-upstream")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the faulty upstream did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _call(self, fn, *args, **kw):
        async def run():
            return fn(*args, **kw)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def set_fault(self, mode: str = "ok", **options: Any) -> None:
        self._call(self.faulty.set_fault, mode, **options)

    def stats(self) -> dict[str, Any]:
        return self._call(self.faulty.stats)

    def reset(self) -> None:
        self._call(self.faulty.reset)


async def _start(faulty: Faulty, port: int) -> web.AppRunner:
    server = web.Server(faulty.handle, handler_cancellation=True, access_log=None)
    runner = web.ServerRunner(server, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096, reuse_address=True).start()
    return runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faulty", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    args = parser.parse_args(argv)

    async def serve() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        runner = await _start(Faulty(args.ttft_ms), args.port)
        print(f"faulty upstream listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
