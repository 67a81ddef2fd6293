"""An asyncio front for :class:`~embeddings.embedder.Embedder`: micro-batching, worker threads, an LRU.

How a call flows:

1. The text's hash is looked up in the LRU: a hit returns at once, no run.
2. A text already queued or being embedded is joined, not embedded twice.
3. Otherwise it is queued and an idle worker is woken: the first caller never waits for a
   timer. Texts that arrive while every worker is busy wait in the queue, and the next worker
   to finish takes them all together (up to ``max_batch``) as its next run.

Inference runs on worker threads, never on the event loop: by default one worker per core,
each running single-threaded ONNX Runtime (:func:`~embeddings.embedder.default_workers`),
so a text that arrives while one run is busy starts at once on an idle worker instead of
waiting behind it, and under load the cores run whole batches side by side rather than
splitting each one between threads. A worker that finishes a run hands its vectors to the
loop and takes its next run from the queue itself, without waiting for the loop: a loop
busy with the callers of the last run never leaves a core idle with texts queued.

One instance serves one event loop at a time (the one of its first call, until that one closes).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from embeddings.embedder import default_workers, lower_thread_priority

if TYPE_CHECKING:  # pragma: no cover
    from embeddings.embedder import Embedder


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class _Pending:
    __slots__ = ("text", "waiters")

    def __init__(self, text: str) -> None:
        self.text = text
        self.waiters: list[asyncio.Future[np.ndarray]] = []  # touched on the loop only


class BatchingEmbedder:
    """``await embed(text)`` -> one L2-normalised float32 vector (read-only)."""

    def __init__(
        self,
        embedder: Embedder,
        max_batch: int = 32,
        cache_size: int = 10_000,
        workers: int | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        """`on_batch(size, seconds)` is told of every run (for metrics). `workers`: concurrent
        runs (default: :func:`~embeddings.embedder.default_workers` for `embedder`)."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if workers is None:
            workers = default_workers(embedder)
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.embedder = embedder
        self.max_batch = int(max_batch)
        self.cache_size = max(0, int(cache_size))
        self.workers = int(workers)
        self._on_batch = on_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._cache: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        # Shared with the workers, under _lock: what waits for a run, and what a run holds.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: collections.OrderedDict[bytes, _Pending] = collections.OrderedDict()
        self._inflight: dict[bytes, _Pending] = {}
        self._running = 0  # workers in a run
        self._closed = False
        self._batches = 0
        self._items = 0
        self._hits = 0
        self._joined = 0
        self._errors = 0
        self._busy_s = 0.0
        self._last_sizes: collections.deque[int] = collections.deque(maxlen=64)

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def max_tokens(self) -> int:
        return self.embedder.max_tokens

    # -- public -------------------------------------------------------------

    async def embed(self, text: str) -> np.ndarray:
        if self._closed:
            raise RuntimeError("BatchingEmbedder is closed")
        key = text_key(text)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self._hits += 1
            return cached
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._bind(loop)
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        with self._work:
            pending = self._inflight.get(key) or self._queue.get(key)
            if pending is not None:
                self._joined += 1
            else:
                pending = self._queue[key] = _Pending(text)
                self._work.notify()
            pending.waiters.append(fut)
        # Each caller owns its future: a cancelled caller never cancels the others' result.
        return await fut

    def stats(self) -> dict[str, Any]:
        sizes = list(self._last_sizes)
        return {
            "batches": self._batches,
            "items": self._items,
            "cache_hits": self._hits,
            "joined": self._joined,
            "errors": self._errors,
            "cache_size": len(self._cache),
            "queued": len(self._queue),
            "running": self._running,
            "busy_seconds": round(self._busy_s, 6),
            "mean_batch": (self._items / self._batches) if self._batches else 0.0,
            "last_batch_sizes": sizes[-16:],
            "max_batch": self.max_batch,
            "workers": self.workers,
        }

    def close(self) -> None:
        """Stop accepting work; queued callers get an error. Does not wait for a running batch."""
        self._shut()

    async def aclose(self) -> None:
        """Stop accepting work, let running batches finish and hand out their vectors."""
        self._shut()
        threads = [t for t in self._threads if t.is_alive()]
        if threads:
            def join() -> None:
                for t in threads:
                    t.join()

            await asyncio.get_running_loop().run_in_executor(None, join)
            await asyncio.sleep(0)  # the last runs' vectors, posted to the loop before the joins ended

    async def __aenter__(self) -> BatchingEmbedder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals ----------------------------------------------------------

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("a BatchingEmbedder serves the event loop of its first call")
        with self._lock:
            self._loop = loop
        # Workers start with the first call, and again for a new loop: a worker ends when the
        # loop it delivers to has closed.
        self._threads = [t for t in self._threads if t.is_alive()]
        for i in range(len(self._threads), self.workers):
            t = threading.Thread(target=self._worker, name=f"herd-embed-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _worker(self) -> None:
        lower_thread_priority()
        while True:
            with self._work:
                while not self._queue and not self._closed:
                    self._work.wait()
                if self._closed:
                    return
                batch = self._take()
                if not batch:
                    continue
                self._running += 1
                loop = self._loop
                assert loop is not None  # set by embed(), which queued this batch
            t0 = time.perf_counter()
            try:
                outcome: np.ndarray | Exception = self.embedder.embed([p.text for _, p in batch])
            except Exception as exc:  # handed to the waiters; the worker goes on
                outcome = exc
            elapsed = time.perf_counter() - t0
            try:
                loop.call_soon_threadsafe(self._deliver, batch, outcome, elapsed)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _take(self) -> list[tuple[bytes, _Pending]]:
        """The next run, from the head of the queue (caller holds the lock)."""
        batch: list[tuple[bytes, _Pending]] = []
        while self._queue and len(batch) < self.max_batch:
            key, pending = self._queue.popitem(last=False)
            if pending.waiters and all(w.done() for w in pending.waiters):
                continue  # everyone waiting for it has gone
            batch.append((key, pending))
            self._inflight[key] = pending
        return batch

    def _deliver(self, batch: list[tuple[bytes, _Pending]], outcome: np.ndarray | Exception,
                 elapsed: float) -> None:
        """On the loop: a finished run's vectors (or its error) to everyone waiting for them."""
        with self._lock:
            self._running -= 1
            for key, _ in batch:
                self._inflight.pop(key, None)
        if isinstance(outcome, Exception):
            self._errors += 1
            for _, pending in batch:
                for w in pending.waiters:
                    if not w.done():
                        w.set_exception(outcome)
            return
        self._busy_s += elapsed
        if self._on_batch is not None:
            self._on_batch(len(batch), elapsed)
        self._batches += 1
        self._items += len(batch)
        self._last_sizes.append(len(batch))
        for (key, pending), row in zip(batch, outcome):
            # A copy per row, not a view: a cached view would keep its whole batch alive.
            vec = np.array(row, dtype=np.float32, copy=True)
            vec.flags.writeable = False
            self._remember(key, vec)
            for w in pending.waiters:
                if not w.done():
                    w.set_result(vec)

    def _remember(self, key: bytes, vec: np.ndarray) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = vec
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _shut(self) -> None:
        """Refuse new work, fail what is queued, and let idle workers end."""
        with self._work:
            self._closed = True
            failed = list(self._queue.values())
            self._queue.clear()
            self._work.notify_all()
        error = RuntimeError("BatchingEmbedder closed")
        for pending in failed:
            for w in pending.waiters:
                if not w.done():
                    w.set_exception(error)
