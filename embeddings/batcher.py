"""An asyncio front for :class:`~embeddings.embedder.Embedder`: micro-batching, a worker thread, an LRU.

How a call flows:

1. The text's hash is looked up in the LRU: a hit returns at once, no run.
2. A text already queued or being embedded is joined, not embedded twice.
3. Otherwise it is queued. If no run is busy, a run starts at once with whatever is
   queued (the first caller never waits for a timer). Texts that arrive while a run is
   busy wait for it and then go together in the next run, up to ``max_batch``.

Inference runs in a thread pool, never on the event loop: by default one worker per core,
each running single-threaded ONNX Runtime (:func:`~embeddings.embedder.default_workers`),
so a text that arrives while one run is busy starts at once on an idle worker instead of
waiting behind it, and under load the cores run whole batches side by side rather than
splitting each one between threads. When a run ends, the next one
is started one loop turn later (``call_soon``, not a timer), so callers woken by the
finished run can queue their next text and join it instead of being split into a run of
one followed by a run of the rest.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
        self.waiters: list[asyncio.Future[np.ndarray]] = []


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
        self._pool = ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="herd-embed", initializer=lower_thread_priority
        )
        self._cache: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self._queue: collections.OrderedDict[bytes, _Pending] = collections.OrderedDict()
        self._inflight: dict[bytes, _Pending] = {}
        self._running = 0  # runs in the pool, plus a start scheduled with call_soon
        self._tasks: set[asyncio.Task[None]] = set()
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
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        pending = self._inflight.get(key) or self._queue.get(key)
        if pending is not None:
            self._joined += 1
        else:
            pending = self._queue[key] = _Pending(text)
        pending.waiters.append(fut)
        if self._running < self.workers:
            self._start(loop)
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
        self._closed = True
        self._fail_queue(RuntimeError("BatchingEmbedder closed"))
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """Stop accepting work, let running batches finish, then release the thread pool."""
        self._closed = True
        self._fail_queue(RuntimeError("BatchingEmbedder closed"))
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)

    async def __aenter__(self) -> BatchingEmbedder:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals ----------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._queue or self._closed:
            return
        batch: list[tuple[bytes, _Pending]] = []
        while self._queue and len(batch) < self.max_batch:
            key, pending = self._queue.popitem(last=False)
            if all(w.done() for w in pending.waiters):
                continue  # everyone waiting for it has gone
            batch.append((key, pending))
            self._inflight[key] = pending
        if not batch:
            return
        self._running += 1
        task = loop.create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[bytes, _Pending]]) -> None:
        loop = asyncio.get_running_loop()
        texts = [p.text for _, p in batch]
        t0 = time.perf_counter()
        try:
            vectors = await loop.run_in_executor(self._pool, self.embedder.embed, texts)
        except BaseException as exc:
            self._errors += 1
            error = exc if isinstance(exc, Exception) else RuntimeError(f"embedding run ended: {exc!r}")
            for key, pending in batch:
                self._inflight.pop(key, None)
                for w in pending.waiters:
                    if not w.done():
                        w.set_exception(error)
            self._release(loop)
            if not isinstance(exc, Exception):
                raise
            return
        elapsed = time.perf_counter() - t0
        self._busy_s += elapsed
        if self._on_batch is not None:
            self._on_batch(len(batch), elapsed)
        self._batches += 1
        self._items += len(batch)
        self._last_sizes.append(len(batch))
        for (key, pending), row in zip(batch, vectors):
            # A copy per row, not a view: a cached view would keep its whole batch alive.
            vec = np.array(row, dtype=np.float32, copy=True)
            vec.flags.writeable = False
            self._inflight.pop(key, None)
            self._remember(key, vec)
            for w in pending.waiters:
                if not w.done():
                    w.set_result(vec)
        self._release(loop)

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        # Keep the slot one more loop turn: the callers just woken queue their next texts
        # first, and the next run takes them all together.
        loop.call_soon(self._handoff, loop)

    def _handoff(self, loop: asyncio.AbstractEventLoop) -> None:
        self._running -= 1
        while self._queue and self._running < self.workers and not self._closed:
            before = self._running
            self._start(loop)
            if self._running == before:
                break

    def _remember(self, key: bytes, vec: np.ndarray) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = vec
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _fail_queue(self, error: Exception) -> None:
        while self._queue:
            _, pending = self._queue.popitem(last=False)
            for w in pending.waiters:
                if not w.done():
                    w.set_exception(error)
