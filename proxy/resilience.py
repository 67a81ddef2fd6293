"""What protects a flight's one upstream call. Small classes, one job each:

    RetryPolicy      which failures to try again, and how long to wait first (full jitter,
                     at least the upstream's Retry-After)
    CircuitBreaker   stop calling an upstream that keeps failing; one trial call after a pause
    TokenBucket      so many requests or tokens per minute
    RateLimiter      an upstream's request and token buckets, shared by every flight
    CapacityLimiter  a concurrency limit that follows a GPU backend's load, with a bounded queue

None of them does I/O; proxy.dispatch composes them around each call, and the vLLM adapter
feeds its CapacityLimiter from the backend's /metrics.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from proxy.config import UpstreamConfig
from proxy.errors import (
    HerdError,
    Overloaded,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
    is_retryable,
)

Clock = Callable[[], float]


def retry_after(error: BaseException) -> float | None:
    """The wait an error asks for (`retry-after-ms`, or `retry-after` in seconds or as a date)."""
    headers = getattr(error, "headers", None) or {}
    millis = headers.get("retry-after-ms")
    if millis is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(millis) / 1000.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retry_after_header(seconds: float) -> dict[str, str]:
    """A `Retry-After` header: whole seconds, rounded up, at least 1."""
    return {"retry-after": str(max(1, math.ceil(seconds)))}


# -- retries -----------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter. An upstream's Retry-After is waited for, plus
    jitter on top (so flights told the same wait do not come back in one wave), never past
    `max_s`; a longer Retry-After is not waited for at all."""

    retries: int = 2
    base_s: float = 0.5
    max_s: float = 8.0
    uniform: Callable[[float, float], float] = field(default=random.uniform, repr=False)

    def delay(self, attempt: int, error: BaseException) -> float | None:
        """Seconds to wait before trying again after failed try `attempt` (0 = the first), or None.

        None: the error is not retryable, the tries are used up, or the upstream asks for a
        longer wait than `max_s` (better to fall back than hold every waiter that long).
        """
        if attempt >= self.retries or not is_retryable(error):
            return None
        window = min(self.max_s, self.base_s * 2**attempt)
        hint = retry_after(error)
        if hint is None:
            return self.uniform(0.0, window)
        if hint > self.max_s:
            return None
        spread = min(max(window, hint / 2), self.max_s - hint)  # at least half the hint, within max_s
        return hint + self.uniform(0.0, spread)


# -- circuit breaker ---------------------------------------------------------------------


class CircuitOpen(Overloaded):
    code = "circuit_open"
    wait: float | None = None  # seconds until the cool-down ends; None: a probe call is deciding


def counts_against_circuit(error: BaseException) -> bool | None:
    """True: the upstream failed. False: it answered (a 4xx is the request's fault). None: neither.

    A 429 is the upstream protecting itself, not failing: retries and Retry-After deal with it.
    Errors herd raised itself (a refused translation, a full queue) say nothing about the upstream.
    """
    if isinstance(error, (UpstreamUnavailable, UpstreamTimeout)):
        return True
    if isinstance(error, UpstreamError):
        if error.status == 429:
            return None
        return error.status == 408 or error.status >= 500
    return None


