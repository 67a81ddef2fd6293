"""The one small interface every upstream adapter implements.

An adapter turns an OpenAI chat request into a stream of OpenAI `chat.completion.chunk`s
(whatever the provider speaks), yielded in batches of those that arrived together; makes
the calls of the other protocols it speaks (`call`, with a proxy.apis.base.Wire: the
Responses API, legacy completions); and forwards any other API call as it is. Errors are
raised as proxy.errors types: UpstreamError (the upstream's status and body),
UpstreamUnreachable (could not connect: DNS, refused, TLS), UpstreamUnavailable (reset,
dropped) or UpstreamTimeout (see `connection_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import re
import socket
import ssl
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import yarl

from proxy.chunks import Chunk
from proxy.config import UpstreamConfig
from proxy.errors import InvalidRequest, NotFound, UpstreamTimeout, UpstreamUnavailable, UpstreamUnreachable
from proxy.tasks import this_task

if TYPE_CHECKING:
    from proxy.apis.base import Wire

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
# An upstream response's headers that are not passed on: hop-by-hop ones, the encoding (herd
# relays the decoded body), the date (herd's own server writes one) and the upstream's
# `server` (which names its software, not herd's).
NOT_RELAYED = HOP_BY_HOP | {"content-encoding", "date", "server"}


# A path segment below /v1, after percent-decoding: the characters of every API path, id
# and model name (files/file-abc/content, models/ft:gpt-4o-mini:org::id) and none that a
# URL parser or server reads as structure: no '%' (a second decoding), '\\', ';' (Tomcat's
# '..;'), '?', '#', spaces or control characters. Segments of dots alone are refused too.
_SEGMENT = re.compile(r"[A-Za-z0-9_.~:-]+")
_DOTS = re.compile(r"\.+")
# Query characters kept as the client sent them; anything else (spaces, non-ASCII) is quoted.
_QUERY_SAFE = "!#$%&'()*+,/:;=?@[]~"


# Exceptions (by class name, of aiohttp, httpx and httpcore) raised while connecting: the
# upstream was never reached, so nothing was sent.
_CONNECT_PHASE = {"ClientConnectorError", "ConnectionTimeoutError", "ConnectError", "ConnectTimeout"}


def connection_error(upstream: str, error: BaseException, base_url: str) -> UpstreamUnavailable:
    """`error` (a failure of the connection to `base_url`) as herd's error, in words: the host
    that could not be resolved, refused the connection, failed the TLS handshake or dropped
    it. Walks the exception's causes (aiohttp, httpx and the SDKs wrap the socket's own
    error); never names a Python class, and shows no more of the URL than host and port (a
    URL may hold credentials). A failure to connect at all is an UpstreamUnreachable."""
    url = urllib.parse.urlsplit(base_url)
    host = url.hostname or "?"
    where = f"{host}:{url.port or (443 if url.scheme == 'https' else 80)}"
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    connecting = any(c.__name__ in _CONNECT_PHASE for e in chain for c in type(e).__mro__)
    what = f"the connection to {where} failed"
    if any(isinstance(e, socket.gaierror) or type(e).__name__ == "ClientConnectorDNSError" for e in chain):
        what, connecting = f"could not resolve the host {host!r} (DNS lookup failed)", True
    else:
        for e in reversed(chain):  # the socket's own error first: the wrappers add little
            if isinstance(e, ssl.SSLCertVerificationError):
                why = getattr(e, "verify_message", None) or "invalid"
                what = f"the TLS certificate of {where} could not be verified ({why})"
            elif isinstance(e, ssl.SSLError):
                why = getattr(e, "reason", None) or "TLS error"
                if why == "WRONG_VERSION_NUMBER":
                    why = "it does not speak TLS: http:// rather than https://?"
                what = f"the TLS handshake with {where} failed ({why})"
            elif isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED:
                what = f"{where} refused the connection (is anything listening there?)"
            elif isinstance(e, TimeoutError):
                what = f"connecting to {where} timed out"
            elif isinstance(e, ConnectionResetError):
                what = f"{where} reset the connection"
            elif isinstance(e, OSError) and e.strerror:
                what = f"the connection to {where} failed: {e.strerror.lower()}"
            elif type(e).__name__ in ("ServerDisconnectedError", "RemoteProtocolError"):
                what = f"{where} closed the connection before answering"
            elif type(e).__name__ == "ClientPayloadError":
                what = f"the connection to {where} broke while the answer was coming"
            else:
                continue
            break
    cls = UpstreamUnreachable if connecting else UpstreamUnavailable
    return cls(f"upstream {upstream!r}: {what}")


def forward_path(method: str, path: str) -> str:
    """`path` (the part below /v1, percent-decoded) if it stays below /v1 on any server:
    segments of plain characters, none of them empty, '.' or '..'. Anything else is a 404,
    as OpenAI answers an unknown URL: it is never sent anywhere (invariant 12)."""
    for segment in path.split("/"):
        if not _SEGMENT.fullmatch(segment) or _DOTS.fullmatch(segment):
            raise NotFound(f"Invalid URL ({method} /v1/{path[:200]})", code="unknown_url")
    return path


def url_under(base_url: str, path: str, query: str = "") -> yarl.URL:
    """The URL of `path` (checked by forward_path) under `base_url`, sent exactly as built:
    no URL parser gets to decode or normalize it on the way."""
    base = yarl.URL(base_url.rstrip("/"), encoded=True)
    target = f"{base_url.rstrip('/')}/{path}"
    if query:
        target += "?" + urllib.parse.quote(query, safe=_QUERY_SAFE)
    url = yarl.URL(target, encoded=True)
    below = base.raw_path.rstrip("/") + "/"
    if (url.scheme, url.raw_host, url.port) != (base.scheme, base.raw_host, base.port) or not url.raw_path.startswith(
        below
    ):
        raise NotFound(f"Invalid URL (/v1/{path[:200]})", code="unknown_url")  # never, after forward_path
    return url


@dataclass
class ForwardResponse:
    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]
    close: Callable[[], object] = lambda: None  # releases the connection


@dataclass
class CallOptions:
    """Per-call facts an adapter needs besides the body."""

    client_key: str | None = None  # the client's own key, used when the upstream holds none
    headers: dict[str, str] = field(default_factory=dict)  # sent with every call (OpenAI-Organization, -Project)
    # the client API's own headers, for an upstream that speaks that API (anthropic-version)
    api_headers: dict[str, str] = field(default_factory=dict)


class Upstream:
    kind = "base"

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name

    async def start(self) -> None:
        """Open connection pools; called inside the running event loop."""

    async def aclose(self) -> None:
        """Close connection pools."""

    def chat(self, body: dict, options: CallOptions, stream: bool = True) -> AsyncGenerator[list[Chunk], None]:
        """The answer to an OpenAI chat request, as OpenAI chunks, in batches: the chunks
        that arrived together (one network read), never an empty batch.

        stream=False: the flight's waiters so far want one JSON body, so the adapter may make
        a non-stream call (cheaper for both sides) and yield its answer split into chunks.
        """
        raise NotImplementedError

    def speaks(self, wire: Wire) -> bool:
        """Whether this upstream can answer calls of `wire`'s protocol."""
        return wire.name == "chat"

    async def call(
        self, wire: Wire, body: dict, options: CallOptions, stream: bool = True
    ) -> AsyncGenerator[list[Chunk], None]:
        """The answer to a call of `wire`'s protocol (see proxy.apis.base.Wire), in batches
        of chunks as `chat` yields them. The base speaks chat only; any other protocol is
        a 400 naming this upstream (a fallback that cannot take the request)."""
        if wire.name != "chat":
            raise InvalidRequest(
                f"The {wire.title} is not available on the {self.kind} upstream {self.name!r} of this model's route.",
                param="model", code="unsupported_api",
            )
        async with contextlib.aclosing(self.chat(body, options, stream)) as batches:
            async for batch in batches:
                yield batch

    async def forward(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, options: CallOptions
    ) -> ForwardResponse:
        """Forward a non-chat API call (`path` below /v1) unchanged."""
        raise NotFound(f"{method} /v1/{path} is not supported by the {self.kind} upstream {self.name!r}")

    def api_key(self, options: CallOptions) -> str | None:
        return self.cfg.api_key or options.client_key


class Watchdog:
    """First-byte and idle timeouts for one streaming call, with one timer for the whole call,
    and its total timeout (`total_s`): no limit ever moves past the call's end.

    `wait(aw)` awaits something from the upstream; if the current limit passes meanwhile,
    the wait is cancelled and raises UpstreamTimeout. `progress(limit)` moves the limit
    after each chunk (a float assignment, not a new timer: chunks are the hot path). Only
    waits are ever cancelled: between them, the caller's own code runs undisturbed.
    """

    def __init__(self, limit_s: float, what: str, total_s: float = math.inf) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = this_task()
        self._what = what
        now = self._loop.time()
        self._end = now + total_s  # the call's total timeout: no limit moves past it
        self.deadline = min(now + limit_s, self._end)
        self._waiting = False
        self._fired = False
        self._handle = self._loop.call_at(self.deadline, self._check)

    def progress(self, limit_s: float) -> None:
        deadline = self._loop.time() + limit_s
        self.deadline = deadline if deadline < self._end else self._end

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
