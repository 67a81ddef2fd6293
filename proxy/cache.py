"""The result cache: finished answers, kept for `[cache] ttl_seconds`, by exact key.

An entry is an `Answer` (proxy.answer): the flight's SSE events and its JSON body, rendered
once when the flight finished, so a hit is written to its client as it is, streamed or not,
with nothing parsed or rendered again. Errors and cut-off streams never get here: only
flights that finished cleanly are stored.

The memory cache is bounded in bytes (`[cache] max_bytes`: the answers' bytes plus a fixed
overhead per entry) and, secondarily, in entries (`max_entries`, which also bounds the
semantic index of cached answers); the least recently used answers go first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from proxy.answer import Answer


class AnswerCache(Protocol):
    async def get(self, key: str) -> Answer | None: ...
    async def put(self, key: str, answer: Answer, ttl_s: float) -> None: ...


class MemoryCache:
    """An LRU bounded in bytes and entries, with per-entry expiry. Its methods never suspend."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024, max_entries: int = 10_000, clock=time.monotonic,
                 on_evict: Callable[[], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.nbytes = 0  # what the entries cost now, by Answer.nbytes plus the key
        self._clock = clock
        self._on_evict = on_evict or (lambda: None)  # an entry made room for another (a metric)
        self._entries: OrderedDict[str, tuple[float, Answer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _cost(key: str, answer: Answer) -> int:
        return answer.nbytes + len(key)

    async def get(self, key: str) -> Answer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, answer = entry
        if expires <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return answer

    def entry(self, key: str) -> tuple[Answer, float] | None:
        """`key`'s answer and the seconds it has left, without a suspension (for a sibling
        worker that asks: proxy.node)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        left = entry[0] - self._clock()
        return (entry[1], left) if left > 0 else None

    async def put(self, key: str, answer: Answer, ttl_s: float) -> None:
        self.keep(key, answer, ttl_s)

    def keep(self, key: str, answer: Answer, ttl_s: float) -> None:
        """`put`, for a caller that knows this cache never suspends."""
        self._drop(key)
        cost = self._cost(key, answer)
        if cost <= self.max_bytes:  # an answer bigger than the whole cache is not kept
            self._entries[key] = (self._clock() + ttl_s, answer)
            self.nbytes += cost
            while self.nbytes > self.max_bytes or len(self._entries) > self.max_entries:
                old_key, (_, old) = self._entries.popitem(last=False)  # the least recently used
                self.nbytes -= self._cost(old_key, old)
                self._on_evict()

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= self._cost(key, entry[1])


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
