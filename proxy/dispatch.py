"""Dispatch: the one upstream call of a flight, and everything that protects it.

Every waiter of a flight depends on this call, so `Dispatcher.stream` gives it every chance
(it yields the answer's chunks in batches, as the adapter does):

    pre-flight   count the prompt's tokens; over the model's context window -> 400 at once
    per try      circuit breaker (an open circuit: fall back at once, or, on the last upstream
                 of the plan, wait out a blip's cool-down and the probe's verdict, up to
                 backoff_max_s; an upstream that is down: 503) -> rate limits (wait, or 429)
                 -> the adapter's call
                 (its own timeouts; a vLLM backend's capacity queue)
    retries      retryable failures only, with backoff and full jitter, honouring Retry-After,
                 and never once a chunk has gone to the flight
    fallbacks    the route's `fallbacks`, in order, each with its own model name and its own
                 retries, when the primary still fails or is shut off (circuit, rate, capacity)

`served_by` is told the name of the upstream that answers, just before its first chunk.
`stream=False` lets the adapter make a non-stream call (see Upstream.chat); `wire` is the
protocol of the call (chat, the Responses API, legacy completions: proxy.apis).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import orjson

from proxy.apis.base import Wire
from proxy.apis.chat import CHAT_WIRE
from proxy.chunks import Chunk
from proxy.config import RouteConfig, Settings
from proxy.errors import (
    HerdError,
    InvalidRequest,
    Overloaded,
    UpstreamError,
    is_retryable,
    redact,
    retry_headers,
)
from proxy.metrics import Metrics
from proxy.resilience import CircuitBreaker, Guard, RateLimited, counts_against_circuit
from proxy.tokens import TokenCount, TokenCounter
from proxy.upstream import CallOptions, ForwardResponse, Upstream

log = logging.getLogger("herd.dispatch")

# Prompts with more text than this are counted in a thread, off the event loop.
COUNT_INLINE_MAX_CHARS = 50_000
# Methods a forwarded call may be retried with: doing them twice is doing them once.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
CIRCUIT_GAUGE = {
    CircuitBreaker.CLOSED: 0,
    CircuitBreaker.HALF_OPEN: 1,
    CircuitBreaker.OPEN: 2,
}


def may_fall_back(error: HerdError) -> bool:
    """A failure another upstream might not have: it failed after its retries, or herd shut it off."""
    return isinstance(error, (Overloaded, RateLimited)) or is_retryable(error)


class Dispatcher:
    def __init__(self, settings: Settings, upstreams: dict[str, Upstream], metrics: Metrics) -> None:
        self.settings = settings
        self.upstreams = upstreams
        self.metrics = metrics
        self.guards = {name: Guard(upstream.cfg) for name, upstream in upstreams.items()}
        self.tokens = TokenCounter(settings.tokens)
        self.secrets = tuple(v for u in upstreams.values() for v in (u.cfg.api_key, *u.cfg.headers.values()))
        self._watch_gauges()

    def _watch_gauges(self) -> None:
        m = self.metrics
        for name, guard in self.guards.items():
            m.circuit_state.labels(name).set_function(functools.partial(_circuit_gauge, guard.circuit))
            capacity = getattr(self.upstreams[name], "capacity", None)
            if capacity is not None:
                m.concurrency_limit.labels(name).set_function(functools.partial(getattr, capacity, "limit"))
                m.concurrency.labels(name).set_function(functools.partial(getattr, capacity, "active"))
                m.queue_depth.labels(name).set_function(functools.partial(getattr, capacity, "queued"))

    def plan(self, route: RouteConfig, model: str) -> list[tuple[str, str]]:
        """(upstream, model sent to it) for the primary, then each fallback."""
        primary = route.model_rewrite or model
        if not route.fallbacks:  # the usual route: no list built and joined per call
            return [(route.upstream, primary)]
        return [(route.upstream, primary)] + [(fb, route.fallback_models.get(fb, primary)) for fb in route.fallbacks]

    async def stream(
        self,
        route: RouteConfig,
        body: dict,
        options: CallOptions,
        served_by: Callable[[str], None],
        stream: bool = True,
        wire: Wire = CHAT_WIRE,
    ) -> AsyncGenerator[list[Chunk], None]:
        try:
            failure: HerdError | None = None  # why the last upstream tried could not answer
            plan = self.plan(route, body["model"])
            for position, (name, model) in enumerate(plan):
                target = body if model == body["model"] else dict(body, model=model)
                if position:
                    self.metrics.upstream_fallbacks.labels(plan[0][0], name).inc()
                    log.warning("falling back to upstream %s (%s)", name, type(failure).__name__)
                started = False
                try:
                    count = await self._preflight(name, target)
                    last = position == len(plan) - 1  # nothing to fall back to: worth waiting for the circuit
                    tries = self._tries(name, target, options, count, stream, last, wire)
                    async with contextlib.aclosing(tries) as batches:
                        async for batch in batches:
                            if not started:
                                served_by(name)
                                started = True
                            yield batch
                    return
                except HerdError as error:
                    if started:
                        raise  # waiters may have the first chunks: no other answer can follow them
                    if position == 0:
                        if not (route.fallbacks and may_fall_back(error)):
                            raise
                        failure = error
                    elif not isinstance(error, InvalidRequest):
                        failure = error  # a fallback that cannot take the request keeps the earlier error
            assert failure is not None
            raise failure
        except HerdError as error:
            redact(error, (options.client_key, *self.secrets))  # an upstream may echo a key it was sent
            raise

    async def _preflight(self, name: str, body: dict) -> TokenCount | None:
        """The prompt's token count when a check or a limit needs it; 400 if over the context window."""
        model = body["model"]
        window = self.tokens.context_window(model) if self.settings.tokens.check_context else 0
        if not self.guards[name].limits.counts_tokens and not (window and self.tokens.may_exceed(body, window)):
            return None
        if _text_size(body) > COUNT_INLINE_MAX_CHARS:
            count = await asyncio.to_thread(self.tokens.count, body, model)
        else:
            count = self.tokens.count(body, model)
        if window:
            self.tokens.check(count, model)
        return count

    async def _tries(
        self, name: str, body: dict, options: CallOptions, count: TokenCount | None, stream: bool, last: bool = True,
        wire: Wire = CHAT_WIRE,
    ) -> AsyncGenerator[list[Chunk], None]:
        """One upstream's answer, tried again on retryable failures until a chunk has gone out."""
        upstream, guard, m = self.upstreams[name], self.guards[name], self.metrics
        circuit_wait = guard.retry.max_s if last else 0.0
        want = 0
        if count is not None:
            want = count.tokens + (
                body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens") or 0
            )
        attempt = 0
        while True:
            ticket = await guard.circuit.enter(name, circuit_wait)
            try:
                permit = await guard.limits.acquire(want)
            except BaseException as error:
                guard.circuit.release(ticket)
                if isinstance(error, RateLimited):
                    m.rate_limited.labels(name).inc()
                raise
            if permit.waited_s:
                m.rate_limit_wait.labels(name).observe(permit.waited_s)
            m.upstream_calls.labels(name).inc()
            started, usage = False, None
            try:
                async with contextlib.aclosing(upstream.call(wire, body, options, stream)) as batches:
                    async for batch in batches:
                        if not started:
                            guard.circuit.success(ticket)  # it answers: a probe's waiters may go
                            started = True
                        usage = wire.usage(batch) or usage
                        yield batch
            except HerdError as error:
                guard.circuit.record(error, ticket)
                guard.limits.settle(permit, 0 if not started else None)
                delay = None if started else guard.retry.delay(attempt, error)
                if delay is None:
                    raise
                m.upstream_retries.labels(name).inc()
                log.info(
                    "retrying upstream %s in %.2fs after %s",
                    name,
                    delay,
                    _describe(error),
                )
                await asyncio.sleep(delay)
                attempt += 1
                continue
            except BaseException:
                guard.circuit.release(ticket)  # cancelled, or closed by the flight: no verdict
                guard.limits.settle(permit, None)
                raise
            if not started:
                guard.circuit.success(ticket)
            guard.limits.settle(permit, usage.get("total_tokens") if usage else None)
            return


    async def forward(
        self, name: str, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
        options: CallOptions,
    ) -> ForwardResponse:
        """A forwarded call (any other /v1 path, as it came) behind the same protection as a
        flight's call: the circuit (waiting out a blip), the rate limits, and metrics.

        Retries only for idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE): a POST that
        failed may have done its work upstream (a file uploaded, a batch created), so its
        answer goes back as it came. A retryable status (408/409/429/5xx) or a failed
        connection is tried again with the flight's backoff; the response handed back is the
        upstream's, status and all, with its body still to read.
        """
        upstream, guard, m = self.upstreams[name], self.guards[name], self.metrics
        retry = method in IDEMPOTENT
        attempt = 0
        while True:
            ticket = await guard.circuit.enter(name, guard.retry.max_s)
            try:
                permit = await guard.limits.acquire(0)
            except BaseException as error:
                guard.circuit.release(ticket)
                if isinstance(error, RateLimited):
                    m.rate_limited.labels(name).inc()
                raise
            if permit.waited_s:
                m.rate_limit_wait.labels(name).observe(permit.waited_s)
            m.upstream_calls.labels(name).inc()
            started = time.perf_counter()
            try:
                resp = await upstream.forward(method, path, query, headers, body, options)
            except HerdError as error:
                guard.circuit.record(error, ticket)
                guard.limits.settle(permit, None)
                m.upstream_errors.labels(name, type(error).__name__).inc()
                delay = guard.retry.delay(attempt, error) if retry else None
                if delay is None:
                    raise
            except BaseException:
                guard.circuit.release(ticket)
                guard.limits.settle(permit, None)
                raise
            else:
                guard.limits.settle(permit, None)
                m.upstream_latency.labels(name).observe(time.perf_counter() - started)  # to its headers
                if resp.status < 400:
                    guard.circuit.success(ticket)
                    return resp
                refused = UpstreamError(resp.status, headers=retry_headers(resp.headers), upstream=name)
                guard.circuit.record(refused, ticket)
                if counts_against_circuit(refused):
                    m.upstream_errors.labels(name, type(refused).__name__).inc()
                delay = guard.retry.delay(attempt, refused) if retry else None
                if delay is None:
                    # the upstream's own error answer, less any key it echoes
                    return await _redacted(resp, (options.client_key, *self.secrets))
                resp.close()
            m.upstream_retries.labels(name).inc()
            log.info("retrying forwarded %s /v1/%s on %s in %.2fs", method, path, name, delay)
            await asyncio.sleep(delay)
            attempt += 1


