"""The coalescer: one upstream call per flight, any number of waiters.

The vocabulary follows Go's singleflight. A `Group` holds the flights in progress. A
request `acquire`s the flight of its key: it joins one that is in progress (a follower) or
starts a new one (the leader). The leader's work runs in a task of its own, so no single
client can cancel it by going away; each waiter `release`s the flight when it is done with
it, and the last one out cancels the work.

A flight's life, in one screen:

    running --publish/extend...--> running --finish()------> done, error is None
                                           --finish(error)--> done, error set
    running --last waiter releases--> work cancelled --> done, error = FlightCancelled

Every chunk the work publishes is kept, so a waiter that joins late replays the flight
from its first chunk and then follows it live: in order, with no gaps and no duplicates.
Nothing here knows HTTP; the chunks are whatever the work publishes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol

from proxy.ids import unique_id

log = logging.getLogger("herd.coalescer")


class FlightCancelled(Exception):
    """The flight's work was cancelled because every waiter left."""


class Flight:
    def __init__(self, keys: Iterable[str]) -> None:
        self.id = unique_id()
        self.keys = tuple(keys)
        self.chunks: list[Any] = []
        self.done = False
        self.error: BaseException | None = None
        self.waiters = 0
        self.joined = 0  # followers that ever joined
        self.started = time.monotonic()
        self.finished_at: float | None = None  # perf_counter() when it finished
        self.group: str | None = None  # semantic group this flight is indexed under
        self.memo: dict[str, Any] = {}  # things derived once per flight (an assembled body...)
        self.task: asyncio.Task | None = None
        self._waiting: list[asyncio.Future] = []  # woken by the next publish or finish

    @classmethod
    def completed(cls, keys: Iterable[str], chunks: list[Any]) -> Flight:
        """A flight that is already done, e.g. an answer from the cache."""
        flight = cls(keys)
        flight.chunks = list(chunks)
        flight.done = True
        flight.waiters = 1
        return flight

    def publish(self, chunk: Any) -> None:
        self.extend((chunk,))

    def extend(self, chunks: Iterable[Any]) -> None:
        """Publish chunks that arrived together: the waiters wake once for all of them."""
        if self.done:
            raise RuntimeError(f"flight {self.id} is done; cannot publish")
        self.chunks.extend(chunks)
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

    async def _changed(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        await future

    async def follow(self) -> AsyncIterator[list[Any]]:
        """Every chunk from the first, then live ones until the flight is done, in batches:
        whatever is new each time the follower looks (a late joiner's first batch is the
        whole replay), so a slow follower catches up in one step rather than one per chunk.

        It ends normally either way: look at `error` afterwards.
        """
        i = 0
        while True:
            if i < len(self.chunks):
                batch = self.chunks[i:]
                i += len(batch)
                yield batch
                continue
            if self.done:
                return
            await self._changed()

    async def wait(self) -> None:
        """Until the flight is done."""
        while not self.done:
            await self._changed()


class Index(Protocol):
    """A semantic index of the flights of one group (see proxy.matcher.SemanticIndex)."""

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

    def get(self, keys: Iterable[str]) -> Flight | None:
        for key in keys:
            flight = self._flights.get(key)
            if flight is not None:
                return flight
        return None

    def find_similar(self, group: str, probe: Any) -> tuple[Flight, float] | None:
        index = self._indexes.get(group)
        found = index.best(probe) if index else None
        if found is None:
            return None
        flight_id, score = found
        return self._by_id[flight_id], score

    def join(self, flight: Flight) -> Flight:
        flight.waiters += 1
        flight.joined += 1
        return flight

    def lead(
        self, keys: Iterable[str], work: Work, *, group: str | None = None, probe: Any = None, shared: bool = True
    ) -> Flight:
        """Start a flight and run `work` for it in its own task; the caller is its first waiter.

        shared=False makes a private flight that nobody can join (bypass).
        """
        flight = Flight(keys)
        flight.waiters = 1
        if shared:
            for key in flight.keys:
                self._flights[key] = flight
            self._by_id[flight.id] = flight
            if group is not None and probe is not None and self._index_factory is not None:
                flight.group = group
                index = self._indexes.get(group)
                if index is None:
                    index = self._indexes[group] = self._index_factory()
                index.add(flight.id, probe)
        flight.task = asyncio.get_running_loop().create_task(self._run(flight, work), name=f"flight-{flight.id}")
        return flight

    def release(self, flight: Flight) -> None:
        """A waiter is done with `flight`; the last one out cancels work still running."""
        flight.waiters -= 1
        if flight.waiters == 0 and not flight.done:
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