class CircuitBreaker:
    """Stop calling an upstream that keeps failing, and find out soon when it is back.

        closed --`failures` failed rounds in a row--> open --cool-down--> half-open
        half-open: ONE probe call; other calls wait for its verdict (or are refused, 503)
        probe answers --> closed;  probe fails --> open again, the cool-down doubled
        (from `reset_s` up to `reset_max_s`); any call that answers closes the circuit.

    A round: calls that were running together fail together, so a failure counts only if
    its call started after the last failure that counted. A burst of 50 concurrent calls
    into a one-second blip is one failure, not 50; calls made one after another (retries
    included) each count. `failures` = 0 turns the breaker off.

    Every call holds a ticket from `admit` (or `enter`) and ends with exactly one of
    `success`, `failure` or `release` (no verdict: cancelled, refused by herd, 429).
    """

    CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"

    def __init__(
        self, failures: int = 5, reset_s: float = 1.0, reset_max_s: float = 10.0, clock: Clock = time.monotonic
    ) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self.reset_max_s = max(reset_s, reset_max_s)
        self.clock = clock
        self.failed = 0  # failed rounds in a row
        self.opened_at: float | None = None
        self.cooldown = reset_s  # how long this opening lasts
        self.calls = 0  # tickets given so far: a call's ticket is its number
        self.counted = 0  # `calls` when the last failure counted: calls up to it are of that round
        self.probe: int | None = None  # the half-open probe's ticket, while it runs
        self._verdict: asyncio.Future[None] | None = None  # done when the probe's verdict is in
        self.last_failure: BaseException | None = None  # the last failure that counted, said when refusing

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return self.CLOSED
        if self.clock() - self.opened_at < self.cooldown:
            return self.OPEN
        return self.HALF_OPEN

    def retry_after(self) -> float:
        """Seconds until the next probe may go (0 when calls may go now)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown - self.clock())

    def admit(self, upstream: str) -> int:
        """A ticket for one call now, or CircuitOpen (503 with Retry-After; `wait` says for what)."""
        state = self.state
        if state == self.CLOSED or (state == self.HALF_OPEN and self.probe is None):
            self.calls += 1
            if state == self.HALF_OPEN:
                self.probe = self.calls
            return self.calls
        wait = self.retry_after() if state == self.OPEN else None  # None: the probe's verdict
        last = self.last_failure
        if isinstance(last, UpstreamUnreachable):
            # Nobody could connect: say why, as the failure itself did (502), with no Retry-After
            # that would have a client's SDK sleep on an upstream that is misconfigured or down.
            pause = f"for {math.ceil(wait)} s" if wait else "until a trial call connects"
            error = CircuitOpen(f"{last.message}; herd is not trying it again {pause} (circuit open)",
                                status=502, type="upstream_error")
        else:
            why = f" (last: HTTP {last.status})" if isinstance(last, UpstreamError) else (
                f" (last: {last.message})" if isinstance(last, HerdError) else "")
            pause = f"for {math.ceil(wait)} s" if wait else "until a trial call answers"
            error = CircuitOpen(
                f"The upstream {upstream!r} is failing{why}; herd stopped calling it {pause} (circuit open).",
                headers=retry_after_header(wait or 1.0),
            )
        error.wait = wait
        raise error

    async def enter(self, upstream: str, max_wait: float = 0.0) -> int:
        """`admit`, waiting up to `max_wait` seconds for a probe's verdict, or for the end of
        a first cool-down (a blip: the upstream may well be back). Once a probe has failed
        the upstream is down: CircuitOpen at once, its Retry-After the time left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        while True:
            try:
                return self.admit(upstream)
            except CircuitOpen as refused:
                left = deadline - loop.time()
                if refused.wait is not None:
                    if refused.wait > left or self.cooldown > self.reset_s:
                        raise
                    await asyncio.sleep(refused.wait)
                    continue
                if left <= 0:
                    raise
                if self._verdict is None or self._verdict.done():
                    self._verdict = loop.create_future()
                try:
                    await asyncio.wait_for(asyncio.shield(self._verdict), left)
                except TimeoutError:
                    raise refused from None

    def success(self, ticket: int = 0) -> None:
        """The upstream answered this call (its first chunk came): closed."""
        self.failed = 0
        self.opened_at = None
        self.cooldown = self.reset_s
        self._end_probe(self.probe)  # a probe still running no longer decides anything

    def failure(self, ticket: int = 0) -> None:
        if ticket and ticket == self.probe:
            self._end_probe(ticket)
            self.cooldown = min(self.reset_max_s, self.cooldown * 2)
            self.opened_at = self.clock()
            self.counted = self.calls
            return
        if ticket and ticket <= self.counted:
            return  # it ran alongside a failure that counted: the same round
        self.counted = self.calls
        self.failed += 1
        if self.failures and self.opened_at is None and self.failed >= self.failures:
            self.opened_at = self.clock()
            self.cooldown = self.reset_s

    def release(self, ticket: int = 0) -> None:
        """The call ended with no verdict on the upstream; a probe's turn passes to the next call."""
        self._end_probe(ticket)

    def record(self, error: BaseException, ticket: int = 0) -> None:
        verdict = counts_against_circuit(error)
        if verdict is True:
            self.last_failure = error
            self.failure(ticket)
        elif verdict is False:
            self.success(ticket)
        else:
            self.release(ticket)

    def _end_probe(self, ticket: int | None) -> None:
        if ticket and ticket == self.probe:
            self.probe = None
            if self._verdict is not None and not self._verdict.done():
                self._verdict.set_result(None)


