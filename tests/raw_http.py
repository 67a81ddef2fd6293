"""Raw HTTP on loopback, for what a well-behaved client library would never send.

* `RawUpstream`: an upstream that records every request it receives exactly as it came
  (request target, headers) and answers with whatever its `respond` coroutine writes, so a
  test can see paths outside /v1 and make an upstream misbehave.
* `raw_request`: one request written byte for byte on a socket, answer read until close.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Self

import orjson


@dataclass
class Received:
    method: str
    target: str  # the request target exactly as it arrived (path and query, not decoded)
    headers: dict[str, str]  # lower-case names
    body: bytes


Respond = Callable[[Received, asyncio.StreamWriter], Awaitable[None]]

COMPLETION = {
    "id": "chatcmpl-raw",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


async def answer_json(writer: asyncio.StreamWriter, obj: object, status: int = 200) -> None:
    body = orjson.dumps(obj)
    writer.write(
        f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
    )
    await writer.drain()


async def default_respond(request: Received, writer: asyncio.StreamWriter) -> None:
    """A chat completion for chat calls, `{"ok": true}` for anything else."""
    if request.target.startswith("/v1/chat/completions"):
        await answer_json(writer, COMPLETION)
    else:
        await answer_json(writer, {"ok": True})


class RawUpstream:
    """A recording HTTP/1.1 server on its own loop in a daemon thread."""

    def __init__(self, respond: Respond = default_respond) -> None:
        self.respond = respond
        self.received: list[Received] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="raw-upstream")
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = Received(method, target, headers, body)
                self.received.append(request)
                await self.respond(request, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return orjson.loads(self.body)


def raw_request(port: int, data: bytes, timeout: float = 30.0) -> RawAnswer:
    """Send `data` as it is and read the whole answer (the server closes, or a
    content-length's worth); status 0 if the server closed without answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> RawAnswer:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        part = sock.recv(65536)
        if not part:
            return RawAnswer(0, {}, buffer)
        buffer += part
    head, _, body = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    while length is None or len(body) < int(length):
        part = sock.recv(65536)
        if not part:
            break
        body += part
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return RawAnswer(status, headers, body)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out
