"""The coalescer: one piece of work per flight, any number of waiters.

The vocabulary follows Go's singleflight. A `Group` holds the flights in progress. A
request `acquire`s a `Ticket` for its keys: it joins the flight in progress under any of
them (a follower) or starts a new one that runs `work` (the leader). The work runs in a
task of its own, so no single client can cancel it by going away; each waiter `release`s
its ticket when it is done, and the last one out cancels the work.

    ticket = group.acquire(keys, work)     # never suspends: join or lead, at once
    async for batch in ticket.flight.follow(): ...
    group.release(ticket)                  # exactly once

A flight's life, in one screen:

    running --publish/extend...--> running --finish()------> done, error is None
                                           --finish(error)--> done, error set
    running --last waiter releases--> work cancelled --> done, error = FlightCancelled
    running --rewind(error)--> running, no chunks: a follower already given some ends with error

Every chunk the work publishes is kept, so a waiter that joins late replays the flight
from its first chunk and then follows it live: in order, with no gaps and no duplicates.

What the work finds out about its answer it records in the flight's typed fields (where
the answer came from, which upstream gave it, the id other replicas know it by); a
ticket's role is read from them, so nobody edits a ticket after it was handed out.
Nothing here knows HTTP; the chunks are whatever the work publishes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from proxy.ids import unique_id

log = logging.getLogger("herd.coalescer")

#: Where a flight's answer comes from, decided by its work before it publishes anything.
#: upstream: its own upstream call (its first waiter is the leader); cache: a stored answer;
#: follow: another flight's answer (a similar flight here, or this flight led by another replica).
Source = Literal["upstream", "cache", "follow"]
#: What a waiter is, as x-herd reports it.
Role = Literal["leader", "follower", "cache", "bypass"]


class FlightCancelled(Exception):
    """The flight's work was cancelled because every waiter left."""


class Flight:
    def __init__(self, keys: Iterable[str], *, private: bool = False) -> None:
        self.id = unique_id()
        self.keys = tuple(keys)
        self.private = private  # nobody can join it (bypass)
        self.chunks: list[Any] = []
        self.done = False
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.finished_at: float | None = None  # perf_counter() when it finished
        # Set by the work, read by whoever renders the answer:
        self.source: Source = "upstream"
        self.served_by: str | None = None  # the upstream that answered, once known
        self.shared_id: str | None = None  # the id of this flight across replicas, when another leads it
        self.similarity: float | None = None  # set when it follows a similar flight or cached answer
        self.probe: Any = None  # its semantic probe, once embedded
        # Its answer as bytes, each made at most once and shared by every waiter (proxy.answer):
        self.body: bytes | None = None  # the non-stream body
        self.sse: Any = None  # the SSE events, rendered as the chunks arrive
        self.answer: Any = None  # the whole finished answer: a cached one, or made once to store it
        # Kept by the Group:
        self.group: str | None = None  # the semantic group this flight is indexed under
        self.task: asyncio.Task | None = None
        self._waiters = 0
        self._waiting: list[asyncio.Future] = []  # woken by the next publish or finish
        self._rewinds = 0
        self._rewound: BaseException | None = None  # for followers given part of a discarded answer

    @property
    def public_id(self) -> str:
        """The id clients see (x-herd-flight): the same on every replica sharing the flight."""
        return self.shared_id or self.id

    @property
    def waiters(self) -> int:
        return self._waiters

    @property
    def rewinds(self) -> int:
        """How many times the answer was started over (see rewind)."""
        return self._rewinds

    @property
    def rewound(self) -> BaseException | None:
        """The error for a waiter that was given part of an answer the flight discarded."""
        return self._rewound

    def publish(self, chunk: Any) -> None:
        self.extend((chunk,))

    def extend(self, chunks: Iterable[Any]) -> None:
        """Publish chunks that arrived together: the waiters wake once for all of them."""
        if self.done:
            raise RuntimeError(f"flight {self.id} is done; cannot publish")
        self.chunks.extend(chunks)
        self._wake()

    def rewind(self, error: BaseException) -> None:
        """Discard what was published and start the answer over (its source was lost and the
        new one differs). Waiters that were given none of it get the new answer; a follower
        that was given part of it raises `error`, so nobody gets a splice of two answers."""
        if self.done:
            raise RuntimeError(f"flight {self.id} is done; cannot rewind")
        self.chunks = []
        self.body = self.sse = self.answer = None
        self._rewinds += 1
        self._rewound = error
        self._wake()

    def finish(self, error: BaseException | None = None) -> None:
        if not self.done:
            self.done = True
            self.error = error
            self.finished_at = time.perf_counter()
            self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            if not future.done():  # a waiter that was cancelled meanwhile
                future.set_result(None)

    async def changed(self) -> None:
        """Until the next publish, rewind or finish."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        await future

    async def follow(self) -> AsyncIterator[list[Any]]:
        """Every chunk from the first, then live ones until the flight is done, in batches:
        whatever is new each time the follower looks (a late joiner's first batch is the
        whole replay), so a slow follower catches up in one step rather than one per chunk.

        It ends normally either way: look at `error` afterwards. It raises only when the
        flight was rewound after this follower was given part of the discarded answer.
        """
        i = 0
        rewinds = self._rewinds
        while True:
            if rewinds != self._rewinds:
                if i and self._rewound is not None:
                    raise self._rewound
                rewinds = self._rewinds
            if i < len(self.chunks):
                batch = self.chunks[i:]
                i += len(batch)
                yield batch
                continue
            if self.done:
                return
            await self.changed()

    async def wait(self) -> None:
        """Until the flight is done."""
        while not self.done:
            await self.changed()


@dataclass(eq=False)
class Ticket:
    """A waiter's claim on a flight, from `Group.acquire` or `Group.join`; release it once."""

    flight: Flight
    leads: bool = False  # this waiter started the flight
    similarity: float | None = None  # joined a similar flight (not an equal one)

    @property
    def role(self) -> Role:
        flight = self.flight
        if flight.source == "cache":
            return "cache"
        if flight.private:
            return "bypass"
        return "leader" if self.leads and flight.source == "upstream" else "follower"

    @property
    def score(self) -> float | None:
        """How similar this waiter's request is to the answer it gets, if not equal."""
        return self.similarity if self.similarity is not None else self.flight.similarity


