"""How each waiter renders its flight: one JSON body, or an SSE stream.

These are ASGI callables rather than Starlette responses because a waiter must watch its
own client: when the client goes away, only that waiter stops (and releases the flight);
the upstream call goes on for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from proxy.answer import Stream, json_body, stream_of
from proxy.apis.base import Api, ApiRequest
from proxy.coalescer import Ticket
from proxy.errors import DeadlineExceeded, HerdError, InvalidRequest, ShuttingDown, as_herd_error
from proxy.tasks import this_task

log = logging.getLogger("herd.responses")

Message = MutableMapping[str, Any]  # an ASGI message (what Starlette calls it)
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]


async def send_error(
    send: Send, error: HerdError, extra: Sequence[tuple[bytes, bytes]] = (), api: Api | None = None
) -> None:
    """An error answered before anything else was sent, in `api`'s shape (OpenAI's by default)."""
    body, content_type = api.error_body(error) if api is not None else (error.body_bytes(), error.content_type)
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers + list(extra)})
    await send({"type": "http.response.body", "body": body})


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


#: A waiter starts watching its client only once its answer has taken this long: a call that
#: ends sooner is not worth cancelling, and most short answers then cost no watcher task.
WATCH_AFTER_S = 0.5


async def until_disconnect(
    work: Awaitable[None], receive: Receive, watch_after: float = WATCH_AFTER_S, *,
    deadline: float | None = None, on_deadline: Callable[[], bool] | None = None,
) -> bool:
    """Run `work` in this task until it ends or the client disconnects; True if it ended.

    After `watch_after` seconds a watcher task waits for the disconnect and cancels this
    task; `work` itself runs here, so a request costs one extra task at most.

    `deadline` (loop time): then this task is cancelled if `on_deadline()` says so; `work`
    tells that cancellation from others by what `on_deadline` recorded (FlightResponse).
    The same timer does both jobs: the deadline's is only armed once the watcher starts,
    so an answer that ends within `watch_after` costs one timer, not one per job.
    """
    loop = asyncio.get_running_loop()
    this = this_task()
    gone = False
    watcher: asyncio.Task | None = None

    async def watch() -> None:
        nonlocal gone
        await _wait_disconnect(receive)
        gone = True
        this.cancel()

    def expire() -> None:
        if on_deadline is None or on_deadline():
            this.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())
        if deadline is not None:
            timer[0] = loop.call_at(deadline, expire)

    first = loop.time() + watch_after
    # The timer is kept in a list emptied at the end (no closure refers to itself or to a
    # variable holding its own handle): a reference cycle here kept every request's
    # objects (its flight, body, response) for the collector, ~30% more CPU at saturation.
    if deadline is None or first < deadline:
        timer = [loop.call_at(first, start_watching)]
    else:
        timer = [loop.call_at(deadline, expire)]
    try:
        await work
    except asyncio.CancelledError:
        if not gone:
            raise
        this.uncancel()
        return False
    finally:
        timer.pop().cancel()
        if watcher is not None:
            watcher.cancel()
    return True


#: The most bytes one write hands the server for one client. The server holds at most its own
#: high-water mark of unsent bytes (64 KiB in uvicorn on uvloop or asyncio) before `send` waits
#: for the client to read, so what herd keeps for a client that does not read stays under that
#: plus one piece: never a whole answer, whatever its size.
WRITE_PIECE = 16 * 1024
#: After its deadline, a waiter's client gets this long to take its error; then it is dropped.
ERROR_GRACE_S = 1.0
_NO_LINGER = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def shutting_down() -> ShuttingDown:
    return ShuttingDown("herd is shutting down and this request did not finish within its grace period; retry it")


async def drop_connection(send: Send) -> None:
    """Close the client's connection at once, discarding whatever it has not read.

    ASGI has no way to say this; uvicorn's `send` is a method of an object holding the
    connection's transport. `abort()` frees the transport's unsent bytes now (`close()` would
    keep them until the client reads them, which a client that does not read never does),
    and a zero linger makes the kernel reset the connection rather than keep sending what
    it holds. On another server the response is left unfinished, which makes it close.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
    transport.abort()
    await asyncio.sleep(0)  # the server sees the connection lost before this response ends


