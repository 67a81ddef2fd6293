"""Flights shared across replicas, over Redis (or Redis Cluster).

One herd process coalesces what it sees; replicas behind a load balancer share their
flights through Redis so that one burst still makes one upstream call:

    claim(key) --SET NX lease--> leader:   call the upstream as usual; a side task renews the
                                           lease and XADDs each chunk to the flight's stream
               --lease taken---> follower: a local flight whose work mirrors the remote stream
                                           (XREAD from the first entry, then live); local
                                           waiters join that flight as they join any other

Every key of one flight carries the flight key as its hash tag, so it lives in one slot:

    {prefix}:{<key>}:lease        "<replica>:<flight id>", PX lease_s, renewed every lease_s/3
    {prefix}:{<key>}:s:<flight>   the leader's stream: {c: chunk JSON}..., then {e: ok|err, ...}
    {prefix}:{<key>}:w            followers' heartbeats (zset, score = expiry in ms): while any
                                  is alive the leader keeps its upstream call going, even when
                                  its own clients have all left
    {prefix}:{<key>}:answer       the result cache (proxy.redis_cache)

`<key>` is the gateway's keyed digest (tenant hash, route, model, parameters, messages);
values are ids, chunk JSON and error bodies, never a client key. Every key has a TTL.

Takeover: a follower that finds the lease gone (or held by someone else) before the stream
ended claims it and calls the upstream itself, or follows whoever did. A new source replays
from its first chunk; the chunks this replica already gave its waiters must match it exactly
(choices and deltas), or the flight fails with a 502 rather than splice two different answers.

Degradation: every Redis call runs under `timeout_s`. Any error or timeout marks Redis down:
herd serves locally (local flights, memory cache) and probes Redis every `retry_after_s`
until it answers, then shares again. A Redis problem never fails a request.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from proxy.chunks import Chunk
from proxy.coalescer import Flight, FlightCancelled, Group, Ticket
from proxy.config import RedisConfig
from proxy.errors import HerdError, UpstreamError, UpstreamUnavailable, as_herd_error
from proxy.metrics import Metrics

log = logging.getLogger("herd.shared")

T = TypeVar("T")

# A lease is ours only while it holds our value: renew and release compare first.
_CLAIM = """
local v = redis.call('get', KEYS[1])
if v then return v end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Writes that may create a key set its TTL in the same script, so no key ever lives without one.
# ARGV: ttl_ms, then per entry: its number of field/value pairs, then the pairs.
_APPEND = """
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local entry = {KEYS[1], '*'}
  for j = 1, 2 * n do entry[#entry + 1] = ARGV[i + j] end
  redis.call('xadd', unpack(entry))
  i = i + 1 + 2 * n
end
return redis.call('pexpire', KEYS[1], ARGV[1])
"""
# A follower's heartbeat (KEYS: watchers, lease; ARGV: expiry ms, member, ttl ms): who leads now?
_BEAT = """
redis.call('zadd', KEYS[1], ARGV[1], ARGV[2])
redis.call('pexpire', KEYS[1], ARGV[3])
return redis.call('get', KEYS[2])
"""


class RedisUnavailable(Exception):
    """Redis is down, slow or marked down for now: do it locally."""


class LeaderLost(UpstreamUnavailable):
    """The leading replica was lost mid-stream and the new answer differs from what was sent."""


