"""The result cache: finished answers, kept for `[cache] ttl_seconds`, by exact key.

An entry is the list of chunk objects a flight published, so a hit can be replayed as a
stream (chunk by chunk) or assembled into one JSON body, exactly like a live flight.
Errors and cut-off streams never get here: only flights that finished cleanly are stored.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Protocol


class AnswerCache(Protocol):
    async def get(self, key: str) -> list[dict[str, Any]] | None: ...
    async def put(self, key: str, chunks: list[dict[str, Any]], ttl_s: float) -> None: ...


class MemoryCache:
    """A size-bounded LRU with per-entry expiry. Its methods never suspend."""

    def __init__(self, max_entries: int = 10_000, clock=time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, list[dict[str, Any]]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> list[dict[str, Any]] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, chunks = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return chunks

    async def put(self, key: str, chunks: list[dict[str, Any]], ttl_s: float) -> None:
        self._entries[key] = (self._clock() + ttl_s, chunks)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class SimilarAnswers:
    """Which cached answers a semantic request may reuse: per group, an index of cache keys.

    It lives in this process (vectors are cheap to rebuild and never leave the machine);
    the answers it points to may live in Redis. Entries past the cache TTL or the size
    bound are dropped, oldest first.
    """

    def __init__(self, index_factory, max_entries: int = 10_000, clock=time.monotonic) -> None:
        self._index_factory = index_factory
        self._indexes: dict[str, Any] = {}
        self._order: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.max_entries = max_entries
        self._clock = clock

    def __len__(self) -> int:
        return len(self._order)

    def add(self, group: str, key: str, probe: Any, ttl_s: float) -> None:
        self.discard(group, key)
        index = self._indexes.get(group)
        if index is None:
            index = self._indexes[group] = self._index_factory()
        index.add(key, probe)
        self._order[(group, key)] = self._clock() + ttl_s
        while len(self._order) > self.max_entries:
            (old_group, old_key), _ = next(iter(self._order.items()))
            self.discard(old_group, old_key)

    def best(self, group: str, probe: Any) -> tuple[str, float] | None:
        now = self._clock()
        while self._order:
            (old_group, old_key), expires = next(iter(self._order.items()))
            if expires > now:
                break
            self.discard(old_group, old_key)
        index = self._indexes.get(group)
        return index.best(probe) if index is not None else None

    def discard(self, group: str, key: str) -> None:
        if self._order.pop((group, key), None) is None:
            return
        index = self._indexes[group]
        index.remove(key)
        if not len(index):
            del self._indexes[group]
