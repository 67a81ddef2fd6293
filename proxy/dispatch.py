"""Dispatch: the one upstream call of a flight, through its route.

The gateway hands a flight's request to `Dispatcher.stream`, which picks the route's
upstream and yields OpenAI chunks. `served_by` is told the name of the upstream that
actually answers, before its first chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from proxy.chunks import Chunk
from proxy.config import RouteConfig, Settings
from proxy.metrics import Metrics
from proxy.upstream import CallOptions, Upstream


class Dispatcher:
    def __init__(self, settings: Settings, upstreams: dict[str, Upstream], metrics: Metrics) -> None:
        self.settings = settings
        self.upstreams = upstreams
        self.metrics = metrics

    async def stream(
        self, route: RouteConfig, body: dict, options: CallOptions, served_by: Callable[[str], None]
    ) -> AsyncIterator[Chunk]:
        upstream = self.upstreams[route.upstream]
        if route.model_rewrite:
            body = dict(body, model=route.model_rewrite)
        self.metrics.upstream_calls.labels(upstream.name).inc()
        first = True
        async for chunk in upstream.chat(body, options):
            if first:
                served_by(upstream.name)
                first = False
            yield chunk