class RedisLink:
    """The Redis client plus its health: every operation goes through `run`."""

    def __init__(self, cfg: RedisConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.replica = secrets.token_hex(6)  # this process, in lease values and heartbeats
        self.up = False
        self.client: Redis | RedisCluster | None = None
        self._probe: asyncio.Task | None = None
        self._gauge = metrics.redis_up.labels("cluster" if cfg.cluster else "standalone")
        self._gauge.set(0)

    def key(self, flight_key: str, part: str) -> str:
        return f"{self.cfg.key_prefix}:{{{flight_key}}}:{part}"

    async def start(self) -> None:
        options: dict[str, Any] = {
            "socket_connect_timeout": self.cfg.timeout_s,
            "socket_timeout": None,  # every call has its own deadline (run); XREAD blocks on purpose
            "retry": Retry(NoBackoff(), 1),  # one immediate retry: a stale connection after a restart
            "health_check_interval": 0,
        }
        if self.cfg.cluster:
            self.client = RedisCluster.from_url(self.cfg.url, max_connections=4096, **options)
        else:
            self.client = Redis.from_url(self.cfg.url, **options)
        try:
            async with asyncio.timeout(max(self.cfg.timeout_s, 2.0)):
                if self.cfg.cluster:
                    await self.client.initialize()
                await self.client.ping()
        except Exception as e:
            self.trouble(e)
            return
        self._set_up()

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        if self.client is not None:
            try:
                await self.client.aclose()
            except (RedisError, OSError):
                pass

    async def run(self, op: Callable[[Any], Awaitable[T]], timeout: float | None = None) -> T:
        """`op(client)` within the timeout; any trouble marks Redis down and raises RedisUnavailable."""
        if not self.up or self.client is None:
            raise RedisUnavailable("redis is marked down")
        try:
            async with asyncio.timeout(self.cfg.timeout_s if timeout is None else timeout):
                return await op(self.client)
        except Exception as e:  # whatever goes wrong with Redis, the request goes on without it
            self.trouble(e)
            raise RedisUnavailable(type(e).__name__) from None

    def trouble(self, error: BaseException) -> None:
        if isinstance(error, (TimeoutError, RedisTimeout)):
            kind = "timeout"
        elif isinstance(error, (RedisConnectionError, OSError)):
            kind = "connection"
        else:
            kind = "other"
        self.metrics.redis_errors.labels(kind).inc()
        if self.up or self._probe is None:
            log.warning("redis %s (%s): serving local-only, retrying every %.1fs", kind, type(error).__name__,
                        self.cfg.retry_after_s)
        self.up = False
        self._gauge.set(0)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up(), name="redis-probe")

    def _set_up(self) -> None:
        self.up = True
        self._gauge.set(1)

    async def _probe_until_up(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.retry_after_s)
            try:
                async with asyncio.timeout(max(self.cfg.timeout_s, 1.0)):
                    await self.client.ping()  # type: ignore[union-attr]
            except Exception as e:
                self.metrics.redis_errors.labels("probe").inc()
                log.debug("redis still down: %s", type(e).__name__)
                continue
            log.warning("redis is back: sharing flights and answers again")
            self._set_up()
            return


@dataclass
class Claim:
    lead: bool
    holder: str  # the lease value: "<replica>:<flight id>"

    @property
    def flight_id(self) -> str:
        return self.holder.rpartition(":")[2]