# -- rate limits -------------------------------------------------------------------------


class RateLimited(HerdError):
    """herd's own rate limit for an upstream would make this call wait too long."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class TokenBucket:
    """`per_minute` units a minute, holding at most `burst_s` seconds' worth (at least 1 unit).

    `reserve` takes units at once and may leave the bucket owing: later callers wait until the
    debt is paid, so callers are served in the order they asked.
    """

    def __init__(self, per_minute: float, burst_s: float = 10.0, clock: Clock = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.clock = clock
        self.level = self.capacity
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` (at most a full bucket) is available, if nobody else takes any."""
        self._refill()
        return max(0.0, (min(amount, self.capacity) - self.level) / self.rate)

    def reserve(self, amount: float, max_wait: float) -> tuple[float, float] | None:
        """Take `amount` (at most a full bucket); (units taken, seconds to wait) or None if longer than `max_wait`."""
        amount = min(amount, self.capacity)
        wait = self.wait_for(amount)
        if wait > max_wait:
            return None
        self.level -= amount
        return amount, wait

    def refund(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)

    def charge(self, amount: float) -> None:
        """Take units after the fact (usage beyond a reservation); the bucket may go into debt."""
        self._refill()
        self.level -= amount


@dataclass
class Permit:
    """What a call took from its upstream's rate limits; settled when the call ends."""

    tokens: float = 0.0
    waited_s: float = 0.0


class RateLimiter:
    """An upstream's requests-per-minute and tokens-per-minute buckets (either may be off)."""

    def __init__(self, cfg: UpstreamConfig, clock: Clock = time.monotonic) -> None:
        self.name = cfg.name
        self.max_wait = cfg.rate_limit_wait_s
        self.requests = (
            TokenBucket(cfg.requests_per_minute, cfg.rate_limit_burst_s, clock) if cfg.requests_per_minute else None
        )
        self.tokens = (
            TokenBucket(cfg.tokens_per_minute, cfg.rate_limit_burst_s, clock) if cfg.tokens_per_minute else None
        )

    @property
    def counts_tokens(self) -> bool:
        return self.tokens is not None

    async def acquire(self, tokens: float = 0.0) -> Permit:
        """Wait for a request and `tokens` from the buckets, or raise RateLimited (429 + Retry-After)."""
        if self.requests is None and self.tokens is None:
            return Permit()  # no limits (the default)
        taken_request = taken_tokens = None
        if self.requests is not None:
            taken_request = self.requests.reserve(1, self.max_wait)
            if taken_request is None:
                raise self._refusal("requests", self.requests.wait_for(1))
        if self.tokens is not None and tokens > 0:
            taken_tokens = self.tokens.reserve(tokens, self.max_wait)
            if taken_tokens is None:
                if taken_request is not None and self.requests is not None:
                    self.requests.refund(taken_request[0])
                raise self._refusal("tokens", self.tokens.wait_for(tokens))
        permit = Permit(taken_tokens[0] if taken_tokens else 0.0)
        permit.waited_s = max(
            taken_request[1] if taken_request else 0.0,
            taken_tokens[1] if taken_tokens else 0.0,
        )
        if permit.waited_s > 0:
            try:
                await asyncio.sleep(permit.waited_s)
            except asyncio.CancelledError:
                if taken_request is not None and self.requests is not None:
                    self.requests.refund(taken_request[0])
                self.settle(permit, 0)
                raise
        return permit

    def settle(self, permit: Permit, used_tokens: float | None) -> None:
        """Square a call's reservation with the tokens it used (None: as reserved)."""
        if self.tokens is None or used_tokens is None:
            return
        extra = used_tokens - permit.tokens
        if extra > 0:
            self.tokens.charge(extra)
        elif extra < 0:
            self.tokens.refund(-extra)
        permit.tokens = used_tokens

    def _refusal(self, kind: str, wait: float) -> RateLimited:
        return RateLimited(
            f"Rate limit reached for upstream {self.name!r} ({kind} per minute, set in herd's config). "
            f"Please try again in {wait:.1f}s.",
            type=kind,
            headers=retry_after_header(wait),
        )