#: The most of a forwarded error answer herd reads to redact it (error bodies are a few
#: hundred bytes; one larger than this is cut here, not held).
MAX_ERROR_BODY = 64 * 1024


async def _redacted(resp: ForwardResponse, secrets: tuple[str | None, ...]) -> ForwardResponse:
    """A forwarded error answer with every key it echoes (the client's, a provider's) cut
    out, as flights' errors are (proxy.errors.redact): read whole, since a key can straddle
    two reads, up to MAX_ERROR_BODY bytes."""
    parts: list[bytes] = []
    size = 0
    try:
        async for part in resp.body:
            parts.append(part)
            size += len(part)
            if size >= MAX_ERROR_BODY:
                break
    finally:
        resp.close()
    raw = b"".join(parts)[:MAX_ERROR_BODY]
    for secret in secrets:
        if secret:
            raw = raw.replace(secret.encode(), b"[redacted]")

    async def body() -> AsyncIterator[bytes]:
        yield raw

    return ForwardResponse(resp.status, resp.headers, body())


def _circuit_gauge(circuit: CircuitBreaker) -> float:
    return CIRCUIT_GAUGE[circuit.state]


def _text_size(body: dict) -> int:
    size = sum(len(v) if isinstance(v, str) else len(orjson.dumps(v)) for k in ("input", "prompt")
               if (v := body.get(k)) is not None)
    for message in body.get("messages") or ():
        content = message.get("content")
        if isinstance(content, str):
            size += len(content)
        elif isinstance(content, list):
            size += sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return size


def _describe(error: HerdError) -> str:
    if isinstance(error, UpstreamError):
        return f"HTTP {error.status}"
    return type(error).__name__
