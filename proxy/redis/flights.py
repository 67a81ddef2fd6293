"""Flights shared across replicas, over Redis (or Redis Cluster).

One herd process coalesces what it sees; replicas behind a load balancer share their
flights through Redis so that one burst still makes one upstream call:

    claim(key) --SET NX lease--> leader:   call the upstream as usual; a side task renews the
                                           lease and XADDs each chunk to the flight's stream
               --lease taken---> follower: a local flight whose work mirrors the remote stream
                                           (from the first entry, then live); local waiters
                                           join that flight as they join any other

Every key of one flight carries the flight key as its hash tag, so it lives in one slot:

    {prefix}:{<key>}:lease        "<replica>:<flight id>", PX lease_s, renewed every lease_s/3
    {prefix}:{<key>}:s:<flight>   the leader's stream: {c: chunk JSON}..., then {e: ok|err, ...};
                                  the first chunk says who answered (u) and whether the call was
                                  non-stream (w); {r} means the answer starts over (a rewind)
    {prefix}:{<key>}:w            followers' heartbeats (zset, score = expiry in ms): while any
                                  is alive the leader keeps its upstream call going, even when
                                  its own clients have all left
    {prefix}:{<key>}:answer       the result cache (proxy.redis.cache)

`<key>` is the gateway's keyed digest (tenant hash, route, model, parameters, messages);
values are ids, chunk JSON and error bodies, never a client key. Every key has a TTL.

Takeover: a follower that finds the lease gone (or held by someone else) before the stream
ended claims it and calls the upstream itself (the way the leader did: stream or not), or
follows whoever did. A new source replays from its first chunk; while it repeats what the
flight has it must match (Splice); if it differs the flight starts over (Flight.rewind):
waiters sent none of the old answer get the new one, a stream sent part of it ends with a
502 leader_lost, and nobody gets a splice of two answers.

Degradation (proxy.redis.link): a call that fails or outlasts `timeout_s` raises
RedisUnavailable and the flight goes on here: a claim without a reply leads (and publishes,
in case the lease was taken after all), a mirror that loses Redis calls the upstream
itself. A Redis problem never fails a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from proxy.chunks import Chunk
from proxy.coalescer import Flight, FlightCancelled, Group, Ticket
from proxy.metrics import Metrics
from proxy.redis.link import Link, RedisUnavailable
from proxy.sharing import Call, Claim, Splice, claim_id, end_error, end_fields

log = logging.getLogger("herd.shared")

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


#: How often a publisher whose local clients have all left asks whether followers elsewhere
#: still watch: when none do, the upstream call is cancelled.
LONELY_CHECK_S = 0.1


class SharedFlights:
    """Cross-replica flights: claim, publish (leader side) and mirror (follower side)."""

    def __init__(self, link: Link, group: Group, metrics: Metrics) -> None:
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

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- claim -------------------------------------------------------------------------
    async def claim(self, key: str, flight_id: str) -> Claim:
        """Lead the flight of `key` across replicas, or learn who does.

        When the claim fails (Redis slow or down) we lead: the claim may still have taken the
        lease, and then followers elsewhere read our stream; if it did not, our first renewal
        finds the lease is not ours and the flight goes on unshared."""
        [claim] = await self.claim_many([(key, flight_id)])
        return claim

    async def claim_many(self, flights: list[tuple[str, str]]) -> list[Claim]:
        """`claim` for each (key, flight id), in one pipeline (an embeddings request's inputs)."""
        mine = [f"{self.link.replica}:{flight_id}" for _, flight_id in flights]

        def add(pipe: Any) -> None:
            for (key, _), value in zip(flights, mine, strict=True):
                pipe.eval(_CLAIM, 1, self.link.key(key, "lease"), value, self.lease_ms)

        try:
            held = await self.link.call(add)
        except RedisUnavailable:
            return [Claim(True, value) for value in mine]
        return [Claim(True, value) if h is None else Claim(False, h.decode() if isinstance(h, bytes) else str(h))
                for h, value in zip(held, mine, strict=True)]

    # -- leader side -------------------------------------------------------------------
    def lead(self, key: str, flight: Flight, claim: Claim, redact: tuple[str, ...] = ()) -> None:
        """Publish `flight` (a local flight we lead) to its stream while it runs.

        The publisher waits on the flight like a client: while followers on other replicas
        watch it, the upstream call goes on even when every client here has left.
        `redact`: secrets (the client's key, provider keys) cut out of an error body before
        it goes to Redis, should an upstream echo one."""
        if not self.link.up:
            return  # local-only for now: nobody could read the stream
        self.metrics.shared_flights.labels("lead").inc()
        held = self.group.join(flight)  # before any await: the flight cannot end under us
        self._spawn(self._publish(key, flight, claim.holder, redact, held), f"publish-{flight.id}")

    async def _publish(self, key: str, flight: Flight, holder: str, redact: tuple[str, ...],
                       held: Ticket | None) -> None:
        link = self.link
        lease, stream, watchers = link.key(key, "lease"), link.key(key, f"s:{claim_id(holder)}"), link.key(key, "w")
        loop = asyncio.get_running_loop()
        sent = 0  # chunks in the stream
        rewinds = flight.rewinds
        restart = False  # the flight was rewound: the stream starts over
        next_tick = loop.time() + self.tick_s
        next_check = loop.time()
        change: asyncio.Future | None = None
        try:
            while not flight.done:
                if flight.rewinds != rewinds:
                    rewinds, sent, restart = flight.rewinds, 0, True
                batch = flight.chunks[sent:]
                now = loop.time()
                tick = now >= next_tick
                lonely = False  # every client here has left: do followers elsewhere still watch?
                if now >= next_check:
                    lonely = held is not None and flight.waiters == 1
                    if not lonely:
                        next_check = now + LONELY_CHECK_S
                if not (batch or tick or lonely or restart):
                    if change is None or change.done():
                        change = asyncio.ensure_future(flight.changed())
                    await asyncio.wait((change,), timeout=max(0.0, min(next_tick, next_check) - now))
                    continue
                entries = self._entries(flight, batch, sent == 0, restart)
                now_ms = int(time.time() * 1000)

                def send(pipe, entries=entries, tick=tick, now_ms=now_ms) -> None:
                    if entries:
                        self._append(pipe, stream, entries)
                    if tick:
                        pipe.eval(_RENEW, 1, lease, holder, self.lease_ms)
                        self._append(pipe, stream, [])  # keep the stream while the flight runs
                    pipe.zremrangebyscore(watchers, "-inf", now_ms)
                    pipe.zcard(watchers)

                results = await link.call(send)
                sent += len(batch)
                restart = False
                next_check = loop.time() + LONELY_CHECK_S
                if tick:
                    next_tick = loop.time() + self.tick_s
                    if not results[1 if entries else 0]:
                        log.warning("flight %s lost its lease; no longer shared", flight.id)
                        return
                if held is not None and flight.waiters == 1 and not results[-1]:
                    # nobody here, nobody watching elsewhere: let go (the last one out cancels)
                    self.group.release(held)
                    held = None
            # the flight is done: tell the followers how it ended, then let the lease go
            if flight.rewinds != rewinds:
                sent, restart = 0, True
            error = flight.error
            end = None if isinstance(error, FlightCancelled) else end_fields(error, redact)
            entries = self._entries(flight, flight.chunks[sent:], sent == 0, restart)
            if end is not None:
                entries.append(end)

            def finish(pipe) -> None:
                if entries:
                    self._append(pipe, stream, entries)
                pipe.eval(_RELEASE, 1, lease, holder)

            await link.call(finish)
        except RedisUnavailable:
            pass  # the followers will find the lease gone and take over
        finally:
            if change is not None:
                change.cancel()
            if held is not None:
                self.group.release(held)

    @staticmethod
    def _entries(flight: Flight, chunks: list[Chunk], first: bool, restart: bool = False) -> list[dict[str, Any]]:
        """Stream entries for `chunks`; the first chunk of an answer says who answered and how,
        and after a rewind an entry tells followers that a new answer starts."""
        entries: list[dict[str, Any]] = [{"c": chunk.raw} for chunk in chunks]
        if first and entries:
            if flight.served_by:
                entries[0]["u"] = flight.served_by  # who answered, for x-herd-upstream
            if chunks[0].whole is not None:
                entries[0]["w"] = "1"  # a non-stream call: a takeover calls the same way
        if restart:
            entries.insert(0, {"r": "1"})
        return entries

    def _append(self, pipe, stream: str, entries: list[dict[str, Any]]) -> None:
        """XADD each entry, then PEXPIRE, in one script: the stream never exists without a TTL."""
        args: list[Any] = [self.stream_ttl_ms]
        for fields in entries:
            args.append(len(fields))
            for name, value in fields.items():
                args += (name, value)
        pipe.eval(_APPEND, 1, stream, *args)

    # -- follower side -----------------------------------------------------------------
    async def mirror(self, key: str, claim: Claim, flight: Flight, call: Call, stream: bool,
                     on_lead: Callable[[Claim], None]) -> bool:
        """The work of a flight led on another replica. True if this replica called the upstream
        (`stream`: how, unless the leader's answer already showed how it called)."""
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
                taken = await self.claim(key, flight.id)
                if taken.lead:
                    await self._forget_watcher(watchers, me)
                    on_lead(taken)
                    break
                claim = taken  # another replica took over: follow it
        except RedisUnavailable:
            log.warning("flight %s: redis went away mid-flight; calling the upstream from here", flight.id)
            self.metrics.shared_flights.labels("takeover").inc()
        finally:
            self._spawn(self._forget_watcher(watchers, me), f"unwatch-{flight.id}")
        splice.restart()
        await call(splice, stream if splice.whole is None else not splice.whole)
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
                    if b"r" in fields:  # the leader's answer starts over (it took over and it differs)
                        splice.restart()
                    if b"c" in fields:
                        if b"u" in fields:
                            splice.flight.served_by = fields[b"u"].decode(errors="replace")
                        if splice.index == 0:
                            splice.whole = b"w" in fields
                        raw = fields[b"c"]
                        try:
                            chunk = Chunk(orjson.loads(raw), raw)
                        except orjson.JSONDecodeError:
                            raise RedisUnavailable("an unreadable stream entry") from None
                        splice.publish(chunk)
                    elif b"e" in fields:
                        if fields[b"e"] != b"ok":
                            raise end_error(fields)
                        splice.complete()
                        return True
            return False

        # standalone: one reader for every followed stream; a cluster: a blocking read of its own
        sub = None if link.cfg.cluster else link.subscribe(stream)
        try:
            while True:
                if loop.time() >= next_tick:
                    expires = int(time.time() * 1000) + self.lease_ms

                    def beat(pipe: Any, expires: int = expires) -> None:
                        pipe.eval(_BEAT, 2, watchers, lease, expires, me, self.stream_ttl_ms)

                    [current] = await link.call(beat)
                    next_tick = loop.time() + self.tick_s
                    if current is None or current.decode() != holder:
                        # gone: unless it ended just now, the flight is ours to finish
                        if sub is not None and take([(stream, await sub.take(0))]):
                            return True
                        def read(pipe: Any, last: bytes = last) -> None:
                            pipe.xread({stream: last}, count=1024)

                        [reply] = await link.call(read)
                        return take(reply)
                wait_s = max(0.001, min(block_ms / 1000, next_tick - loop.time()))
                if sub is not None:
                    reply = [(stream, await sub.take(wait_s))]
                else:
                    def blocking_read(r: Any, last: bytes = last, wait_ms: int = int(wait_s * 1000) or 1) -> Any:
                        return r.xread({stream: last}, count=1024, block=wait_ms)

                    reply = await link.run(blocking_read, timeout=wait_s + link.cfg.timeout_s)
                if take(reply):
                    return True
        finally:
            if sub is not None:
                link.unsubscribe(sub)

    async def _forget_watcher(self, watchers: str, me: str) -> None:
        try:
            await self.link.call(lambda pipe: pipe.zrem(watchers, me))
        except RedisUnavailable:
            pass