# -- capacity ----------------------------------------------------------------------------


class CapacityLimiter:
    """At most `limit` calls at once to one backend, `min_limit <= limit <= max_limit`; more wait
    in a FIFO queue of `queue_size`, each for at most `queue_timeout_s`. A full queue or a wait
    that runs out is an Overloaded (503) with Retry-After.

    `observe` moves the limit with the backend's own load: under pressure (KV cache at or
    above `kv_high`, or `waiting_high` requests waiting inside the backend) it halves; with
    the KV cache at most half of `kv_high` and nothing waiting it doubles; otherwise it grows
    by one. Calls already running are never interrupted.
    """

    def __init__(
        self,
        name: str,
        *,
        max_limit: int,
        min_limit: int = 1,
        queue_size: int = 100,
        queue_timeout_s: float = 30.0,
        kv_high: float = 0.9,
        waiting_high: int = 1,
    ) -> None:
        self.name = name
        self.max_limit = max_limit
        self.min_limit = min_limit
        self.limit = max_limit
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        self.kv_high = kv_high
        self.waiting_high = waiting_high
        self.active = 0
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def observe(self, kv_usage: float | None, waiting: float | None) -> None:
        """Adapt the limit to one reading of the backend's metrics (None: not reported)."""
        busy = waiting is not None and waiting >= self.waiting_high
        if busy or (kv_usage is not None and kv_usage >= self.kv_high):
            self.limit = max(self.min_limit, self.limit // 2)
        elif kv_usage is not None and kv_usage <= self.kv_high / 2 and not waiting:
            self.limit = min(self.max_limit, self.limit * 2)
        else:
            self.limit = min(self.max_limit, self.limit + 1)
        self._wake()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the backend's slots for the block, waiting in the queue if need be."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if not self._queue and self.active < self.limit:
            self.active += 1
            return
        if len(self._queue) >= self.queue_size:
            raise self._overloaded("its queue in herd is full", "queue_full")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(fut)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                self._release()  # a slot was handed over just as the wait ended
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._queue.remove(fut)
            if isinstance(e, TimeoutError):
                raise self._overloaded(
                    f"no slot freed up within {self.queue_timeout_s:g}s",
                    "queue_timeout",
                ) from None
            raise

    def _release(self) -> None:
        self.active -= 1
        self._wake()

    def _wake(self) -> None:
        while self._queue and self.active < self.limit:
            fut = self._queue.popleft()
            if fut.done():
                continue
            self.active += 1
            fut.set_result(None)

    def _overloaded(self, why: str, code: str) -> Overloaded:
        return Overloaded(
            f"The upstream {self.name!r} is at capacity and {why}; please retry later.",
            code=code,
            headers=retry_after_header(min(self.queue_timeout_s, 30.0)),
        )


# -- per upstream ------------------------------------------------------------------------


class Guard:
    """Everything that protects one upstream, shared by all flights."""

    def __init__(self, cfg: UpstreamConfig, clock: Clock = time.monotonic) -> None:
        self.retry = RetryPolicy(cfg.retries, cfg.backoff_base_s, cfg.backoff_max_s)
        self.circuit = CircuitBreaker(cfg.circuit_failures, cfg.circuit_reset_s, cfg.circuit_reset_max_s, clock)
        self.limits = RateLimiter(cfg, clock)
