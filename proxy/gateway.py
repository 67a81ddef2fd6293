"""The gateway: what herd does with one request of any API, without any HTTP.

    request -> route -> scope and keys -> join a flight (exact, normalized, similar)
            -> or lead one: the upstream call runs in the flight's own task
               (with [redis] url, that task first claims the flight across replicas:
               it calls the upstream, or mirrors the flight another replica leads;
               without, or while Redis is down, [server] workers > 1 claims it across
               the node's workers: proxy.node)

The route layer (proxy.app) reads and authenticates; each API's module (proxy.apis)
parses, keys and renders; everything in between lives here, API-neutral (a request is a
proxy.apis.base.ApiRequest), so it can be driven and tested without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from proxy.accounting import Accountant
from proxy.answer import Answer, answer_of
from proxy.apis.base import ApiRequest, digest
from proxy.auth import Authenticator, Identity
from proxy.cache import AnswerCache, MemoryCache, SimilarAnswers
from proxy.chunks import Chunk
from proxy.coalescer import Flight, Group, Ticket
from proxy.config import MODEL_MEMO, RouteConfig, Settings
from proxy.dispatch import Dispatcher
from proxy.errors import HerdError, InvalidRequest, NotFound, UpstreamError
from proxy.metrics import Metrics
from proxy.node import NodeCache, NodeFlights, Worker
from proxy.redis.cache import RedisCache
from proxy.redis.flights import SharedFlights
from proxy.redis.link import Link
from proxy.sampling import distinct
from proxy.sharing import Claim
from proxy.upstream import CallOptions, ForwardResponse, Upstream, make_upstream

if TYPE_CHECKING:
    from proxy.semantic import Matcher

# The interpreter's GIL switch interval in semantic mode: at 5 ms the embedding workers left
# 0.63 ms of idle CPU per request at full load, at 0.1 ms 0.26 ms (benchmarks/SEMANTIC.md).
EMBED_SWITCH_INTERVAL_S = 0.0001
# How long a node's worker keeps a cleanly ended flight followable by its siblings ([server]
# workers > 1, no Redis): a burst whose first request reaches a worker just after another
# worker's flight ended still makes one call (each worker's memory cache is its own).
NODE_LINGER_S = 2.0

log = logging.getLogger("herd.gateway")


@dataclass(frozen=True)
class Plan:
    """What a flight's work needs to know about the request that started it."""

    req: ApiRequest  # its body is the upstream call's, its wire the call's protocol
    route: RouteConfig
    options: CallOptions
    stream: bool  # call the upstream in streaming mode
    read_cache: bool
    store: bool  # keep a clean answer in the cache
    semantic: bool  # match by meaning, not only by key
    ttl: float  # how long the cache keeps its answer


