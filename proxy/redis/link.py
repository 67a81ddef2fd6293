"""The link to Redis (or Redis Cluster): bounded connections, pipelined calls, health.

Everything herd asks Redis goes through one `Link`:

    link.call(add)        a short command or two (a claim, a cache read, a heartbeat): queued,
                          and sent with every other queued call in one pipeline, so a burst of
                          a thousand flights costs a few round trips, not a thousand
    link.run(op)          an operation on a connection of its own, for the ones that block
                          or take several steps
    link.subscribe(s)     the entries of stream `s` as they come: one blocking XREAD, on one
                          connection, reads every stream this replica follows (Redis Cluster:
                          a blocking XREAD of its own per stream, in `run`)

Bounds: the pipelines go over at most `PIPELINES` connections at once; `run` takes one of
`[redis] pool_size` connections, waiting for one (within its deadline) when all are busy,
and the pool holds no more than those (plus two for health pings), so redis-py's
MaxConnectionsError cannot happen. A call that cannot start before its deadline gives up
without blaming Redis (our queue was long, Redis was not slow).

Health: Redis is judged on its last `WINDOW_S` seconds of round trips. It is marked down
when at least `MIN_FAILURES` of them failed and failures are at least `DOWN_RATIO` of them
(one slow call among many is not an outage; a stopped or frozen Redis fails them all). A
failure that does not settle it starts pings, one at a time, until one answers (it was a
slow call) or the window says down: a quiet replica learns of an outage as fast as a busy one.
While down, herd serves local-only and probes Redis every `retry_after_s` until it answers.
Any trouble raises `RedisUnavailable`: the caller goes on without Redis. A Redis problem
never fails a request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from proxy.config import RedisConfig
from proxy.metrics import Metrics

log = logging.getLogger("herd.redis")

T = TypeVar("T")

#: Pipelines in flight at once (each on a connection of its own).
PIPELINES = 4
#: Commands per pipeline at most; more queued calls wait for the next one.
MAX_BATCH = 512
#: Health: the window, and what in it marks Redis down.
WINDOW_S = 2.0
MIN_FAILURES = 3
DOWN_RATIO = 0.5
#: A queued call waits this many `timeout_s` at most for its pipeline to be sent and answered.
QUEUE_DEADLINES = 4

#: A deadline's timer that runs this late (a share of the timeout) shows a busy loop, not a slow Redis.
LATE_TIMER = 0.1

Add = Callable[[Any], None]  # adds a command (or a few) to a pipeline


class RedisUnavailable(Exception):
    """Redis is down, slow or marked down for now: do it locally."""


async def within(aw: Awaitable[T], timeout: float) -> T:
    """`aw`, or TimeoutError after `timeout` seconds. Unlike asyncio.timeout, a reply that came
    in while the loop was busy elsewhere still counts: a busy loop runs the expired timer
    before the task that the reply woke (asyncio.timeout would cancel that task, throw the
    reply away and blame Redis for our own lag), and a timer that runs late earns one more
    period."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(aw)
    try:
        deadline = loop.time() + timeout
        await asyncio.wait((task,), timeout=timeout)
        if not task.done() and loop.time() - deadline > LATE_TIMER * timeout:
            # The loop was too busy to run the timer on time, so it may not have read a reply
            # that came in time either: give it one more period before blaming Redis.
            await asyncio.wait((task,), timeout=timeout)
        if not task.done():
            raise TimeoutError
        return task.result()
    finally:
        if not task.done():
            task.cancel()


class Health:
    """Round trips of the last `window_s` seconds: down on a high error rate, not one error."""

    def __init__(self, window_s: float = WINDOW_S, min_failures: int = MIN_FAILURES, ratio: float = DOWN_RATIO,
                 clock: Callable[[], float] | None = None) -> None:
        self.window_s = window_s
        self.min_failures = min_failures
        self.ratio = ratio
        self._clock = clock
        self._events: collections.deque[tuple[float, bool]] = collections.deque()
        self._failures = 0

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def record(self, ok: bool) -> bool:
        """Count one round trip; True when the window now says Redis is down."""
        now = self._now()
        self._events.append((now, ok))
        self._failures += not ok
        while self._events and self._events[0][0] < now - self.window_s:
            _, old_ok = self._events.popleft()
            self._failures -= not old_ok
        return self._failures >= self.min_failures and self._failures >= self.ratio * len(self._events)

    def reset(self) -> None:
        self._events.clear()
        self._failures = 0


