"""Flights and cached answers shared by the worker processes of one node (`[server]
workers = N`, without Redis or while it is down).

Each worker coalesces what it sees; the workers of a node share their flights so that one
burst still makes one upstream call, whichever workers its requests land on:

    claim(key) --slot free------------> leader: call the upstream as usual; the flight is
                                        registered so that siblings can follow it
               --slot held by a live--> follower: a local flight whose work mirrors the
                 sibling                owner's flight over the owner's Unix socket (from its
                                        first chunk, then live); local waiters join that local
                                        flight as they join any other

The claims live in a table of fixed size in a file of the node's private directory (mode
0700, made by the supervisor, proxy.workers), mapped into every worker: buckets of 8 slots,
a bucket per 16-byte digest of a flight key; a slot holds a digest, the owner's worker index,
pid and flight id. A claim is a POSIX record lock on its bucket, a read and maybe a write: a
few microseconds, no await, so a unique request costs nothing else. The locks are the
kernel's, so a worker that dies holding one cannot wedge the others. Keys that share a bucket
take a slot each; a key whose bucket is full of other keys' live flights is not shared (it
leads alone); a stale slot (its owner died or forgot) is taken over.

Each worker listens on `<dir>/w<index>.sock` for its siblings only (the directory is the
access check: nothing of this is on the public port). Three requests:

    follow <flight id>  ->  frames: u (who answered), c (a chunk), W (the previous chunk's
                            whole non-stream body), then e (how it ended: ok or the error);
                            g: no such flight (or, asked with F, not one still running)
    answer <key>        ->  A: the seconds it has left (f64) and the cached answer
                            (Answer.encode); g: not in this worker's cache
    metrics             ->  this worker's own Prometheus text (for the node-wide /metrics)

Cached answers (NodeCache): each worker keeps the answers of its flights in its own memory
cache and notes the key in a second table, the answer directory: a slot per key digest,
naming the worker that kept it last. A worker that misses its own cache and finds a sibling
named asks that sibling for the answer and keeps a copy for the time it has left, so a
node's cache hits as one cache does, whichever worker a repeat lands on. The directory is a
hint: a slot two keys share names the later one, and the worker named may have dropped the
answer since; either way the ask is a miss.

A flight's slot is freed as it ends. A sibling whose first request of a burst comes just
after the end gets the answer from the cache (NodeCache): the leader notes the answer in the
directory before it frees the slot, and a worker that wins a claim looks there once more
(proxy.gateway), so a request that missed the cache just before the end and claimed just
after it gets the answer too, not a second upstream call.

A follower that loses its owner before the end (the worker died) takes over: it claims the
slot and calls the upstream itself through a Splice (proxy.sharing), so nobody gets a
splice of two answers. The owner holds a ticket on its flight while a sibling follows it, so
the call goes on when the owner's own clients have all left (and is cancelled when the
follower's clients leave too).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Gauge

from proxy.answer import Answer
from proxy.cache import MemoryCache
from proxy.chunks import Chunk
from proxy.coalescer import Flight, FlightCancelled, Group
from proxy.metrics import Metrics
from proxy.sharing import Call, Claim, Splice, end_error, end_fields

log = logging.getLogger("herd.node")

TABLE = "flights.table"
ANSWERS = "answers.table"
SLOTS = 1 << 16
# digest (16) | owner worker index + 1, 0 = free (u16) | owner pid (u32) | flight id (ascii, 22)
_SLOT = struct.Struct("<16sHI22s")
SLOT_BYTES = 48
assert _SLOT.size <= SLOT_BYTES
BUCKET_SLOTS = 8  # a key may sit in any slot of its bucket, so keys that share a bucket are all shared
BUCKET_BYTES = BUCKET_SLOTS * SLOT_BYTES
BUCKETS = SLOTS // BUCKET_SLOTS
_OWNER = 16  # where a slot's owner field starts: 0 is a free slot
_FREE = bytes(SLOT_BYTES)
# the answer directory: digest (16) | worker index + 1, 0 = free (u16) | its pid (u32)
_NOTE = struct.Struct("<16sHI")
NOTE_BYTES = 24
assert _NOTE.size <= NOTE_BYTES
_FRAME = struct.Struct("<cI")  # kind, payload length
_SECONDS = struct.Struct("<d")
MAX_FRAME = 64 * 1024 * 1024
CONNECT_TIMEOUT_S = 2.0


def socket_path(node_dir: str | os.PathLike, index: int) -> str:
    return str(Path(node_dir) / f"w{index}.sock")


def create_table(node_dir: str | os.PathLike) -> None:
    """The supervisor makes the claims table and the answer directory (zeros: every slot
    free) before starting workers."""
    for name, size in ((TABLE, SLOTS * SLOT_BYTES), (ANSWERS, SLOTS * NOTE_BYTES)):
        with open(Path(node_dir) / name, "wb") as f:
            f.truncate(size)


@functools.lru_cache(maxsize=4096)
def _key_digest(key: str) -> tuple[bytes, int]:
    """A flight key's 16-byte digest, and its first 8 bytes as a number (where both tables
    put the key). Memoized: a request asks for it up to five times (cache, claim, a second
    look, note, release)."""
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    return digest, int.from_bytes(digest[:8], "little")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _NodeTable:
    """A table in a file of the node's directory, mapped into this worker; its rows are found
    by a 16-byte digest of a key."""

    def __init__(self, node_dir: str | os.PathLike, index: int, name: str, size: int) -> None:
        self.index = index
        self.pid = os.getpid()
        self._fd = os.open(Path(node_dir) / name, os.O_RDWR)
        self._map = mmap.mmap(self._fd, size)

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    @staticmethod
    def _digest(key: str, rows: int, row_bytes: int) -> tuple[bytes, int]:
        """`key`'s digest and the offset of its row, of `rows` rows of `row_bytes`."""
        digest, number = _key_digest(key)
        return digest, (number % rows) * row_bytes