class Splice:
    """Where a mirrored flight's chunks go: the local flight, through a prefix check.

    Each source (the leader's stream, a takeover's stream, our own takeover call) starts
    from its first chunk. Chunks the flight already has must match; the rest are published,
    with the id and creation time of the flight's first chunk, so clients see one stream.
    """

    def __init__(self, flight: Flight) -> None:
        self.flight = flight
        self.index = 0

    def restart(self) -> None:
        self.index = 0

    def publish(self, chunk: Chunk) -> None:
        chunks = self.flight.chunks
        if self.index < len(chunks):
            if (chunks[self.index].data.get("choices") or []) != (chunk.data.get("choices") or []):
                raise LeaderLost(
                    "the leading replica was lost mid-stream and the new answer differs from the part already sent",
                    code="leader_lost",
                )
            self.index += 1
            return
        if chunks:
            head = chunks[0].data
            if chunk.data.get("id") != head.get("id") or chunk.data.get("created") != head.get("created"):
                chunk = Chunk({**chunk.data, "id": head.get("id"), "created": head.get("created")})
        self.flight.publish(chunk)
        self.index += 1

    def extend(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            self.publish(chunk)

    def complete(self) -> None:
        """The source ended cleanly: it must have covered everything already sent."""
        if self.index < len(self.flight.chunks):
            raise LeaderLost("the leading replica was lost mid-stream and the new answer is shorter than the part "
                             "already sent", code="leader_lost")


Call = Callable[[Any], Awaitable[None]]  # runs the upstream call, publishing into a sink


class SharedFlights:
    """Cross-replica flights: claim, publish (leader side) and mirror (follower side)."""

    def __init__(self, link: RedisLink, group: Group, metrics: Metrics) -> None:
        self.link = link
        self.group = group
        self.metrics = metrics
        cfg = link.cfg
        self.lease_ms = int(cfg.lease_s * 1000)
        self.tick_s = cfg.lease_s / 3  # renew and heartbeat cadence
        self.stream_ttl_ms = self.lease_ms * 2
        self._tasks: set[asyncio.Task] = set()

    @property
    def usable(self) -> bool:
        return self.link.up

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.link.cfg.lease_s)

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- claim -------------------------------------------------------------------------
    async def claim(self, key: str, flight_id: str) -> Claim | None:
        """Lead the flight of `key` across replicas, or learn who does; None: Redis is unusable."""
        mine = f"{self.link.replica}:{flight_id}"
        lease = self.link.key(key, "lease")
        try:
            held = await self.link.run(lambda r: r.eval(_CLAIM, 1, lease, mine, self.lease_ms))
        except RedisUnavailable:
            return None
        if held is None:
            return Claim(True, mine)
        return Claim(False, held.decode() if isinstance(held, bytes) else str(held))

    # -- leader side -------------------------------------------------------------------
    def lead(self, key: str, flight: Flight, claim: Claim, redact: tuple[str, ...] = ()) -> None:
        """Publish `flight` (a local flight we lead) to its stream while it runs.

        `redact`: secrets (the client's key, provider keys) cut out of an error body before
        it goes to Redis, should an upstream echo one."""
        self.metrics.shared_flights.labels("lead").inc()
        self._spawn(self._publish(key, flight, claim.holder, redact), f"publish-{flight.id}")

    async def _publish(self, key: str, flight: Flight, holder: str, redact: tuple[str, ...]) -> None:
        link = self.link
        lease, stream, watchers = link.key(key, "lease"), link.key(key, f"s:{claim_id(holder)}"), link.key(key, "w")
        loop = asyncio.get_running_loop()
        chunks = aiter(flight.follow())
        upcoming = asyncio.ensure_future(anext(chunks, None))
        sent = 0
        held: Ticket | None = None  # held while followers on other replicas wait on the flight
        next_tick = loop.time()  # the first round checks for followers at once
        try:
            while True:
                await asyncio.wait((upcoming,), timeout=max(0.0, next_tick - loop.time()))
                ended = False
                if upcoming.done():
                    if upcoming.result() is None:
                        ended = True
                    else:
                        upcoming = asyncio.ensure_future(anext(chunks, None))
                batch = flight.chunks[sent:]
                tick = loop.time() >= next_tick
                if ended:
                    break
                if not batch and not tick:
                    continue
                first = sent == 0
                now_ms = int(time.time() * 1000)

                async def send(r, batch=batch, first=first, tick=tick, now_ms=now_ms):
                    pipe = r.pipeline(transaction=False)
                    if batch:
                        self._append(pipe, stream, self._entries(flight, batch, first))
                    if tick:
                        pipe.eval(_RENEW, 1, lease, holder, self.lease_ms)
                        self._append(pipe, stream, [])  # keep the stream while the flight runs
                    pipe.zremrangebyscore(watchers, "-inf", now_ms)
                    pipe.zcard(watchers)
                    return await pipe.execute()

                results = await link.run(send)
                sent += len(batch)
                if tick:
                    next_tick = loop.time() + self.tick_s
                    if not results[1 if batch else 0]:
                        log.warning("flight %s lost its lease; no longer shared", flight.id)
                        return
                held = self._hold(flight, held, bool(results[-1]))
            # the flight is done: tell the followers how it ended, then let the lease go
            error = flight.error
            end = None if isinstance(error, FlightCancelled) else _end_fields(error, redact)

            async def finish(r):
                pipe = r.pipeline(transaction=False)
                entries = self._entries(flight, flight.chunks[sent:], sent == 0)
                if end is not None:
                    entries.append(end)
                if entries:
                    self._append(pipe, stream, entries)
                pipe.eval(_RELEASE, 1, lease, holder)
                return await pipe.execute()

            await link.run(finish)
        except RedisUnavailable:
            pass  # the followers will find the lease gone and take over
        finally:
            upcoming.cancel()
            await asyncio.gather(upcoming, return_exceptions=True)
            await chunks.aclose()
            self._hold(flight, held, False)

    @staticmethod
    def _entries(flight: Flight, chunks: list[Chunk], first: bool) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = [{"c": chunk.raw} for chunk in chunks]
        if first and entries and flight.served_by:
            entries[0]["u"] = flight.served_by  # who answered, for x-herd-upstream
        return entries

    def _append(self, pipe, stream: str, entries: list[dict[str, Any]]) -> None:
        """XADD each entry, then PEXPIRE, in one script: the stream never exists without a TTL."""
        args: list[Any] = [self.stream_ttl_ms]
        for fields in entries:
            args.append(len(fields))
            for name, value in fields.items():
                args += (name, value)
        pipe.eval(_APPEND, 1, stream, *args)

    def _hold(self, flight: Flight, held: Ticket | None, want: bool) -> Ticket | None:
        """Be (or stop being) a waiter of `flight` for the followers on other replicas."""
        if want and held is None and not flight.done and flight.waiters > 0:
            return self.group.join(flight)
        if held is not None and not want:
            self.group.release(held)
            return None
        return held

    # -- follower side -----------------------------------------------------------------
    async def mirror(self, key: str, claim: Claim, flight: Flight, call: Call,
                     on_lead: Callable[[Claim], None]) -> bool:
        """The work of a flight led on another replica. True if this replica called the upstream."""
        self.metrics.shared_flights.labels("follow").inc()
        link = self.link
        splice = Splice(flight)
        me = f"{link.replica}:{flight.id}"
        watchers = link.key(key, "w")
        try:
            while True:
                splice.restart()
                if await self._follow(key, claim.holder, splice, me):
                    return False
                log.warning("flight %s: the leading replica was lost mid-flight; taking over", flight.id)
                self.metrics.shared_flights.labels("takeover").inc()
                claim = await self.claim(key, flight.id)
                if claim is None:
                    break  # Redis went away: finish it here
                if claim.lead:
                    await self._forget_watcher(watchers, me)
                    on_lead(claim)
                    splice.restart()
                    await call(splice)
                    splice.complete()
                    return True
        except RedisUnavailable:
            log.warning("flight %s: redis went away mid-flight; calling the upstream from here", flight.id)
            self.metrics.shared_flights.labels("takeover").inc()
        finally:
            self._spawn(self._forget_watcher(watchers, me), f"unwatch-{flight.id}")
        splice.restart()
        await call(splice)
        splice.complete()
        return True

    async def _follow(self, key: str, holder: str, splice: Splice, me: str) -> bool:
        """Feed `splice` from the stream of `holder`'s flight: True when it ended, False when the
        leader is gone without ending it. Raises the leader's error, or RedisUnavailable."""
        link = self.link
        lease, stream, watchers = link.key(key, "lease"), link.key(key, f"s:{claim_id(holder)}"), link.key(key, "w")
        loop = asyncio.get_running_loop()
        block_ms = max(10, int(self.tick_s * 1000))
        last = b"0-0"
        next_tick = loop.time()

        def take(reply) -> bool:
            nonlocal last
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    if b"c" in fields:
                        if b"u" in fields:
                            splice.flight.served_by = fields[b"u"].decode(errors="replace")
                        raw = fields[b"c"]
                        try:
                            chunk = Chunk(orjson.loads(raw), raw)
                        except orjson.JSONDecodeError:
                            raise RedisUnavailable("an unreadable stream entry") from None
                        splice.publish(chunk)
                    elif b"e" in fields:
                        if fields[b"e"] != b"ok":
                            raise _end_error(fields)
                        splice.complete()
                        return True
            return False

        while True:
            if loop.time() >= next_tick:
                expires = int(time.time() * 1000) + self.lease_ms
                current = await link.run(
                    lambda r, expires=expires: r.eval(_BEAT, 2, watchers, lease, expires, me, self.stream_ttl_ms)
                )
                next_tick = loop.time() + self.tick_s
                if current is None or current.decode() != holder:
                    # gone: unless it ended just now, the flight is ours to finish
                    return take(await link.run(lambda r, last=last: r.xread({stream: last}, count=1024)))
            wait_ms = max(1, min(block_ms, int((next_tick - loop.time()) * 1000)))
            reply = await link.run(lambda r, last=last, wait_ms=wait_ms: r.xread({stream: last}, count=1024,
                                                                                  block=wait_ms),
                                   timeout=wait_ms / 1000 + link.cfg.timeout_s)
            if take(reply):
                return True

    async def _forget_watcher(self, watchers: str, me: str) -> None:
        try:
            await self.link.run(lambda r: r.zrem(watchers, me))
        except RedisUnavailable:
            pass


