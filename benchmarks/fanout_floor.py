"""A bare single-flight coalescing proxy: the floor of herd's stack for bursts and fan-out.

``POST /v1/chat/completions`` only. The request body's bytes are the key: the first
request of a key is the leader and starts ONE upstream call (one shared aiohttp session);
every request with the same key that comes while that call runs waits on the same flight
and gets the same status, content type and body. A stream's chunks are relayed to every
subscriber as they arrive, one ``send`` per subscriber per wake-up. The flight ends (its
key is forgotten) when the upstream's answer is complete. The answers carry
``x-herd: leader`` or ``x-herd: follower``, as herd's do, so that the benchmarks measure a
follower's lag after its leader here the same way as through herd.

A bare ASGI callable (no Starlette, no middleware) served by uvicorn with herd's server
settings. No canonical keys, deadlines, late-join replay, usage accounting, metrics or
logs: whatever this costs to coalesce, herd costs at least as much.

``--server raw``: the same coalescing without ASGI or uvicorn, an ``asyncio.Protocol`` under
uvloop parsed by httptools. A flight's answer (a stream's head, each chunk, its end) is
rendered once, a leader's and a follower's variant, and written to every subscriber's
transport in one loop: the floor of the server stack itself (bench target ``floor-raw``).

    python -m benchmarks.fanout_floor --upstream http://127.0.0.1:9000 --port 8091 [--server raw]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from http import HTTPStatus

import aiohttp
import httptools
import orjson

from benchmarks.passthrough import POOL_SIZE, _aiohttp_session

CHAT_PATH = "/v1/chat/completions"
# herd's own uvicorn settings (proxy/cli.py), less its config-driven ones
UVICORN = {"loop": "uvloop", "http": "httptools", "lifespan": "on", "access_log": False, "proxy_headers": False,
           "server_header": False, "backlog": 4096, "timeout_graceful_shutdown": 1}
_LEADER, _FOLLOWER = (b"x-herd", b"leader"), (b"x-herd", b"follower")
_JSON = {"content-type": "application/json"}


class Flight:
    __slots__ = ("changed", "chunks", "done", "head", "stream", "task")

    def __init__(self, stream: bool) -> None:
        loop = asyncio.get_running_loop()
        self.stream = stream
        self.head: asyncio.Future[tuple[int, bytes]] = loop.create_future()  # (status, content type)
        self.chunks: list[bytes] = []  # the body so far
        self.done = False
        self.changed: asyncio.Future[None] = loop.create_future()  # set, then replaced, at each change
        self.task: asyncio.Task | None = None  # the upstream call (held: the loop keeps only weak references)

    def wake(self) -> None:
        changed, self.changed = self.changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    def start(self, status: int, ctype: bytes) -> None:
        """A stream's head: its subscribers start answering."""
        self.head.set_result((status, ctype))

    def chunk(self, data: bytes) -> None:
        self.chunks.append(data)
        self.wake()

    def end(self, status: int, ctype: bytes, body: bytes) -> None:
        """The answer is complete: a whole body (no stream started), or a stream's end."""
        if not self.head.done():  # a non-stream answer waits for the head only
            self.chunks[:] = [body]
            self.head.set_result((status, ctype))
        self.done = True
        self.wake()


async def relay(session: aiohttp.ClientSession, url: str, key: bytes, flight, flights: dict) -> None:
    """The leader's upstream call, told to `flight` (either server's): a stream's head and each
    chunk as they come, then the end; a 502 for all when no answer came."""
    status, ctype, body, error = 502, b"application/json", None, b"no answer"
    started = False
    try:
        async with session.post(url, data=key, headers=_JSON) as r:
            status, ctype = r.status, r.headers.get("content-type", "application/json").encode()
            if flight.stream:
                flight.start(status, ctype)
                started = True
                async for chunk in r.content.iter_any():
                    flight.chunk(chunk)
            else:
                body = await r.read()
    except (OSError, aiohttp.ClientError) as exc:
        error = type(exc).__name__.encode()
    finally:
        del flights[key]  # a later request makes a new call
        if body is None and not started:  # no answer: a 502 for all; a stream broken midway just ends
            status, ctype = 502, b"application/json"
            body = b'{"error":{"message":"upstream: %s","type":"bad_gateway"}}' % error
        flight.end(status, ctype, body or b"")


def create_app(upstream: str):
    url = upstream.rstrip("/").removesuffix("/v1") + CHAT_PATH
    flights: dict[bytes, Flight] = {}
    state: dict[str, aiohttp.ClientSession] = {}

    async def answer(send, flight: Flight, role: tuple[bytes, bytes]) -> None:
        status, ctype = await flight.head
        if not flight.stream:
            body = flight.chunks[0]
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", ctype), (b"content-length", b"%d" % len(body)), role]})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype), role]})
        sent = 0
        while True:
            chunks = flight.chunks
            if sent < len(chunks):  # everything new in one write
                body = chunks[sent] if len(chunks) == sent + 1 else b"".join(chunks[sent:])
                sent = len(chunks)
                await send({"type": "http.response.body", "body": body, "more_body": True})
            elif flight.done:
                break
            else:
                await flight.changed
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def plain(send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["session"] = _aiohttp_session(POOL_SIZE)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state.pop("session").close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] == "/health":
            return await plain(send, 200, b"ok")
        if scope["method"] != "POST" or scope["path"] != CHAT_PATH:
            return await plain(send, 404, b"not found")
        message = await receive()
        key = message.get("body", b"")
        if message.get("more_body"):
            parts = [key]
            while message.get("more_body"):
                message = await receive()
                parts.append(message.get("body", b""))
            key = b"".join(parts)
        flight = flights.get(key)
        if flight is not None:
            return await answer(send, flight, _FOLLOWER)
        try:
            stream = orjson.loads(key).get("stream") is True  # only a leader parses the body
        except (orjson.JSONDecodeError, AttributeError):
            return await plain(send, 400, b"the body must be a JSON object")
        flight = flights[key] = Flight(stream)
        flight.task = asyncio.get_running_loop().create_task(relay(state["session"], url, key, flight, flights))
        await answer(send, flight, _LEADER)

    return app