class FlightResponse:
    """One waiter's answer: the flight's bytes (rendered once for all its waiters, proxy.answer),
    written in pieces of at most WRITE_PIECE, each only once the client has taken the earlier
    ones. Everything happens before the waiter's deadline; a client still not reading then is
    given ERROR_GRACE_S to take its error, then dropped."""

    def __init__(
        self,
        ticket: Ticket,
        req: ApiRequest,
        *,
        deadline: float,
        release: Callable[[Ticket], None],
        on_done: Callable[[FlightResponse], None] | None = None,
        request_id: str = "",
        on_cut: Callable[[], None] | None = None,
        coalesce: str = "",
    ) -> None:
        self.ticket = ticket
        self.coalesce = coalesce  # the policy applied, said in x-herd-coalesce when the request asked for one
        self.req = req  # what the waiter asked
        self.api = req.api  # its API, whose shapes the answer and errors take
        self.sampled = req.sampled  # the request asked for a random draw (proxy.sampling)
        self.request_id = request_id
        self.stream = req.stream
        self.include_usage = req.include_usage
        self.deadline = deadline  # loop.time() by which this waiter must be answered
        self._release = release
        self._on_done = on_done or (lambda response: None)
        self._on_cut = on_cut or (lambda: None)
        self.error: HerdError | None = None  # the error this waiter was answered with
        self.disconnected = False  # the client went away first
        self.started = False  # the response's status and headers have gone out
        self.cut = False  # herd dropped the connection: the client did not read in time
        self.expired = False  # the deadline passed before the answer was written
        self._answering = False  # the answer (not an error) is being waited for or written
        self.answered_at: float | None = None  # perf_counter() when the whole answer was written

    @property
    def role(self) -> str:
        """How this request was served: its ticket's role, or "none" when herd refused the
        request itself before any upstream call (a prompt over the context window, say)."""
        return "none" if isinstance(self.error, InvalidRequest) else self.ticket.role

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """herd's own response headers; the upstream is the one that answered, if known."""
        ticket = self.ticket
        flight = ticket.flight
        role = self.role
        headers = [(b"x-herd", role.encode()), (b"x-herd-flight", flight.public_id.encode())]
        if role != "none":
            headers.append((b"x-herd-upstream", (flight.served_by or "").encode()))
        if self.request_id:
            headers.append((b"x-request-id", self.request_id.encode()))
        if ticket.score is not None:
            headers.append((b"x-herd-similarity", f"{ticket.score:.4f}".encode()))
        if self.shared_sample:
            headers.append((b"x-herd-shared-sample", b"1"))
        if self.coalesce:
            headers.append((b"x-herd-coalesce", self.coalesce.encode()))
        return headers

    @property
    def shared_sample(self) -> bool:
        """A sampled request answered with a draw made for another request (a flight's
        follower, or the cache). A leader's answer is its own fresh draw; whether others
        join it later is not known when its headers go out."""
        return self.sampled and self.ticket.role in ("follower", "cache")

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        try:
            try:
                self.disconnected = not await until_disconnect(
                    self._answer(send), receive, deadline=self.deadline, on_deadline=self._expire
                )
            except asyncio.CancelledError:
                # Not the client leaving (until_disconnect returns for that): the server gave up
                # on this request, its shutdown grace over. Its client still gets a proper end.
                this_task().uncancel()
                await self._fail(send, shutting_down())
        finally:
            self._release(self.ticket)
            try:
                self._on_done(self)
            except Exception:  # accounting must never break an answer
                log.exception("on_done failed for flight %s", self.ticket.flight.id)

    def _expire(self) -> bool:
        """The deadline passed (until_disconnect's timer): cut the answer if it is still being
        written (not an error answer: that has its own grace); the cancellation that follows is
        the deadline's."""
        self.expired = self._answering
        return self.expired

    async def _answer(self, send: Send) -> None:
        self._answering = True
        try:
            error = await (self._stream(send) if self.stream else self._json(send))
        except asyncio.CancelledError:
            if not self.expired:
                raise
            this_task().uncancel()
            error = DeadlineExceeded("the answer did not arrive before this request's deadline")
        finally:
            self._answering = False
        if error is not None:
            await self._fail(send, error)

    async def _fail(self, send: Send, error: BaseException) -> None:
        """Answer with `error`: an error response, or a final SSE event once a stream has started
        (a JSON body that has started cannot take one). A client that does not take it within
        ERROR_GRACE_S is dropped."""
        self.error = as_herd_error(error, "in a flight")
        try:
            async with asyncio.timeout(ERROR_GRACE_S):
                if not self.started:
                    return await send_error(send, self.error, self.headers, self.api)
                if self.stream:
                    body = self.api.stream_error(self.error)  # a final event, in the API's shape
                    return await send({"type": "http.response.body", "body": body, "more_body": False})
        except TimeoutError:
            pass
        self.cut = True
        self._on_cut()
        await drop_connection(send)

    async def _start(self, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers + self.headers})
        self.started = True

    async def _write(self, send: Send, data: bytes) -> None:
        """`data` in pieces of at most WRITE_PIECE (views, not copies); each waits for the
        client to have taken enough of the earlier ones."""
        if len(data) <= WRITE_PIECE:
            return await send({"type": "http.response.body", "body": data, "more_body": True})
        view = memoryview(data)
        for at in range(0, len(data), WRITE_PIECE):
            await send({"type": "http.response.body", "body": view[at : at + WRITE_PIECE], "more_body": True})

    async def _json(self, send: Send) -> BaseException | None:
        flight = self.ticket.flight
        await flight.wait()
        if flight.error is not None:
            return flight.error
        body = json_body(flight, self.api.assemble)
        await self._start(send, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())])
        if len(body) > WRITE_PIECE:
            await self._write(send, body)
            body = b""
        await send({"type": "http.response.body", "body": body, "more_body": False})
        self.answered_at = time.perf_counter()
        return None

    async def _stream(self, send: Send) -> BaseException | None:
        flight = self.ticket.flight
        while not flight.chunks and not flight.done:
            await flight.changed()
        sse = stream_of(flight)
        if not sse.parts and flight.error is not None:
            return flight.error  # nothing sent yet: a plain error
        await self._start(send, SSE_HEADERS)
        written = 0  # parts of `sse` this waiter has written (a late joiner starts at the first)
        rewinds = flight.rewinds
        while True:
            if flight.rewinds != rewinds:  # the answer started over (a takeover's differs)
                if written:
                    return flight.rewound  # never a splice of two answers
                rewinds, sse = flight.rewinds, stream_of(flight)
            if written < len(sse.parts):
                written = await self._write_parts(send, sse, written)
            elif flight.done:
                break
            else:
                await flight.changed()
            sse = stream_of(flight)  # the chunks published meanwhile, rendered once for every waiter
        if flight.error is not None:
            return flight.error
        await send({"type": "http.response.body", "body": self.api.stream_end, "more_body": False})
        self.answered_at = time.perf_counter()
        return None

    async def _write_parts(self, send: Send, sse: Stream, i: int) -> int:
        """Write sse.parts[i:] (usage-only ones only if asked for); small consecutive parts go
        together, up to WRITE_PIECE. Returns how many parts are written."""
        parts, end = sse.parts, len(sse.parts)
        while i < end:
            j, size = i, 0
            while j < end and (j == i or size + len(parts[j]) <= WRITE_PIECE):
                size += len(parts[j])
                j += 1
            wanted = [parts[k] for k in range(i, j) if self.include_usage or k not in sse.usage]
            if len(wanted) == 1:
                await self._write(send, wanted[0])
            elif wanted:
                await self._write(send, b"".join(wanted))
            i = j
        return i
