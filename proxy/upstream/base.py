"""The one small interface every upstream adapter implements.

An adapter turns an OpenAI chat request into a stream of OpenAI `chat.completion.chunk`s
(whatever the provider speaks), yielded in batches of those that arrived together, and forwards any other API call as it is. Errors are raised
as proxy.errors types: UpstreamError (the upstream's status and body), UpstreamUnavailable
(connect error, reset) or UpstreamTimeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from proxy.chunks import Chunk
from proxy.config import UpstreamConfig
from proxy.errors import NotFound, UpstreamTimeout

T = TypeVar("T")

# Headers that belong to one hop and are never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
    }
)


@dataclass
class ForwardResponse:
    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]
    close: object = None  # an awaitable factory that releases the connection


@dataclass
class CallOptions:
    """Per-call facts an adapter needs besides the body."""

    client_key: str | None = None  # the client's own key, used when the upstream holds none
    headers: dict[str, str] = field(default_factory=dict)


class Upstream:
    kind = "base"

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name

    async def start(self) -> None:
        """Open connection pools; called inside the running event loop."""

    async def aclose(self) -> None:
        """Close connection pools."""

    def chat(self, body: dict, options: CallOptions, stream: bool = True) -> AsyncIterator[list[Chunk]]:
        """The answer to an OpenAI chat request, as OpenAI chunks, in batches: the chunks
        that arrived together (one network read), never an empty batch.

        stream=False: the flight's waiters so far want one JSON body, so the adapter may make
        a non-stream call (cheaper for both sides) and yield its answer split into chunks.
        """
        raise NotImplementedError

    async def forward(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, options: CallOptions
    ) -> ForwardResponse:
        """Forward a non-chat API call (`path` below /v1) unchanged."""
        raise NotFound(f"{method} /v1/{path} is not supported by the {self.kind} upstream {self.name!r}")

    def api_key(self, options: CallOptions) -> str | None:
        return self.cfg.api_key or options.client_key


class Watchdog:
    """First-byte and idle timeouts for one streaming call, with one timer for the whole call.

    `wait(aw)` awaits something from the upstream; if the current limit passes meanwhile,
    the wait is cancelled and raises UpstreamTimeout. `progress(limit)` moves the limit
    after each chunk (a float assignment, not a new timer: chunks are the hot path). Only
    waits are ever cancelled: between them, the caller's own code runs undisturbed.
    """

    def __init__(self, limit_s: float, what: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._what = what
        self.deadline = self._loop.time() + limit_s
        self._waiting = False
        self._fired = False
        self._handle = self._loop.call_at(self.deadline, self._check)

    def progress(self, limit_s: float) -> None:
        self.deadline = self._loop.time() + limit_s

    def _check(self) -> None:
        now = self._loop.time()
        if now < self.deadline:
            self._handle = self._loop.call_at(self.deadline, self._check)
        elif not self._waiting:
            self._handle = self._loop.call_at(now + 0.01, self._check)  # look again once it waits
        else:
            self._fired = True
            self._task.cancel()

    async def wait(self, aw: Awaitable[T]) -> T:
        if self._loop.time() >= self.deadline:
            raise UpstreamTimeout(f"{self._what} did not answer in time")
        self._waiting = True
        try:
            return await aw
        except asyncio.CancelledError:
            if not self._fired:
                raise
            self._fired = False
            self._task.uncancel()
            raise UpstreamTimeout(f"{self._what} did not answer in time") from None
        finally:
            self._waiting = False

    def stop(self) -> None:
        self._handle.cancel()