class ClaimTable(_NodeTable):
    """The node's flight claims: key digest -> (worker, pid, flight id), one lock per bucket."""

    def __init__(self, node_dir: str | os.PathLike, index: int) -> None:
        super().__init__(node_dir, index, TABLE, SLOTS * SLOT_BYTES)

    @classmethod
    def where(cls, key: str) -> tuple[bytes, int]:
        """`key`'s digest and the offset of its bucket."""
        return cls._digest(key, BUCKETS, BUCKET_BYTES)

    def _locked(self, offset: int, update: Callable[[], Any]) -> Any:
        """`update()` under the lock of the bucket at `offset`."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX, BUCKET_BYTES, offset)
        try:
            return update()
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, BUCKET_BYTES, offset)

    def _find(self, digest: bytes, offset: int) -> int:
        """The offset of the slot holding `digest` in the bucket at `offset`, or -1."""
        end = offset + BUCKET_BYTES
        at = self._map.find(digest, offset, end)
        while at >= 0 and (at - offset) % SLOT_BYTES:  # the digest's bytes across two fields
            at = self._map.find(digest, at + 1, end)
        return at

    def _spare(self, offset: int) -> int:
        """A free slot of the bucket at `offset`, else one whose owner died, else -1."""
        slots = range(offset, offset + BUCKET_BYTES, SLOT_BYTES)
        for at in slots:
            if self._map[at + _OWNER:at + _OWNER + 2] == b"\0\0":
                return at
        return next((at for at in slots if not _alive(_SLOT.unpack_from(self._map, at)[2])), -1)

    def claim(self, key: str, flight_id: str, *, replace: str | None = None) -> tuple[int, int, str] | None:
        """Claim `key` for our flight: None when it is ours now (or cannot be shared: its
        bucket is full of other keys' live flights), else (worker index, pid, flight id) of
        the owner. `replace`: take the slot over from that holder (it died or lost its flight)."""
        digest, offset = self.where(key)

        def update() -> Any:
            at = self._find(digest, offset)  # the key's own slot (a free one is zeros)
            if at >= 0:
                _, owner, pid, flight = _SLOT.unpack_from(self._map, at)
                holder = flight.rstrip(b"\0").decode()
                if pid != self.pid and holder != replace and _alive(pid):
                    return owner - 1, pid, holder
                # else ours from an earlier flight, a dead owner's, or the one replaced: take it
            else:  # a free slot, else one whose owner died, else none: the key is not shared
                at = self._spare(offset)
                if at < 0:
                    return None
            _SLOT.pack_into(self._map, at, digest, self.index + 1, self.pid, flight_id.encode())
            return None

        return self._locked(offset, update)

    def release(self, key: str, flight_id: str) -> None:
        """Free `key`'s slot if it still holds our flight."""
        digest, offset = self.where(key)

        def update() -> None:
            at = self._find(digest, offset)
            if at >= 0:
                _, _, pid, flight = _SLOT.unpack_from(self._map, at)
                if pid == self.pid and flight.rstrip(b"\0").decode() == flight_id:
                    self._map[at:at + SLOT_BYTES] = _FREE

        self._locked(offset, update)


class AnswerDirectory(_NodeTable):
    """Which worker of the node keeps which cached answer: key digest -> (worker, pid), the
    last worker that noted it. Written without a lock: a reader checks the digest and that
    the worker is alive, and a worker that no longer has the answer says so."""

    def __init__(self, node_dir: str | os.PathLike, index: int) -> None:
        super().__init__(node_dir, index, ANSWERS, SLOTS * NOTE_BYTES)

    @classmethod
    def _where(cls, key: str) -> tuple[bytes, int]:
        return cls._digest(key, SLOTS, NOTE_BYTES)

    def note(self, key: str) -> None:
        """This worker keeps `key`'s answer now."""
        digest, offset = self._where(key)
        _NOTE.pack_into(self._map, offset, digest, self.index + 1, self.pid)

    def holder(self, key: str) -> int | None:
        """The sibling that noted `key` last, if it is alive (None: nobody, or this worker)."""
        digest, offset = self._where(key)
        held, owner, pid = _NOTE.unpack_from(self._map, offset)
        if held != digest or not owner or pid == self.pid or not _alive(pid):
            return None
        return owner - 1


@dataclass
class Worker:
    """Who this process is on its node."""

    node_dir: str
    index: int
    count: int


async def _write(writer: asyncio.StreamWriter, kind: bytes, payload: bytes = b"") -> None:
    writer.write(_FRAME.pack(kind, len(payload)) + payload)
    await writer.drain()


async def _read(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind, size = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    if size > MAX_FRAME:
        raise ConnectionError("a frame over the limit")
    return kind, await reader.readexactly(size)


class NodeFlights:
    """Flights shared by the workers of a node; the same interface as SharedFlights
    (proxy.redis.flights), so the gateway drives both alike."""

    def __init__(self, worker: Worker, group: Group, metrics: Metrics,
                 render_metrics: Callable[[], bytes] | None = None) -> None:
        self.worker = worker
        self.group = group
        self.metrics = metrics
        self.render_metrics = render_metrics or metrics.render
        self.table = ClaimTable(worker.node_dir, worker.index)
        self.answers = AnswerDirectory(worker.node_dir, worker.index)
        # what this worker's cache holds for a key (NodeCache sets it): answers siblings' asks
        self.cache_entry: Callable[[str], tuple[Answer, float] | None] = lambda key: None
        # summed over the node by merge_metrics: how many workers answered the scrape
        Gauge("herd_workers", "Worker processes of this node that answered this scrape ([server] workers)",
              registry=metrics.registry).set(1)
        self._led: dict[str, tuple[Flight, tuple[str, ...]]] = {}  # flight id -> flight we lead, secrets
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        # the counters (and histograms) of this index's previous processes, if any
        self._carried: bytes | None = None
        self._reported_path = Path(worker.node_dir) / f"w{worker.index}.metrics"

    async def start(self) -> None:
        path = socket_path(self.worker.node_dir, self.worker.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a previous process of this index
        try:  # its counters, as the node last reported them
            self._carried = merge_metrics([self._reported_path.read_bytes()], kinds=_CARRIED)
        except FileNotFoundError:
            pass  # the first process of this index
        except (OSError, ValueError) as e:  # unreadable: start from zero rather than not at all
            log.warning("the counters of worker %d's previous process are lost: %s", self.worker.index, e)
        self._server = await asyncio.start_unix_server(self._serve, path=path)

    def own_metrics(self) -> bytes:
        """This worker's metrics for the node's total, its counters carrying on from the
        previous processes of its index (a restart does not take the node's totals back, which
        Prometheus would read as a reset of the whole node's counters). What it reports is
        kept in the node's directory for the next process of this index."""
        text = self.render_metrics()
        if self._carried is not None:
            text = merge_metrics([text, self._carried])
        with contextlib.suppress(OSError):
            part = self._reported_path.with_suffix(".part")
            part.write_bytes(text)
            part.replace(self._reported_path)
        return text

    async def aclose(self) -> None:
        """After the group's flights finished (siblings may have followed them until then)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.table.close()
        self.answers.close()

    # -- claim and lead (as SharedFlights) ----------------------------------------------
    async def claim(self, key: str, flight_id: str) -> Claim:
        return self.claim_now(key, flight_id)

    async def claim_many(self, flights: list[tuple[str, str]]) -> list[Claim]:
        """`claim` for each (key, flight id) (an embeddings request's inputs)."""
        return [self.claim_now(key, flight_id) for key, flight_id in flights]

    def claim_now(self, key: str, flight_id: str, replace: str | None = None) -> Claim:
        owner = self.table.claim(key, flight_id, replace=replace)
        if owner is None:
            return Claim(True, f"{self.worker.index}:{os.getpid()}:{flight_id}")
        index, pid, holder = owner
        return Claim(False, f"{index}:{pid}:{holder}")

    def lead(self, key: str, flight: Flight, claim: Claim, redact: tuple[str, ...] = ()) -> None:
        """Let siblings follow `flight` (a local flight we lead) until it ends; then free its slot."""
        self.metrics.shared_flights.labels("lead").inc()
        self._led[flight.id] = (flight, redact)

        def forget(_: Any) -> None:
            self._led.pop(flight.id, None)
            self.table.release(key, flight.id)

        if flight.task is not None:
            flight.task.add_done_callback(forget)

    # -- follower side -----------------------------------------------------------------
    async def mirror(self, key: str, claim: Claim, flight: Flight, call: Call, stream: bool,
                     on_lead: Callable[[Claim], None], *, fresh: bool = False) -> bool:
        """The work of a flight a sibling leads: its chunks as they come. If the sibling
        cannot be reached or is lost before the end, this worker takes the flight over and
        calls the upstream. Always True (SharedFlights says whether this replica called the
        upstream, the gateway then keeps the answer): each worker's memory cache is its own,
        so a follower keeps the answer it mirrored. `fresh`: the request must not be answered
        from a flight that already ended (cache-control: no-cache, or no cache)."""
        self.metrics.shared_flights.labels("follow").inc()
        splice = Splice(flight)
        holder = claim.holder
        while True:
            splice.restart()
            if await self._follow(holder, splice, fresh):
                return True
            self.metrics.shared_flights.labels("takeover").inc()
            taken = self.claim_now(key, flight.id, replace=holder.rpartition(":")[2])
            if taken.lead:
                on_lead(taken)
                break
            holder = taken.holder  # another sibling took over first: follow it
        splice.restart()
        await call(splice, stream if splice.whole is None else not splice.whole)
        splice.complete()
        return True

    async def _follow(self, holder: str, splice: Splice, fresh: bool = False) -> bool:
        """Feed `splice` from the owner's flight: True when it ended, False when the owner is
        unreachable or gone before the end. Raises the owner's error."""
        index, _, flight_id = holder.split(":")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(socket_path(self.worker.node_dir, int(index))), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError):
            return False
        try:
            await _write(writer, b"F" if fresh else b"f", flight_id.encode())
            last: Chunk | None = None
            while True:
                kind, payload = await _read(reader)
                if kind == b"u":
                    splice.flight.served_by = payload.decode(errors="replace")
                elif kind == b"c":
                    last = Chunk(orjson.loads(payload), payload)
                    if splice.index == 0:
                        splice.whole = False
                    splice.publish(last)
                elif kind == b"W" and last is not None:
                    last.whole = payload
                    splice.whole = True
                elif kind == b"r":
                    splice.restart()
                elif kind == b"e":
                    fields = orjson.loads(payload)
                    if fields.get("e") != "ok":
                        raise end_error({k.encode(): v.encode("latin-1") for k, v in fields.items()})
                    splice.complete()
                    return True
                elif kind == b"g":  # gone: the owner no longer has it
                    return False
        except (OSError, asyncio.IncompleteReadError, ConnectionError, orjson.JSONDecodeError):
            return False
        finally:
            writer.close()

    # -- the owner's side: siblings follow our flights, or ask for our metrics -----------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            kind, payload = await _read(reader)
            if kind in (b"f", b"F"):
                await self._publish(payload.decode(), reader, writer, fresh=kind == b"F")
            elif kind == b"a":
                entry = self.cache_entry(payload.decode())
                if entry is None:
                    await _write(writer, b"g")
                else:
                    answer, left_s = entry
                    await _write(writer, b"A", _SECONDS.pack(left_s) + answer.encode())
            elif kind == b"m":
                await _write(writer, b"m", self.own_metrics())
        except (OSError, asyncio.IncompleteReadError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _publish(self, flight_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       fresh: bool = False) -> None:
        """Send a sibling our flight's chunks, from the first; while it follows, we hold a
        ticket on the flight, so its clients count as waiters (the last one out cancels).
        `fresh`: only a flight still running will do."""
        led = self._led.get(flight_id)
        if led is None or (fresh and led[0].done):
            await _write(writer, b"g")
            return
        flight, redact = led
        ticket = self.group.join(flight)  # a sibling's clients wait on it: keep the call going
        left = asyncio.ensure_future(reader.read(1))  # the sibling sends nothing more: EOF is its leaving
        try:
            sent = 0
            rewinds = flight.rewinds
            told = False
            while True:
                if flight.rewinds != rewinds:
                    rewinds, sent = flight.rewinds, 0
                    await _write(writer, b"r")
                batch = flight.chunks[sent:]
                if batch and not told and flight.served_by:
                    await _write(writer, b"u", flight.served_by.encode())
                    told = True
                for chunk in batch:
                    frames = _FRAME.pack(b"c", len(chunk.raw)) + chunk.raw
                    if chunk.whole is not None:
                        frames += _FRAME.pack(b"W", len(chunk.whole)) + chunk.whole
                    writer.write(frames)
                sent += len(batch)
                if batch:
                    await writer.drain()
                if flight.done and sent == len(flight.chunks):
                    break
                if not flight.done:
                    change = asyncio.ensure_future(flight.changed())
                    # a task starts on the next loop step: let it register for the next change,
                    # then look again (a publish or finish before it did would never wake it)
                    await asyncio.sleep(0)
                    if len(flight.chunks) != sent or flight.done or flight.rewinds != rewinds:
                        change.cancel()
                        continue
                    await asyncio.wait((change, left), return_when=asyncio.FIRST_COMPLETED)
                    if left.done():
                        change.cancel()
                        return  # every client of the sibling left

            if isinstance(flight.error, FlightCancelled):
                return  # the follower takes over
            fields = end_fields(flight.error, redact)
            end = {k: v.decode("latin-1") if isinstance(v, bytes) else v for k, v in fields.items()}
            await _write(writer, b"e", orjson.dumps(end))
        finally:
            left.cancel()
            self.group.release(ticket)

    # -- the node's metrics ------------------------------------------------------------
    async def node_metrics(self) -> bytes:
        """Every worker's metrics in one text: counters and histograms summed across the
        node, so one scrape of the port gives totals (a worker that is restarting is missing
        from that scrape; its counters are back with it)."""
        texts = [self.own_metrics()]
        others = [i for i in range(self.worker.count) if i != self.worker.index]
        texts += [t for t in await asyncio.gather(*(self._sibling_metrics(i) for i in others)) if t is not None]
        return merge_metrics(texts)

    async def _sibling_metrics(self, index: int) -> bytes | None:
        reply = await self._ask(index, b"m")
        return reply[1] if reply is not None and reply[0] == b"m" else None

    async def sibling_answer(self, index: int, key: str) -> tuple[Answer, float] | None:
        """The answer sibling `index` keeps for `key` and the seconds it has left, or None."""
        reply = await self._ask(index, b"a", key.encode())
        if reply is None or reply[0] != b"A" or len(reply[1]) < _SECONDS.size:
            return None
        answer = Answer.decode(reply[1][_SECONDS.size:])
        return None if answer is None else (answer, _SECONDS.unpack_from(reply[1])[0])

    async def _ask(self, index: int, kind: bytes, payload: bytes = b"") -> tuple[bytes, bytes] | None:
        """One request to sibling `index` and its one reply; None if it is not there in time."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(socket_path(self.worker.node_dir, index)), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError):
            return None
        try:
            await _write(writer, kind, payload)
            return await asyncio.wait_for(_read(reader), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return None
        finally:
            writer.close()


class NodeCache:
    """The result cache of a node's workers without Redis: this worker's memory cache, and on
    a miss the answer a sibling keeps (the directory names it), asked over the sibling's
    socket and kept here too for the time it has left there."""

    def __init__(self, memory: MemoryCache, node: NodeFlights) -> None:
        self.memory = memory
        self.node = node
        node.cache_entry = memory.entry

    async def get(self, key: str) -> Answer | None:
        answer = await self.memory.get(key)
        if answer is not None:
            return answer
        return await self.from_sibling(key)

    async def from_sibling(self, key: str) -> Answer | None:
        """The answer a sibling keeps for `key` (kept here too), or None."""
        sibling = self.node.answers.holder(key)
        if sibling is None:
            return None
        got = await self.node.sibling_answer(sibling, key)
        self.node.metrics.node_cache_asks.labels("hit" if got is not None else "miss").inc()
        if got is None:
            return None
        answer, left_s = got
        self.memory.keep(key, answer, left_s)
        return answer

    async def put(self, key: str, answer: Answer, ttl_s: float) -> None:
        self.keep(key, answer, ttl_s)

    def keep(self, key: str, answer: Answer, ttl_s: float) -> None:
        """`put`, without a suspension (the gateway keeps an answer as its flight ends)."""
        self.memory.keep(key, answer, ttl_s)
        self.node.answers.note(key)


#: gauges whose node-wide value is not a sum of the workers'
_MERGE = {"herd_redis_up": min, "herd_circuit_state": max}
_CARRIED = frozenset({"counter", "histogram", "summary"})  # what a restarted worker carries on


def merge_metrics(texts: list[bytes], kinds: frozenset[str] | None = None) -> bytes:
    """Prometheus texts of the node's workers as one: each sample summed over the workers
    (min or max for a few gauges, _MERGE), herd_coalesce_ratio computed from the sums.
    `kinds`: only the families of these types (e.g. counters, to carry over a restart)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name.endswith("_created") or (kinds is not None and family.type not in kinds):
                continue  # when each worker's series began: not a node's
            _, _, samples = families.setdefault(family.name, (family.type, family.documentation, {}))
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue  # when each worker's series began: not a node's
                samples.setdefault((s.name, tuple(sorted(s.labels.items()))), []).append(s.value)

    def total(name: str) -> float:
        samples = families.get(name, ("", "", {}))[2]
        return sum(sum(v) for (sample, _), v in samples.items() if sample == name + "_total")

    served = sum(sum(v) for (sample, labels), v in families.get("herd_requests", ("", "", {}))[2].items()
                 if sample == "herd_requests_total" and dict(labels).get("outcome") != "error")
    lines = []
    for name, (kind, doc, samples) in families.items():
        lines.append(f"# HELP {name} {_escape_help(doc)}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample, labels), values in samples.items():
            if name == "herd_coalesce_ratio":
                value = 1.0 - total("herd_upstream_calls") / served if served else 0.0
            else:
                value = _MERGE.get(name, sum)(values)
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            lines.append(f"{sample}{{{label_text}}} {_number(value)}" if labels else f"{sample} {_number(value)}")
    return ("\n".join(lines) + "\n").encode()


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))