class Gateway:
    def __init__(self, settings: Settings, metrics: Metrics | None = None, *,
                 clock: Callable[[], float] = time.monotonic, worker: Worker | None = None) -> None:
        """`clock` (seconds) is what the caches' TTLs count with; `worker`: this process is one
        of a node's workers (proxy.workers)."""
        self.settings = settings
        self._clock = clock
        self.metrics = metrics or Metrics()
        self.auth = Authenticator(settings.auth, settings)
        self.upstreams: dict[str, Upstream] = {n: make_upstream(c) for n, c in settings.upstreams.items()}
        self.dispatcher = Dispatcher(settings, self.upstreams, self.metrics)
        self.accountant = Accountant(settings.metrics, self.metrics)
        self.matcher: Matcher | None = None  # set by start() in semantic mode
        self._said_no_semantic = False  # a semantic request in another mode is logged once
        self.group = Group(index_factory=self._new_index)
        cache = settings.cache
        # [redis] url: replicas share flights and (by default) the result cache through Redis
        self.redis: Link | None = Link(settings.redis, self.metrics) if settings.redis.url else None
        self.shared: SharedFlights | None = None
        if self.redis is not None and settings.redis.share_flights:
            self.shared = SharedFlights(self.redis, self.group, self.metrics)
        # the workers of a node share flights through Redis while it is up, else through the node
        self.node: NodeFlights | None = None
        if worker is not None and worker.count > 1:
            self.node = NodeFlights(worker, self.group, self.metrics, self.local_metrics)
        self.cache: AnswerCache | None = None
        if cache.enabled:
            memory = MemoryCache(cache.max_bytes, cache.max_entries, clock=clock,
                                 on_evict=self.metrics.cache_evictions.inc)
            self.metrics.cache_bytes.set_function(lambda: memory.nbytes)
            self.metrics.cache_entries.set_function(lambda: len(memory))
            backend = cache.backend if cache.backend != "auto" else ("redis" if self.redis else "memory")
            if backend == "redis" and self.redis:
                self.cache = RedisCache(self.redis, memory)
            elif self.node is not None and settings.server.workers_share:  # a sibling's answer is a hit too
                self.cache = NodeCache(memory, self.node)
            else:
                self.cache = memory
        self.similar: SimilarAnswers | None = None  # semantic cache index, with the matcher
        self._background: set[asyncio.Task] = set()
        # model names come from clients: a bounded memo of the route lookup (not of a 404)
        self.route = functools.lru_cache(maxsize=MODEL_MEMO)(self._route)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()
        if self.redis is not None:
            await self.redis.start()  # down at start is fine: local-only until it answers
        if self.settings.coalesce.mode == "semantic":
            self.matcher = self._load_matcher()
            if self.cache is not None:
                self.similar = SimilarAnswers(self._new_index, self.settings.cache.max_entries, clock=self._clock)
        if self.node is not None:
            await self.node.start()  # last: its socket tells the supervisor this worker is ready

    async def aclose(self) -> None:
        await self.group.aclose()
        if self.node is not None:
            await self.node.aclose()  # after our flights: siblings may follow them until they end
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.shared is not None:
            await self.shared.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        for upstream in self.upstreams.values():
            await upstream.aclose()
        embedder = getattr(self.matcher, "embedder", None)
        if embedder is not None:
            await embedder.aclose()

    def local_metrics(self) -> bytes:
        """This process's metrics, as Prometheus text."""
        self.metrics.flights.set(len(self.group))
        self.metrics.waiters.set(self.group.waiters)
        return self.metrics.render()

    async def metrics_text(self) -> bytes:
        """What /metrics answers: this process's metrics, or the node's (every worker's, summed)."""
        return self.local_metrics() if self.node is None else await self.node.node_metrics()

    def _load_matcher(self):
        from embeddings.batcher import BatchingEmbedder
        from embeddings.embedder import Embedder
        from proxy.semantic import MatchConfig, Matcher

        cfg = self.settings.coalesce
        embedder = Embedder(model_path=cfg.model_path or None, precision=cfg.embed_precision)
        # The embedding workers take the GIL back after each run; a busy event loop keeps it
        # for up to the switch interval (CPython's default 5 ms) while their cores sit idle.
        # Semantic mode only: nothing else in herd runs Python on other threads.
        sys.setswitchinterval(min(sys.getswitchinterval(), EMBED_SWITCH_INTERVAL_S))
        batcher = BatchingEmbedder(
            embedder, max_batch=cfg.embed_batch, cache_size=cfg.embed_cache, on_batch=self.metrics.observe_embedding
        )
        return Matcher(batcher, MatchConfig.from_settings(cfg, max_tokens=embedder.max_tokens))

    def _new_index(self):
        from proxy.semantic import SemanticIndex

        assert self.matcher is not None  # indexes exist in semantic mode only
        return SemanticIndex(self.matcher)

    # -- routing -----------------------------------------------------------------------
    def _route(self, model: str) -> tuple[RouteConfig, Upstream]:
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
            # The embedder is loaded only when [coalesce] mode = "semantic": the request is
            # coalesced exactly, and its response says so (x-herd-coalesce: exact).
            if not self._said_no_semantic:
                self._said_no_semantic = True
                log.warning('x-herd-coalesce: semantic asked while [coalesce] mode = "%s": such requests are '
                            'coalesced exactly (their responses say x-herd-coalesce: exact); set mode = "semantic" '
                            "to load the embedder", self.settings.coalesce.mode)
            return "exact"
        return mode

    # -- the data path -----------------------------------------------------------------
    def submit(
        self, req: ApiRequest, identity: Identity, mode: str, *, read_cache: bool = True, write_cache: bool = True,
        sampled: str | None = None,
    ) -> Ticket:
        """A ticket on the flight that answers `req`: one in progress, or a new one it leads.

        It never suspends: a request joins or starts its flight at once, and everything that
        waits (the cache read, the embedding, the claim across replicas, the upstream call)
        is the flight's own work, done once however many requests join it. The first request
        of a flight starts that work at once: no window.

        `sampled`: the request's own x-herd-sampled policy; a sampled request under
        "distinct" gets a private flight.
        """
        route, upstream = self.route(req.model)
        if not upstream.speaks(req.wire):
            raise InvalidRequest(
                f"The {req.wire.title} is not available for model '{req.model}': its route's upstream "
                f"{upstream.name!r} ({upstream.kind}) does not speak it.", param="model", code="unsupported_api",
            )
        if distinct(req.sampled, sampled, identity.sampled, route.sampled, self.settings.coalesce.sampled):
            mode = "off"  # its own draw: nobody joins it, no cache read or write
        if req.private is not None:
            mode = "off"  # it changes server state or runs in the background: never shared
        req.api.keys(req, identity.tenant, route.upstream)
        cache = self.settings.cache
        plan = Plan(
            req=req,
            route=route,
            options=CallOptions(client_key=identity.client_key, headers=identity.headers,
                                api_headers=req.upstream_headers),
            # A flight led by a non-stream request calls the upstream non-stream ([coalesce]
            # upstream_stream = "auto"); stream requests that join it get the answer when it is done.
            stream=req.stream or self.settings.coalesce.upstream_stream == "always",
            read_cache=read_cache and self.cache is not None and mode != "off",
            store=write_cache and self.cache is not None and mode != "off",
            semantic=mode == "semantic" and req.final_text is not None,
            # sampled answers are kept for their own (shorter) time
            ttl=min(cache.sampled_ttl_seconds, cache.ttl_seconds) if req.sampled else cache.ttl_seconds,
        )
        if mode == "off":
            return self.group.acquire([req.key], functools.partial(self._lead, plan), private=True)
        keys = [req.key]
        if plan.semantic and self.matcher is not None and req.final_text is not None:
            # normalized text, or the text itself when it is over the embedder's window
            merge_key = self.matcher.key(req.final_text)
            keys.append(digest(b"norm", req.group.encode(), merge_key.encode()))
        return self.group.acquire(keys, functools.partial(self._answer, plan))

    async def _answer(self, plan: Plan, flight: Flight) -> None:
        """The work of a flight: a cached answer, a similar flight's, the flight another
        replica leads, or this replica's own upstream call, in that order."""
        flight.served_by = plan.route.upstream
        req, cache = plan.req, self.cache if plan.read_cache else None
        if cache is not None:
            for key in flight.keys:
                if (answer := await cache.get(key)) is not None:
                    return self._replay(flight, answer)
        if plan.semantic and self.matcher is not None and req.final_text is not None:
            probe = await self.matcher.probe(req.final_text)
            if probe.vector is not None:
                flight.probe = probe
                # Find and index without an await between: of two similar flights, one follows.
                if (found := self.group.find_similar(req.group, probe)) is not None:
                    return await self._follow(flight, *found)
                self.group.index(flight, req.group, probe)
                similar = self.similar if cache is not None else None
                hit = similar.best(req.group, probe) if similar is not None else None
                if cache is not None and similar is not None and hit is not None:
                    key, score = hit
                    if (answer := await cache.get(key)) is not None:
                        flight.similarity = score
                        return self._replay(flight, answer)
                    similar.discard(req.group, key)
        if (shared := self._sharing()) is not None:
            return await self._shared_work(shared, plan, flight)
        await self._lead(plan, flight)

    def _sharing(self) -> SharedFlights | NodeFlights | None:
        """What a flight is shared through: the replicas' Redis while it is up, else the
        node's other workers (None: one process without Redis, it leads alone)."""
        shared = self.shared
        if shared is not None and shared.usable:
            return shared
        return self.node if self.settings.server.workers_share else None

    async def _lead(self, plan: Plan, flight: Flight) -> None:
        """Call the upstream for `flight`, and keep a clean answer in the cache."""
        flight.served_by = plan.route.upstream
        await self._call(plan.route, plan.req, plan.options, flight, plan.stream)
        if plan.store:
            self._keep(plan, flight)

    def _replay(self, flight: Flight, answer: Answer) -> None:
        """Answer `flight` from the cache: its waiters write the stored bytes, nothing is rendered again."""
        flight.source = "cache"
        flight.served_by = "cache"
        flight.answer = answer

    async def _follow(self, flight: Flight, other: Flight, score: float) -> None:
        """Answer `flight` with a similar flight's answer: wait on it like any of its waiters."""
        self.metrics.similarity.observe(score)
        flight.source = "follow"
        flight.similarity = score
        ticket = self.group.join(other, score)
        try:
            async for batch in other.follow():
                flight.served_by = other.served_by
                flight.extend(batch)
        finally:
            self.group.release(ticket)
        if other.error is not None:
            raise other.error
        if not flight.chunks and other.answer is not None:  # the other flight was a cache hit
            flight.served_by = other.served_by
            flight.answer = other.answer

    async def _shared_work(self, shared: SharedFlights | NodeFlights, plan: Plan, flight: Flight) -> None:
        """Claim the flight across replicas (or workers): lead it (and publish it), or mirror the one that leads."""
        key = plan.req.key
        claim = await shared.claim(key, flight.id)
        secrets = (plan.options.client_key or "", *(u.cfg.api_key for u in self.upstreams.values()))
        if claim.lead:
            if plan.read_cache and (answer := await self._ended_on_a_sibling(shared, key, flight)) is not None:
                return self._replay(flight, answer)
            shared.lead(key, flight, claim, redact=secrets)
            await self._lead(plan, flight)
            return
        flight.source = "follow"
        flight.shared_id = claim.flight_id

        def on_lead(new: Claim) -> None:
            shared.lead(key, flight, new, redact=secrets)

        call = functools.partial(self._call, plan.route, plan.req, plan.options)
        if shared is self.node:  # a sibling's answer that already ended is a cached one
            fresh = not plan.read_cache or plan.ttl <= 0  # e.g. sampled_ttl_seconds = 0
            called = await self.node.mirror(key, claim, flight, call, plan.stream, on_lead, fresh=fresh)
        else:
            called = await shared.mirror(key, claim, flight, call, plan.stream, on_lead)
        if called and plan.store:
            self._spawn(self._store(plan, flight))

    async def _ended_on_a_sibling(self, shared: SharedFlights | NodeFlights, key: str, flight: Flight) -> Answer | None:
        """After winning a node claim: the answer of a sibling's flight for `key` that ended
        between this worker's cache read and its claim (the sibling keeps the answer before it
        frees the slot), so the request is not a second upstream call. Found: the claim is
        given back (this flight is answered from the cache, there is nothing to follow)."""
        cache, node = self.cache, self.node
        if shared is not node or node is None or not isinstance(cache, NodeCache):
            return None
        answer = await cache.from_sibling(key)
        if answer is not None:
            node.table.release(key, flight.id)
        return answer

    async def _store(self, plan: Plan, flight: Flight) -> None:
        """Keep a cleanly finished flight's answer for later identical (or similar) requests."""
        await flight.wait()
        if flight.error is None:
            self._keep(plan, flight)

    def _keep(self, plan: Plan, flight: Flight) -> None:
        """Keep the answer of `flight`, whose upstream call ended cleanly, for later identical
        (or similar) requests. Called as the call ends, with no await before the flight
        finishes: the memory cache keeps it at once, without a task per flight; a cache that
        suspends (Redis) writes in a task of its own, so the waiters never wait for it."""
        ttl, cache = plan.ttl, self.cache
        if ttl <= 0 or cache is None or not plan.req.wire.cacheable(flight.chunks):
            return
        answer = answer_of(flight, plan.req.api.assemble)  # the bytes its waiters write, rendered once
        if isinstance(cache, (MemoryCache, NodeCache)):
            for key in flight.keys:
                cache.keep(key, answer, ttl)
        else:
            self._spawn(_put(cache, flight.keys, answer, ttl))
        probe = flight.probe
        if self.similar is not None and probe is not None and probe.vector is not None and flight.group is not None:
            self.similar.add(flight.group, flight.keys[0], probe, ttl)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    # -- calls herd does not coalesce ---------------------------------------------------
    async def forward(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, identity: Identity,
        api_headers: dict[str, str] | None = None,
    ) -> tuple[str, ForwardResponse]:
        """(upstream name, its answer) for a forwarded call (`path` below /v1, checked): to the
        upstream of the model a JSON body names, else the first route's, through the
        dispatcher (breaker, rate limits, retries for idempotent methods, metrics).
        `api_headers`: the client API's own headers (anthropic-version), for an upstream that speaks it."""
        model = None
        if body and headers.get("content-type", "").startswith("application/json"):
            with contextlib.suppress(orjson.JSONDecodeError):
                parsed = orjson.loads(body)
                model = parsed.get("model") if isinstance(parsed, dict) else None
        name = self.route(model)[1].name if isinstance(model, str) else self.settings.routes[0].upstream
        options = CallOptions(client_key=identity.client_key, headers=identity.headers, api_headers=api_headers or {})
        return name, await self.dispatcher.forward(name, method, path, query, headers, body, options)

    async def list_models(self, identity: Identity) -> list[dict]:
        """Every upstream's models, merged by id (the first upstream's entry wins); an error
        only when no upstream answered with any."""
        options = CallOptions(client_key=identity.client_key, headers=identity.headers)
        seen: dict[str, dict] = {}
        last_error: HerdError | None = None
        for name in self.upstreams:
            try:
                resp = await self.dispatcher.forward(name, "GET", "models", "", {}, b"", options)
                try:
                    raw = b"".join([part async for part in resp.body])
                finally:
                    resp.close()
            except HerdError as e:
                last_error = e
                continue
            if resp.status >= 400:
                last_error = UpstreamError(resp.status, raw, upstream=name)
                continue
            with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError, KeyError):
                for item in orjson.loads(raw).get("data", []):
                    seen.setdefault(item["id"], item)
        if not seen and last_error is not None:
            raise last_error
        return list(seen.values())

    def release(self, ticket: Ticket) -> None:
        self.group.release(ticket)

    async def _call(
        self, route: RouteConfig, req: ApiRequest, options: CallOptions, flight: Flight, stream: bool = True
    ) -> None:
        """The one upstream call of a flight: publish each chunk to its waiters."""
        m = self.metrics
        started = time.perf_counter()
        first = True
        try:
            def served_by(name: str) -> None:
                flight.served_by = name

            async for batch in self.dispatcher.stream(route, req.body, options, served_by, stream, req.wire):
                if first:
                    # after a fallback, the upstream that answered is not the route's primary
                    answered = flight.served_by or route.upstream
                    m.upstream_ttft.labels(answered).observe(time.perf_counter() - started)
                    first = False
                flight.extend(batch)
        except Exception as e:
            if not isinstance(e, InvalidRequest):  # refused by herd before any call: the client's error
                m.upstream_errors.labels(route.upstream, type(e).__name__).inc()
            raise
        finally:
            answered = flight.served_by or route.upstream
            m.upstream_latency.labels(answered).observe(time.perf_counter() - started)



    # -- embeddings: one flight per input (proxy.apis.embeddings) -----------------------
    def embed(self, req, identity: Identity, mode: str, *, read_cache: bool = True,
               write_cache: bool = True) -> tuple[dict[str, Ticket], EmbedBatch | None]:
        """Tickets on one flight per distinct input of `req` (joined when in flight), and the
        batch that answers the inputs this request leads. Never suspends."""
        from proxy.apis.embeddings import EMBEDDINGS_WIRE, assign_keys

        route, upstream = self.route(req.model)
        if not upstream.speaks(EMBEDDINGS_WIRE):
            raise InvalidRequest(
                f"The {EMBEDDINGS_WIRE.title} is not available for model '{req.model}': its route's upstream "
                f"{upstream.name!r} ({upstream.kind}) does not speak it.", param="model", code="unsupported_api",
            )
        assign_keys(req, identity.tenant, route.upstream)
        private = mode == "off"
        batch = EmbedBatch()
        tickets: dict[str, Ticket] = {}
        for key, item in zip(req.keys, req.inputs, strict=True):
            if key in tickets:
                continue
            ticket = self.group.acquire([key], functools.partial(_embed_input, batch, key), private=private)
            if ticket.leads:
                batch.items[key] = item
                batch.flights[key] = ticket.flight
                batch.ready[key] = asyncio.Event()
                batch.live += 1
            tickets[key] = ticket
        if not batch.items:
            return tickets, None
        options = CallOptions(client_key=identity.client_key, headers=identity.headers)
        use_cache = self.cache is not None and not private
        batch.shared = not private
        batch.task = asyncio.get_running_loop().create_task(self._embed_batch(
            batch, route, options, req, read_cache and use_cache, write_cache and use_cache))
        return tickets, batch

    async def _embed_batch(self, batch: EmbedBatch, route: RouteConfig, options: CallOptions, req,
                           read_cache: bool, store: bool) -> None:
        """Cached inputs from the cache; the rest in one upstream call (_embed_call)."""
        try:
            missing = []
            cache = self.cache
            for key in batch.items:
                answer = await cache.get(key) if read_cache and cache is not None else None
                if answer is not None:
                    batch.results[key] = answer
                    batch.cached.add(key)
                else:
                    missing.append(key)
            if missing:
                shared = self._sharing()
                if shared is not None and batch.shared:
                    await self._embed_shared(shared, batch, missing, route, options, req, read_cache, store)
                else:
                    await self._embed_missing(batch, missing, route, options, req, store)
        except Exception as e:
            for key in batch.items:
                batch.results.setdefault(key, e)
        finally:
            batch.settle(batch.items)

    async def _embed_missing(self, batch: EmbedBatch, missing: list[str], route: RouteConfig, options: CallOptions,
                             req, store: bool) -> None:
        """`missing` inputs in one upstream call; when it is refused for what it asked, each alone."""
        try:
            await self._embed_call(batch, missing, route, options, req, store)
        except HerdError as e:
            if len(missing) == 1 or not (400 <= e.status < 500 and e.status not in (401, 403, 408, 429)):
                raise
            # The call was refused for what it asked (one bad input, most likely): one input's
            # fault must not fail the others, or another request that joined one of them.
            # Each goes alone.
            alone = await asyncio.gather(*[self._embed_call(batch, [key], route, options, req, store)
                                           for key in missing], return_exceptions=True)
            for key, outcome in zip(missing, alone, strict=True):
                if isinstance(outcome, BaseException):
                    batch.results[key] = outcome

    async def _embed_shared(self, shared: SharedFlights | NodeFlights, batch: EmbedBatch, missing: list[str],
                            route: RouteConfig, options: CallOptions, req, read_cache: bool, store: bool) -> None:
        """`missing` inputs across replicas ([redis] share_flights) or a node's workers: each input's flight is
        claimed (one pipeline for all); the ones this replica wins go upstream in one call and
        are published (one chunk each: the input's entry), the others are mirrored from the
        replica that leads them, with chat's takeover rules (SharedFlights.mirror)."""
        claims = await shared.claim_many([(key, batch.flights[key].id) for key in missing])
        secrets = (options.client_key or "", *(u.cfg.api_key for u in self.upstreams.values()))
        for key, claim in zip(missing, claims, strict=True):
            if claim.lead and read_cache and \
                    (answer := await self._ended_on_a_sibling(shared, key, batch.flights[key])) is not None:
                batch.results[key] = answer  # nothing to lead, and nothing to follow
                batch.cached.add(key)
                batch.settle([key])
        won = [key for key, claim in zip(missing, claims, strict=True) if claim.lead and key not in batch.cached]
        for key, claim in zip(missing, claims, strict=True):
            if claim.lead and key not in batch.cached:
                batch.flights[key].served_by = route.upstream
                shared.lead(key, batch.flights[key], claim, redact=secrets)

        async def lead() -> None:
            try:
                await self._embed_missing(batch, won, route, options, req, store)
            except Exception as e:
                for key in won:
                    batch.results.setdefault(key, e)
            for key in won:
                if isinstance(answer := batch.results.get(key), Answer):
                    batch.flights[key].publish(_entry_chunk(answer.body))  # for the replicas that mirror it
            # Their flights end now, not when the mirrors below do: a replica mirroring one of
            # them may itself be leading an input that one of our mirrors waits for.
            batch.settle(won)

        mirrors = [self._embed_mirror(shared, batch, key, claim, route, options, req, store, secrets)
                   for key, claim in zip(missing, claims, strict=True) if not claim.lead]
        await asyncio.gather(*([lead()] if won else []), *mirrors)

    async def _embed_mirror(self, shared: SharedFlights | NodeFlights, batch: EmbedBatch, key: str, claim: Claim,
                            route: RouteConfig, options: CallOptions, req, store: bool,
                            secrets: tuple[str, ...]) -> None:
        """One input another replica leads: its answer from Redis, or, if that replica (or
        Redis) is lost before it answers, from an upstream call of this replica's own."""
        flight = batch.flights[key]
        flight.source = "follow"
        flight.shared_id = claim.flight_id

        async def call(sink, stream: bool) -> None:
            await self._embed_call(batch, [key], route, options, req, store)
            flight.source = "upstream"
            sink.served_by = route.upstream
            sink.publish(_entry_chunk(batch.results[key].body))  # type: ignore[union-attr]

        def on_lead(new: Claim) -> None:
            shared.lead(key, flight, new, redact=secrets)

        try:
            await shared.mirror(key, claim, flight, call, False, on_lead)
            if not flight.chunks:
                raise UpstreamError(502, b"", upstream=route.upstream)
            batch.results[key] = Answer(b"", b"", flight.chunks[0].raw)
        except Exception as e:
            batch.results[key] = e
        batch.settle([key])

    async def _embed_call(self, batch: EmbedBatch, keys: list[str], route: RouteConfig, options: CallOptions, req,
                          store: bool) -> None:
        """One upstream call for `keys`' inputs; each input's vector kept as the upstream wrote
        it, with its share of the call's tokens (proxy.apis.embeddings), and cached."""
        from proxy.apis.embeddings import EMBEDDINGS_WIRE, entry, shares, vectors

        inputs = [batch.items[key] for key in keys]
        raw = b""
        started = time.perf_counter()
        async for chunks in self.dispatcher.stream(route, {**req.body, "input": inputs}, options, lambda name: None,
                                                   False, EMBEDDINGS_WIRE):
            raw = chunks[0].whole or raw
        self.metrics.upstream_latency.labels(route.upstream).observe(time.perf_counter() - started)
        found, model, total = vectors(raw, route.upstream, len(keys))
        weights = [len(item) if isinstance(item, list) else self.dispatcher.tokens.count_text(item, req.model)
                   for item in inputs]
        ttl = self.settings.cache.ttl_seconds
        for key, vector, tokens in zip(keys, found, shares(total, weights), strict=True):
            answer = Answer(b"", b"", entry(vector, tokens, model or req.model))
            batch.results[key] = answer
            if store and self.cache is not None and ttl > 0:
                self._spawn(self.cache.put(key, answer, ttl))

    async def embedded(self, req, tickets: dict[str, Ticket]) -> Embedded:
        """Wait for every input's flight and reassemble the answer in the client's order."""
        from proxy.apis.embeddings import read_entry, render

        try:
            for ticket in tickets.values():
                await ticket.flight.wait()
            entries = []
            for key in req.keys:
                flight = tickets[key].flight
                if flight.error is not None:
                    raise flight.error
                entries.append(flight.answer.body)
        finally:
            for ticket in tickets.values():
                self.group.release(ticket)
        roles = [t.role for t in tickets.values()]
        counts = {"upstream": 0, "joined": 0, "cache": 0}
        for ticket in tickets.values():
            # an input mirrored from another replica was joined there
            kind = ("cache" if ticket.role == "cache" else
                    "upstream" if ticket.leads and ticket.flight.source != "follow" else "joined")
            counts[kind] += 1
        if all(r == "bypass" for r in roles):
            role = "bypass"
        elif all(r == "cache" for r in roles):
            role = "cache"
        elif "leader" in roles:
            role = "leader"
        else:
            role = "follower"
        model = read_entry(entries[0])[2]
        return Embedded(render(entries, model), role, counts)


