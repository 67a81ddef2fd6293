"""A bare Starlette passthrough: the physical floor of herd's stack.

Every ``/v1/*`` request is forwarded to an upstream base URL with one HTTP client, and the
upstream's status, content type and body are streamed back unchanged. Nothing is parsed,
cached or coalesced, so whatever this costs, herd costs at least as much.

    python -m benchmarks.passthrough --upstream http://127.0.0.1:9000 --port 8090 --client aiohttp

Other benchmarks import :func:`create_app` to compare herd with this floor.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import aiohttp
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

ClientName = Literal["aiohttp", "httpx", "httpx-aiohttp"]
CLIENTS: tuple[str, ...] = get_args(ClientName)

POOL_SIZE = 1024
CONNECT_TIMEOUT_S = 10.0
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

# Not forwarded upstream: hop-by-hop headers, headers the client library sets itself, and
# accept-encoding (the body is relayed decoded, so the client negotiates its own encoding).
_DROPPED_REQUEST_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "accept-encoding",
    }
)


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    content_type: str | None
    chunks: AsyncIterator[bytes]


class Upstream(Protocol):
    """One HTTP client library, reduced to what a passthrough needs."""

    def stream(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> contextlib.AbstractAsyncContextManager[UpstreamResponse]: ...

    async def aclose(self) -> None: ...


def _aiohttp_session(pool_size: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=pool_size, limit_per_host=0, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


class AiohttpUpstream:
    def __init__(self, pool_size: int) -> None:
        self._session = _aiohttp_session(pool_size)

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> AsyncIterator[UpstreamResponse]:
        async with self._session.request(method, url, headers=headers, data=body or None) as r:
            yield UpstreamResponse(r.status, r.headers.get("content-type"), r.content.iter_any())

    async def aclose(self) -> None:
        await self._session.close()


class HttpxUpstream:
    """httpx over its own transport (httpcore), or over aiohttp (package httpx-aiohttp)."""

    def __init__(self, pool_size: int, *, over_aiohttp: bool = False) -> None:
        transport: httpx.AsyncBaseTransport | None = None
        if over_aiohttp:
            try:
                from httpx_aiohttp import AiohttpTransport
            except ImportError as exc:  # optional: only the benchmark needs it
                raise ImportError("client 'httpx-aiohttp' needs: pip install httpx-aiohttp") from exc
            transport = AiohttpTransport(client=_aiohttp_session(pool_size))
        self._client = httpx.AsyncClient(
            transport=transport,
            limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
            trust_env=False,
        )

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> AsyncIterator[UpstreamResponse]:
        async with self._client.stream(method, url, headers=headers, content=body) as r:
            yield UpstreamResponse(r.status_code, r.headers.get("content-type"), r.aiter_bytes())

    async def aclose(self) -> None:
        await self._client.aclose()


def open_upstream(client: str, pool_size: int = POOL_SIZE) -> Upstream:
    """Create the client; call from inside the running event loop (aiohttp requires it)."""
    if client == "aiohttp":
        return AiohttpUpstream(pool_size)
    if client == "httpx":
        return HttpxUpstream(pool_size)
    if client == "httpx-aiohttp":
        return HttpxUpstream(pool_size, over_aiohttp=True)
    raise ValueError(f"unknown client {client!r}; expected one of {', '.join(CLIENTS)}")


class _Relay(Response):
    """A response that makes the upstream call when sent, so the upstream response is
    always released when sending ends, normally or not."""

    def __init__(self, upstream: Upstream, method: str, url: str, headers: list[tuple[str, str]], body: bytes):
        self._call = (upstream, method, url, headers, body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upstream, method, url, headers, body = self._call
        async with contextlib.AsyncExitStack() as stack:
            try:
                r = await stack.enter_async_context(upstream.stream(method, url, headers, body))
            except (OSError, aiohttp.ClientError, httpx.TransportError) as exc:
                await _bad_gateway(send, exc)
                return
            raw_headers = [] if r.content_type is None else [(b"content-type", r.content_type.encode("latin-1"))]
            await send({"type": "http.response.start", "status": r.status, "headers": raw_headers})
            async for chunk in r.chunks:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _bad_gateway(send: Send, exc: Exception) -> None:
    body = b'{"error":{"message":"upstream unreachable: %s","type":"bad_gateway"}}' % type(exc).__name__.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 502, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(upstream: str, client: str = "aiohttp", *, pool_size: int = POOL_SIZE) -> Starlette:
    """A Starlette app forwarding ``/v1/*`` to ``upstream`` with ``client``.

    ``upstream`` is a base URL; the request path and query are appended to it. A base that
    already ends in ``/v1`` (the OpenAI SDK convention) is accepted too.
    """
    if client not in CLIENTS:
        raise ValueError(f"unknown client {client!r}; expected one of {', '.join(CLIENTS)}")
    base = upstream.rstrip("/")
    strip = len("/v1") if base.endswith("/v1") else 0
    state: dict[str, Upstream] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["upstream"] = open_upstream(client, pool_size)
        try:
            yield
        finally:
            await state.pop("upstream").aclose()

    async def forward(request: Request) -> Response:
        url = base + request.url.path[strip:]
        if request.url.query:
            url += "?" + request.url.query
        headers = [(k, v) for k, v in request.headers.items() if k not in _DROPPED_REQUEST_HEADERS]
        body = await request.body()
        return _Relay(state["upstream"], request.method, url, headers, body)

    return Starlette(routes=[Route("/v1/{path:path}", forward, methods=METHODS)], lifespan=lifespan)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.passthrough", description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="upstream base URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--client", choices=CLIENTS, default="aiohttp")
    parser.add_argument("--pool-size", type=int, default=POOL_SIZE, help="max upstream connections")
    args = parser.parse_args(argv)

    import uvicorn

    app = create_app(args.upstream, args.client, pool_size=args.pool_size)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