# --------------------------------------------------------------------------- --server raw
#
# The same coalescing without ASGI: an asyncio.Protocol per connection under uvloop, parsed by
# httptools, keep-alive HTTP/1.1, one request at a time per connection (no pipelining: aiohttp,
# the load generator, does not pipeline). A flight holds its subscribers' connections, the
# leader's first; what it answers is rendered once (a leader's and a follower's variant: they
# differ in x-herd only) and written to every subscriber's transport in one loop.


def _head(status: int, ctype: bytes, framing: bytes) -> bytes:
    """A response head up to (not including) its x-herd header; ``framing``: content-length or chunked."""
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b""
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n%s" % (status, reason, ctype, framing)


def _whole(status: int, ctype: bytes, body: bytes, role: bytes = b"") -> bytes:
    return _head(status, ctype, b"content-length: %d\r\n" % len(body)) + role + b"\r\n" + body


class _Conn(asyncio.Protocol):
    """One client connection: httptools calls the on_* methods from ``data_received``."""

    def __init__(self, server: RawFloor) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.keep_alive = False
            self.respond(400, b"bad request")

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        self.server.handle(self, self.parser.get_method(), self.url.partition(b"?")[0], b"".join(self.body))

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():  # the client may have gone
            self.transport.write(data)

    def finish(self) -> None:
        """The answer is complete."""
        if not self.keep_alive:
            self.transport.close()

    def respond(self, status: int, body: bytes) -> None:
        self.write(_whole(status, b"text/plain", body))
        self.finish()


class RawFlight:
    __slots__ = ("conns", "heads", "sent", "stream", "task")

    def __init__(self, stream: bool, leader: _Conn) -> None:
        self.stream = stream
        self.conns = [leader]  # the leader first, then the followers as they come
        self.heads: tuple[bytes, bytes] | None = None  # a stream's (leader's, follower's) head, once known
        self.sent: list[bytes] = []  # a stream's chunks so far (framed), for a follower that comes midway
        self.task: asyncio.Task | None = None

    def join(self, conn: _Conn) -> None:
        self.conns.append(conn)
        if self.heads is not None:  # a stream under way: its head and everything so far, in one write
            conn.write(self.heads[1] + b"".join(self.sent))

    def write(self, leader: bytes, follower: bytes) -> None:
        conns = self.conns
        conns[0].write(leader)
        for i in range(1, len(conns)):
            conns[i].write(follower)

    def start(self, status: int, ctype: bytes) -> None:
        head = _head(status, ctype, b"transfer-encoding: chunked\r\n")
        self.heads = (head + b"x-herd: leader\r\n\r\n", head + b"x-herd: follower\r\n\r\n")
        self.write(*self.heads)

    def chunk(self, data: bytes) -> None:
        if data:  # an empty chunk would end the body
            framed = b"%x\r\n%s\r\n" % (len(data), data)
            self.sent.append(framed)
            self.write(framed, framed)

    def end(self, status: int, ctype: bytes, body: bytes) -> None:
        if self.heads is not None:  # a stream: its last chunk (also when the upstream broke off midway)
            self.write(b"0\r\n\r\n", b"0\r\n\r\n")
        else:
            self.write(_whole(status, ctype, body, b"x-herd: leader\r\n"),
                       _whole(status, ctype, body, b"x-herd: follower\r\n"))
        for conn in self.conns:
            conn.finish()


class RawFloor:
    """The flights and the upstream session of ``--server raw``."""

    def __init__(self, upstream: str) -> None:
        self.url = upstream.rstrip("/").removesuffix("/v1") + CHAT_PATH
        self.flights: dict[bytes, RawFlight] = {}
        self.session: aiohttp.ClientSession | None = None

    def handle(self, conn: _Conn, method: bytes, path: bytes, body: bytes) -> None:
        if method == b"GET" and path == b"/health":
            return conn.respond(200, b"ok")
        if method != b"POST" or path != CHAT_PATH.encode():
            return conn.respond(404, b"not found")
        flight = self.flights.get(body)
        if flight is not None:
            return flight.join(conn)
        try:
            stream = orjson.loads(body).get("stream") is True  # only a leader parses the body
        except (orjson.JSONDecodeError, AttributeError):
            return conn.respond(400, b"the body must be a JSON object")
        flight = self.flights[body] = RawFlight(stream, conn)
        flight.task = asyncio.get_running_loop().create_task(relay(self.session, self.url, body, flight, self.flights))

    async def serve(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.session = _aiohttp_session(POOL_SIZE)
        server = await loop.create_server(lambda: _Conn(self), host, port, backlog=4096)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()
        await self.session.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="upstream base URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--server", choices=("uvicorn", "raw"), default="uvicorn",
                        help="uvicorn: an ASGI app (default); raw: an asyncio.Protocol with httptools, no ASGI")
    args = parser.parse_args(argv)
    if args.server == "raw":
        import uvloop

        uvloop.run(RawFloor(args.upstream).serve(args.host, args.port))
        return

    import uvicorn

    uvicorn.run(create_app(args.upstream), host=args.host, port=args.port, log_level="warning", **UVICORN)


if __name__ == "__main__":
    main()
