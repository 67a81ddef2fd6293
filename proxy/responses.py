"""How each waiter renders its flight: one JSON body, or an SSE stream.

These are ASGI callables rather than Starlette responses because a waiter must watch its
own client: when the client goes away, only that waiter stops (and releases the flight);
the upstream call goes on for the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import orjson

from proxy.chunks import assemble
from proxy.coalescer import Flight, Ticket
from proxy.errors import DeadlineExceeded, HerdError, as_herd_error

log = logging.getLogger("herd.responses")

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]


async def send_error(send: Send, error: HerdError, extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = error.body_bytes()
    headers = [(b"content-type", error.content_type.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers + list(extra)})
    await send({"type": "http.response.body", "body": body})


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


#: A waiter starts watching its client only once its answer has taken this long: a call that
#: ends sooner is not worth cancelling, and most short answers then cost no watcher task.
WATCH_AFTER_S = 0.5


async def until_disconnect(work: Awaitable[None], receive: Receive, watch_after: float = WATCH_AFTER_S) -> bool:
    """Run `work` in this task until it ends or the client disconnects; True if it ended.

    After `watch_after` seconds a watcher task waits for the disconnect and cancels this
    task; `work` itself runs here, so a request costs one extra task at most.
    """
    loop = asyncio.get_running_loop()
    this = asyncio.current_task()
    gone = False
    watcher: asyncio.Task | None = None

    async def watch() -> None:
        nonlocal gone
        await _wait_disconnect(receive)
        gone = True
        this.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(watch_after, start_watching)
    try:
        await work
    except asyncio.CancelledError:
        if not gone:
            raise
        this.uncancel()
        return False
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()
    return True


class FlightResponse:
    def __init__(
        self,
        ticket: Ticket,
        *,
        stream: bool,
        include_usage: bool,
        deadline: float,
        release: Callable[[Ticket], None],
        on_done: Callable[[FlightResponse], None] | None = None,
        request_id: str = "",
        sampled: bool = False,
    ) -> None:
        self.ticket = ticket
        self.sampled = sampled  # the request asked for a random draw (proxy.sampling)
        self.request_id = request_id
        self.stream = stream
        self.include_usage = include_usage
        self.deadline = deadline  # loop.time() by which this waiter must be answered
        self._release = release
        self._on_done = on_done or (lambda response: None)
        self.error: HerdError | None = None  # the error this waiter was answered with
        self.disconnected = False  # the client went away first
        self.answered_at: float | None = None  # perf_counter() when the whole answer was written

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """herd's own response headers; the upstream is the one that answered, if known."""
        ticket = self.ticket
        flight = ticket.flight
        headers = [
            (b"x-herd", ticket.role.encode()),
            (b"x-herd-flight", flight.public_id.encode()),
            (b"x-herd-upstream", (flight.served_by or "").encode()),
        ]
        if self.request_id:
            headers.append((b"x-request-id", self.request_id.encode()))
        if ticket.score is not None:
            headers.append((b"x-herd-similarity", f"{ticket.score:.4f}".encode()))
        if self.shared_sample:
            headers.append((b"x-herd-shared-sample", b"1"))
        return headers

    @property
    def shared_sample(self) -> bool:
        """A sampled request answered with a draw made for another request (a flight's
        follower, or the cache). A leader's answer is its own fresh draw; whether others
        join it later is not known when its headers go out."""
        return self.sampled and self.ticket.role in ("follower", "cache")

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        try:
            render = self._stream(send) if self.stream else self._json(send)
            self.disconnected = not await until_disconnect(render, receive)
        finally:
            self._release(self.ticket)
            try:
                self._on_done(self)
            except Exception:  # accounting must never break an answer
                log.exception("on_done failed for flight %s", self.ticket.flight.id)

    async def _error(self, send: Send, error: BaseException) -> None:
        self.error = as_herd_error(error, "in a flight")
        await send_error(send, self.error, self.headers)

    async def _json(self, send: Send) -> None:
        flight = self.ticket.flight
        try:
            async with asyncio.timeout_at(self.deadline):
                await flight.wait()
        except TimeoutError:
            return await self._error(send, DeadlineExceeded("the answer did not arrive before this request's deadline"))
        if flight.error is not None:
            return await self._error(send, flight.error)
        body = json_body(flight)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + self.headers,
            }
        )
        await send({"type": "http.response.body", "body": body})
        self.answered_at = time.perf_counter()

    async def _stream(self, send: Send) -> None:
        flight = self.ticket.flight
        batches = aiter(flight.follow())
        started = False
        try:
            async with asyncio.timeout_at(self.deadline):
                first = await anext(batches, None)
                if first is None and flight.error is not None:
                    return await self._error(send, flight.error)  # nothing sent yet: a plain error
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no"),
                        ]
                        + self.headers,
                    }
                )
                started = True
                batch = first
                while batch is not None:
                    # one write for whatever is new: a late joiner's replay, or chunks that came together
                    body = b"".join([c.sse for c in batch if self.include_usage or not c.usage_only])
                    if body:
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                    batch = await anext(batches, None)
        except TimeoutError:
            error = DeadlineExceeded("the stream did not finish before this request's deadline")
            if not started:
                return await self._error(send, error)
            return await self._end_with_error(send, error)
        if flight.error is not None:
            return await self._end_with_error(send, flight.error)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        self.answered_at = time.perf_counter()

    async def _end_with_error(self, send: Send, error: BaseException) -> None:
        """The stream has started: the error goes as a final SSE event, as OpenAI does."""
        self.error = as_herd_error(error, "in a flight")
        body = b"data: " + orjson.dumps(self.error.body()) + b"\n\n"
        await send({"type": "http.response.body", "body": body, "more_body": False})


def json_body(flight: Flight) -> bytes:
    """The non-stream body of a finished flight: the upstream's own, when it sent one, else
    assembled from the chunks; made once per flight."""
    if flight.body is None:
        whole = flight.chunks[0].whole if flight.chunks else None
        flight.body = whole if whole is not None else orjson.dumps(assemble(flight.chunks))
    return flight.body
