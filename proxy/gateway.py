"""The gateway: what herd does with one chat request, without any HTTP.

    request -> route -> scope and keys -> join a flight (exact, normalized, similar)
            -> or lead one: the upstream call runs in the flight's own task

The route layer (proxy.app) parses, authenticates and renders; everything in between
lives here, so it can be driven and tested without a server.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

from proxy.auth import Authenticator, Identity
from proxy.canonical import ChatRequest, digest, assign_keys
from proxy.coalescer import Flight, Group
from proxy.dispatch import Dispatcher
from proxy.config import RouteConfig, Settings
from proxy.errors import InvalidRequest, NotFound
from proxy.metrics import Metrics
from proxy.upstream import CallOptions, Upstream, make_upstream

log = logging.getLogger("herd.gateway")


@dataclass
class Ticket:
    """A waiter's claim on a flight; release it exactly once."""

    flight: Flight
    role: str  # leader | follower | bypass
    upstream: str
    similarity: float | None = None


class Gateway:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.auth = Authenticator(settings.auth, settings)
        self.upstreams: dict[str, Upstream] = {n: make_upstream(c) for n, c in settings.upstreams.items()}
        self.dispatcher = Dispatcher(settings, self.upstreams, self.metrics)
        self.matcher = None  # set by start() in semantic mode
        self.group = Group(index_factory=self._new_index)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()
        if self.settings.coalesce.mode == "semantic":
            self.matcher = self._load_matcher()

    async def aclose(self) -> None:
        await self.group.aclose()
        for upstream in self.upstreams.values():
            await upstream.aclose()
        if self.matcher is not None and getattr(self.matcher, "embedder", None) is not None:
            await self.matcher.embedder.aclose()

    def _load_matcher(self):
        from embeddings.batcher import BatchingEmbedder
        from embeddings.embedder import Embedder
        from proxy.matcher import MatchConfig, Matcher

        cfg = self.settings.coalesce
        embedder = Embedder(model_path=cfg.model_path or None)
        batcher = BatchingEmbedder(embedder, max_batch=cfg.embed_batch, cache_size=cfg.embed_cache)
        return Matcher(batcher, MatchConfig.from_settings(cfg, max_tokens=embedder.max_tokens))

    def _new_index(self):
        from proxy.matcher import SemanticIndex

        return SemanticIndex(self.matcher)

    # -- routing -----------------------------------------------------------------------
    def route(self, model: str) -> tuple[RouteConfig, Upstream]:
        route = self.settings.route_for(model)
        if route is None:
            raise NotFound(f"The model '{model}' does not exist or you do not have access to it.", param="model",
                           code="model_not_found")
        return route, self.upstreams[route.upstream]

    def mode_for(self, header: str | None) -> str:
        mode = (header or self.settings.coalesce.mode).strip().lower()
        if mode not in ("off", "exact", "semantic"):
            raise InvalidRequest(
                f"x-herd-coalesce must be off, exact or semantic, got {header!r}", param="x-herd-coalesce"
            )
        if mode == "semantic" and self.matcher is None:
            return "exact"  # the embedder is loaded only when [coalesce] mode = "semantic"
        return mode

    # -- the data path -----------------------------------------------------------------
    async def submit(self, req: ChatRequest, identity: Identity, mode: str) -> Ticket:
        """Join the flight that answers `req`, or lead a new one. Never waits for a window."""
        route, upstream = self.route(req.model)
        assign_keys(req, identity.tenant, route.upstream)
        options = CallOptions(client_key=identity.client_key)

        async def work(flight: Flight) -> None:
            await self._call(route, req.body, options, flight)

        if mode == "off":
            flight = self.group.lead([req.key], work, shared=False)
            return self._ticket(flight, "bypass", upstream)

        keys = [req.key]
        flight = self.group.get(keys)
        if flight is None and mode == "semantic" and req.final_text is not None:
            keys.append(digest(b"norm", req.group.encode(), self.matcher.normalize(req.final_text).encode()))
            flight = self.group.get(keys[1:])
            if flight is None:
                probe = await self.matcher.probe(req.final_text)
                # The embedding took a moment: an equal request may have started meanwhile.
                flight = self.group.get(keys)
                if flight is None and probe.vector is not None:
                    found = self.group.find_similar(req.group, probe)
                    if found is not None:
                        flight, score = found
                        self.metrics.similarity.observe(score)
                        return self._ticket(self.group.join(flight), "follower", upstream, score)
                if flight is None:
                    flight = self.group.lead(keys, work, group=req.group, probe=probe)
                    return self._ticket(flight, "leader", upstream)
        if flight is not None:
            return self._ticket(self.group.join(flight), "follower", upstream)
        return self._ticket(self.group.lead(keys, work), "leader", upstream)

    def _ticket(self, flight: Flight, role: str, upstream: Upstream, similarity: float | None = None) -> Ticket:
        self.metrics.requests.labels(role).inc()
        return Ticket(flight, role, upstream.name, similarity)

    def release(self, ticket: Ticket) -> None:
        self.group.release(ticket.flight)

    async def _call(self, route: RouteConfig, body: dict, options: CallOptions, flight: Flight) -> None:
        """The one upstream call of a flight: publish each chunk to its waiters."""
        m = self.metrics
        started = time.perf_counter()
        first = True
        try:
            served_by = functools.partial(flight.memo.__setitem__, "upstream")
            async for chunk in self.dispatcher.stream(route, body, options, served_by):
                if first:
                    m.upstream_ttft.labels(route.upstream).observe(time.perf_counter() - started)
                    first = False
                flight.publish(chunk)
        except Exception as e:
            m.upstream_errors.labels(route.upstream, type(e).__name__).inc()
            raise
        finally:
            m.upstream_latency.labels(route.upstream).observe(time.perf_counter() - started)