class Link:
    """The Redis client plus its health."""

    def __init__(self, cfg: RedisConfig, metrics: Metrics, health: Health | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.replica = secrets.token_hex(6)  # this process, in lease values and heartbeats
        self.up = False
        self.client: Redis | RedisCluster | None = None
        self.health = health or Health()
        self._queue: list[tuple[Add, asyncio.Future]] = []
        self._pipelines = 0  # in flight
        self._scheduled = False
        self._probe: asyncio.Task | None = None
        self._check: asyncio.Task | None = None
        self._reader: StreamReader | None = None
        self._slots = asyncio.Semaphore(cfg.pool_size)  # `run` calls at once
        self._flushes: set[asyncio.Task] = set()
        self._gauge = metrics.redis_up.labels("cluster" if cfg.cluster else "standalone")
        self._gauge.set(0)

    def key(self, flight_key: str, part: str) -> str:
        return f"{self.cfg.key_prefix}:{{{flight_key}}}:{part}"

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        options: dict[str, Any] = {
            "socket_connect_timeout": self.cfg.timeout_s,
            "socket_timeout": None,  # every call has its own deadline; XREAD blocks on purpose
            "retry": Retry(NoBackoff(), 1),  # one immediate retry: a stale connection after a restart
            "health_check_interval": 0,
        }
        size = self.cfg.pool_size + PIPELINES + 2  # and the health pings
        if self.cfg.cluster:
            # per node; its pool has no queue, but `run` holds at most pool_size at once (its slots)
            self.client = RedisCluster.from_url(self.cfg.url, max_connections=max(size, 1024), **options)
        else:
            # waits for a free connection instead of raising MaxConnectionsError; the caller's
            # deadline bounds the wait
            pool = BlockingConnectionPool.from_url(self.cfg.url, max_connections=size, timeout=None, **options)
            self.client = Redis.from_pool(pool)
        try:
            async with asyncio.timeout(max(self.cfg.timeout_s, 2.0)):
                if isinstance(self.client, RedisCluster):
                    await self.client.initialize()
                await self.client.ping()
        except Exception as e:  # down at start is fine: local-only until it answers
            self._down(e)
            return
        self._set_up()

    def subscribe(self, stream: str, after: bytes = b"0-0") -> Subscription:
        """Follow `stream` from the entry after `after` (standalone Redis only)."""
        if self._reader is None:
            self._reader = StreamReader(self)
        return self._reader.subscribe(stream, after)

    def unsubscribe(self, sub: Subscription) -> None:
        if self._reader is not None:
            self._reader.unsubscribe(sub)

    async def aclose(self) -> None:
        if self._reader is not None:
            await self._reader.aclose()
        for task in (self._probe, self._check):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if self.client is not None:
            try:
                await self.client.aclose()
            except (RedisError, OSError):
                pass

    # -- calls -------------------------------------------------------------------------
    async def call(self, add: Add) -> list[Any]:
        """Run the command(s) `add` puts on a pipeline, batched with every other queued call;
        their replies, in order. Raises RedisUnavailable (a failed reply included)."""
        if not self.up or self.client is None:
            raise RedisUnavailable("redis is marked down")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((add, future))
        self._flush_soon()
        try:
            return await within(future, self.cfg.timeout_s * QUEUE_DEADLINES)
        except TimeoutError:
            self.metrics.redis_errors.labels("queue").inc()
            raise RedisUnavailable("queued too long") from None
        finally:
            future.cancel()  # gone before its reply: not sent yet, it never will be; sent, its reply is dropped

    async def run(self, op: Callable[[Any], Awaitable[T]], timeout: float | None = None) -> T:
        """`op(client)` on a connection of its own, within the timeout."""
        if not self.up or self.client is None:
            raise RedisUnavailable("redis is marked down")
        limit = self.cfg.timeout_s if timeout is None else timeout
        try:  # a free connection first: waiting for one is our queue, not Redis being slow
            await within(self._slots.acquire(), limit)
        except TimeoutError:
            self.metrics.redis_errors.labels("queue").inc()
            raise RedisUnavailable("no free connection in time") from None
        try:
            result = await within(op(self.client), limit)
        except Exception as e:  # whatever goes wrong with Redis, the request goes on without it
            self._failed(e)
            raise RedisUnavailable(type(e).__name__) from None
        finally:
            self._slots.release()
        self._ok()
        return result

    def _flush_soon(self) -> None:
        """Send what is queued once the calls made in this turn of the loop have joined it."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_queue)

    def _flush_queue(self) -> None:
        self._scheduled = False
        while self._queue and self._pipelines < PIPELINES:
            batch = [(add, f) for add, f in self._queue[:MAX_BATCH] if not f.done()]
            del self._queue[:MAX_BATCH]
            if not batch:
                continue
            self._pipelines += 1
            task = asyncio.get_running_loop().create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[tuple[Add, asyncio.Future]]) -> None:
        try:
            if not self.up or self.client is None:
                error: BaseException = RedisUnavailable("redis is marked down")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                return
            pipe = self.client.pipeline(transaction=False)
            spans = []
            for add, future in batch:
                start = len(pipe)
                add(pipe)
                spans.append((start, len(pipe), future))
            try:
                replies = await within(pipe.execute(raise_on_error=False), self.cfg.timeout_s)
            except Exception as e:  # the whole round trip failed
                self._failed(e)
                error = RedisUnavailable(type(e).__name__)
                for _, _, future in spans:
                    if not future.done():
                        future.set_exception(error)
                return
            self._ok()
            for start, end, future in spans:
                if future.done():
                    continue
                mine = replies[start:end]
                bad = next((r for r in mine if isinstance(r, Exception)), None)
                if bad is not None:
                    self.metrics.redis_errors.labels("reply").inc()
                    log.debug("redis replied with an error: %s", bad)
                    future.set_exception(RedisUnavailable(type(bad).__name__))
                else:
                    future.set_result(mine)
        finally:
            self._pipelines -= 1
            if self._queue:
                self._flush_queue()

    # -- health ------------------------------------------------------------------------
    def _ok(self) -> None:
        self.health.record(True)

    def _failed(self, error: BaseException) -> None:
        if isinstance(error, (TimeoutError, RedisTimeout)):
            kind = "timeout"
        elif isinstance(error, (RedisConnectionError, OSError)):
            kind = "connection"
        else:
            kind = "other"
        self.metrics.redis_errors.labels(kind).inc()
        if not self.up:
            return
        if self.health.record(False):
            log.warning("redis %s (%s), and most calls of the last %.0fs failed: serving local-only, "
                        "retrying every %.1fs", kind, type(error).__name__, self.health.window_s,
                        self.cfg.retry_after_s)
            self._down(error)
        elif self._check is None or self._check.done():
            # one failure is a suspicion: ping until Redis answers, or the window says it is down
            self._check = asyncio.get_running_loop().create_task(self._check_after_failure(), name="redis-check")

    async def _check_after_failure(self) -> None:
        assert self.client is not None
        while self.up:
            try:
                await within(self.client.ping(), self.cfg.timeout_s)
            except Exception as e:  # counted like any failed call
                self._failed(e)
            else:
                self._ok()
                return

    def _down(self, error: BaseException) -> None:
        if self.up or self._probe is None:
            log.warning("redis is down (%s): serving local-only", type(error).__name__)
        self.up = False
        self._gauge.set(0)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up(), name="redis-probe")

    def _set_up(self) -> None:
        self.health.reset()
        self.up = True
        self._gauge.set(1)

    async def _probe_until_up(self) -> None:
        assert self.client is not None
        while True:
            await asyncio.sleep(self.cfg.retry_after_s)
            try:
                async with asyncio.timeout(max(self.cfg.timeout_s, 1.0)):
                    await self.client.ping()
            except Exception as e:  # still down, whatever the reason
                self.metrics.redis_errors.labels("probe").inc()
                log.debug("redis still down: %s", type(e).__name__)
                continue
            log.warning("redis is back: sharing flights and answers again")
            self._set_up()
            return


class Subscription:
    """The entries of one stream, from `after`, as the reader delivers them."""

    def __init__(self, stream: str, after: bytes) -> None:
        self.stream = stream
        self.after = after  # the last entry id read
        self.entries: list[tuple[bytes, dict]] = []
        self.error: BaseException | None = None
        self._event = asyncio.Event()

    def _deliver(self, entries: list[tuple[bytes, dict]]) -> None:
        self.entries.extend(entries)
        self.after = entries[-1][0]
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self._event.set()

    async def take(self, timeout: float) -> list[tuple[bytes, dict]]:
        """What arrived since the last take, waiting up to `timeout` for something."""
        if not self.entries and self.error is None:
            try:
                async with asyncio.timeout(timeout):
                    await self._event.wait()
            except TimeoutError:
                pass
        if self.error is not None:
            raise self.error
        self._event.clear()
        entries, self.entries = self.entries, []
        return entries


class StreamReader:
    """One blocking XREAD over every subscribed stream, on a connection of its own.

    A new subscription interrupts the XREAD in progress (CLIENT UNBLOCK, from the pipelines)
    so the next one includes it. A failed read counts against Redis's health like any
    call; the subscriptions fail only once the link is down (their flights then go on
    without Redis).
    """

    def __init__(self, link: Link) -> None:
        self.link = link
        self.block_ms = max(10, int(link.cfg.lease_s / 3 * 1000))
        self._subs: dict[str, Subscription] = {}
        self._client: Redis | None = None
        self._client_id: int | None = None
        self._blocked = False
        self._reading: set[str] = set()  # the streams of the read in progress
        self._unblocking = False
        self._task: asyncio.Task | None = None

    def subscribe(self, stream: str, after: bytes = b"0-0") -> Subscription:
        sub = self._subs[stream] = Subscription(stream, after)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._read(), name="redis-reader")
        elif self._blocked and not self._unblocking and self._client_id is not None:
            self._unblocking = True
            asyncio.get_running_loop().create_task(self._unblock(self._client_id))
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.stream) is sub:
            del self._subs[sub.stream]

    async def _unblock(self, client_id: int) -> None:
        try:
            for _ in range(10):
                if not self._blocked or self._reading.issuperset(self._subs):
                    return  # the next read (or the one in progress) has every stream
                [unblocked] = await self.link.call(lambda pipe: pipe.client_unblock(client_id))
                if unblocked:
                    return
                await asyncio.sleep(0.002)  # our XREAD had not reached Redis yet
        except RedisUnavailable:
            pass
        finally:
            self._unblocking = False

    async def _read(self) -> None:
        link = self.link
        while self._subs:
            if not link.up:
                for sub in self._subs.values():
                    sub._fail(RedisUnavailable("redis is marked down"))
                self._subs.clear()
                break
            try:
                if self._client is None:
                    self._client = Redis.from_url(link.cfg.url, socket_connect_timeout=link.cfg.timeout_s,
                                                  socket_timeout=None, retry=None, single_connection_client=True)
                    self._client_id = await within(self._client.client_id(), link.cfg.timeout_s)
                streams: dict[Any, Any] = {name: sub.after for name, sub in self._subs.items()}
                self._reading = set(streams)
                self._blocked = True
                try:
                    reply: Any = await within(self._client.xread(streams, count=1024, block=self.block_ms),
                                         self.block_ms / 1000 + link.cfg.timeout_s)
                finally:
                    self._blocked = False
            except Exception as e:  # a failed read: counted, then a new connection
                link._failed(e)
                await self._close()
                await asyncio.sleep(min(0.05, link.cfg.timeout_s))
                continue
            link._ok()
            for name, entries in reply or ():
                found = self._subs.get(name.decode() if isinstance(name, bytes) else name)
                if found is not None and entries:
                    found._deliver(entries)
        await self._close()

    async def _close(self) -> None:
        client, self._client, self._client_id = self._client, None, None
        if client is not None:
            try:
                await client.aclose()
            except (RedisError, OSError):
                pass

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close()