def claim_id(holder: str) -> str:
    return holder.rpartition(":")[2]


def _end_fields(error: BaseException | None, redact: tuple[str, ...]) -> dict[str, Any]:
    """The stream's last entry: ok, or the error every follower will answer with."""
    if error is None:
        return {"e": "ok"}
    herd = as_herd_error(error, "in a flight shared over Redis")
    body = herd.body_bytes()
    for secret in redact:
        if secret:
            body = body.replace(secret.encode(), b"[redacted]")
    fields: dict[str, Any] = {"e": "err", "st": str(herd.status), "b": body, "ct": herd.content_type}
    if herd.headers.get("retry-after"):
        fields["ra"] = herd.headers["retry-after"]
    return fields


def _end_error(fields: dict[bytes, bytes]) -> HerdError:
    """The leader's error, as every follower answers it: its status and body."""
    try:
        status = int(fields.get(b"st", b"502"))
        headers = {"retry-after": fields[b"ra"].decode()} if b"ra" in fields else None
        content_type = fields.get(b"ct", b"application/json").decode()
    except (ValueError, UnicodeDecodeError):
        return UpstreamUnavailable("the leading replica failed", code="leader_failed")
    return UpstreamError(status, fields.get(b"b", b""), content_type=content_type, headers=headers)