class Index(Protocol):
    """A semantic index of the flights of one group (see proxy.semantic.SemanticIndex)."""

    def add(self, item_id: str, probe: Any) -> None: ...
    def remove(self, item_id: str) -> None: ...
    def best(self, probe: Any) -> tuple[str, float] | None: ...
    def __len__(self) -> int: ...


Work = Callable[[Flight], Awaitable[None]]


class Group:
    def __init__(self, index_factory: Callable[[], Index] | None = None) -> None:
        self._flights: dict[str, Flight] = {}  # every key of a flight -> the flight
        self._by_id: dict[str, Flight] = {}
        self._indexes: dict[str, Index] = {}
        self._index_factory = index_factory

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def waiters(self) -> int:
        return sum(f.waiters for f in self._by_id.values())

    def acquire(self, keys: Iterable[str], work: Work, *, private: bool = False) -> Ticket:
        """Join the flight in progress under any of `keys`, or start one that runs `work`.

        It never suspends, so every request that arrives while a flight runs joins it:
        whatever the work awaits (a cache read, a claim, the upstream) is done once per
        flight. private=True always starts a flight that nobody can join (bypass).
        """
        keys = tuple(keys)
        if not private and (flight := self.get(keys)) is not None:
            return self.join(flight)
        flight = Flight(keys, private=private)
        flight._waiters = 1
        if not private:
            for key in keys:
                self._flights[key] = flight
            self._by_id[flight.id] = flight
        flight.task = asyncio.get_running_loop().create_task(self._run(flight, work), name=f"flight-{flight.id}")
        return Ticket(flight, leads=True)

    def get(self, keys: Iterable[str]) -> Flight | None:
        for key in keys:
            flight = self._flights.get(key)
            if flight is not None:
                return flight
        return None

    def join(self, flight: Flight, similarity: float | None = None) -> Ticket:
        """Wait on `flight` (one found by `get` or `find_similar`, or one a work follows)."""
        flight._waiters += 1
        return Ticket(flight, similarity=similarity)

    def index(self, flight: Flight, group: str, probe: Any) -> None:
        """Make a running flight findable by similarity within `group`."""
        if self._index_factory is None or flight.done or flight.id not in self._by_id or flight.group is not None:
            return
        flight.group = group
        index = self._indexes.get(group)
        if index is None:
            index = self._indexes[group] = self._index_factory()
        index.add(flight.id, probe)

    def find_similar(self, group: str, probe: Any) -> tuple[Flight, float] | None:
        index = self._indexes.get(group)
        found = index.best(probe) if index else None
        if found is None:
            return None
        flight_id, score = found
        return self._by_id[flight_id], score

    def release(self, ticket: Ticket) -> None:
        """A waiter is done with its flight; the last one out cancels work still running."""
        flight = ticket.flight
        flight._waiters -= 1
        if flight._waiters == 0 and not flight.done:
            self._forget(flight)
            if flight.task is not None:
                flight.task.cancel()

    async def _run(self, flight: Flight, work: Work) -> None:
        try:
            await work(flight)
        except asyncio.CancelledError:
            flight.finish(FlightCancelled("every waiter left; the upstream call was cancelled"))
        except Exception as e:  # every waiter gets the same error
            flight.finish(e)
        else:
            flight.finish()
        finally:
            self._forget(flight)

    def _forget(self, flight: Flight) -> None:
        if self._by_id.pop(flight.id, None) is None:
            return
        for key in flight.keys:
            if self._flights.get(key) is flight:
                del self._flights[key]
        if flight.group is not None:
            index = self._indexes.get(flight.group)
            if index is not None:
                index.remove(flight.id)
                if not len(index):
                    del self._indexes[flight.group]

    async def aclose(self) -> None:
        """Wait for running flights to finish (graceful shutdown)."""
        tasks = [f.task for f in self._by_id.values() if f.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