async def _put(cache: AnswerCache, keys: tuple[str, ...], answer: Answer, ttl: float) -> None:
    for key in keys:
        await cache.put(key, answer, ttl)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background task failed: %s", type(task.exception()).__name__, exc_info=task.exception())


# -- embeddings: one flight per input ------------------------------------------------------


@dataclass(eq=False)
class EmbedBatch:
    """The inputs of one embeddings request that nobody had in flight: looked up in the
    cache, and the rest embedded in one upstream call. Each input's own flight waits on it."""

    items: dict[str, Any] = field(default_factory=dict)  # key -> input, in the request's order
    flights: dict[str, Flight] = field(default_factory=dict)  # key -> its flight
    results: dict[str, Answer | BaseException] = field(default_factory=dict)
    ready: dict[str, asyncio.Event] = field(default_factory=dict)  # key -> set once its result is final
    cached: set[str] = field(default_factory=set)
    task: asyncio.Task | None = None
    live: int = 0  # flights still waiting on it; the last to leave cancels the call
    shared: bool = False  # its flights may be shared across replicas (not private ones)

    def settle(self, keys: Iterable[str]) -> None:
        """End the flights of `keys`: their results are final (a missing one is an error)."""
        for key in keys:
            self.ready[key].set()


def _entry_chunk(entry: bytes) -> Chunk:
    """An input's answer as a shared flight's one chunk: the entry's bytes as they are."""
    return Chunk({}, entry)


@dataclass
class Embedded:
    """An embeddings request's answer: the body, and what each distinct input was."""

    body: bytes
    role: str  # x-herd: leader (it called the upstream for some input), follower, cache, bypass
    counts: dict[str, int]  # upstream / joined / cache: distinct inputs of each kind


async def _embed_input(batch: EmbedBatch, key: str, flight: Flight) -> None:
    """The work of one input's flight: its share of the batch."""
    try:
        await batch.ready[key].wait()
    except asyncio.CancelledError:
        if batch.live == 1 and batch.task is not None:
            batch.task.cancel()  # every flight of the batch is gone: so is the call
        raise
    finally:
        batch.live -= 1
    result = batch.results.get(key)
    if result is None:
        raise RuntimeError("an input of an embeddings batch got no answer")
    if isinstance(result, BaseException):
        raise result
    if key in batch.cached:
        flight.source = "cache"
    flight.answer = result







