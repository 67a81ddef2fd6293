"""The one small interface every upstream adapter implements.

An adapter turns an OpenAI chat request into a stream of OpenAI `chat.completion.chunk`s
(whatever the provider speaks), and forwards any other API call as it is. Errors are raised
as proxy.errors types: UpstreamError (the upstream's status and body), UpstreamUnavailable
(connect error, reset) or UpstreamTimeout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from proxy.chunks import Chunk
from proxy.config import UpstreamConfig
from proxy.errors import NotFound

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

    def chat(self, body: dict, options: CallOptions) -> AsyncIterator[Chunk]:
        """Stream the answer to an OpenAI chat request as OpenAI chunks."""
        raise NotImplementedError

    async def forward(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, options: CallOptions
    ) -> ForwardResponse:
        """Forward a non-chat API call (`path` below /v1) unchanged."""
        raise NotFound(f"{method} /v1/{path} is not supported by the {self.kind} upstream {self.name!r}")

    def api_key(self, options: CallOptions) -> str | None:
        return self.cfg.api_key or options.client_key
