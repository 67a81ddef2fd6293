"""The load generator: drive a workload against one URL and record every request.

Two ways to load a target (vLLM's benchmark_serving has the same two):

* closed loop, ``Load(concurrency=C)``: C clients, each sends its next request as soon as
  its previous one is answered (the throughput a target sustains at C connections);
* open loop, ``Load(rate=R)``: requests arrive at R per second (Poisson, seeded), whatever
  the target's latency (the latency a target adds at a given load).

A phase runs for ``duration`` seconds or ``requests`` requests, whichever comes first,
after an unmeasured warm-up that opens the connections. Each request records its start,
its latency (until the last byte), its status, the ``x-herd`` role of the answer, and for a
stream its TTFT (first body bytes) and the gaps between the reads that carried data
(inter-chunk latency, ITL).

It is one process by default (aiohttp on uvloop, pre-built bodies, a large connector), or
``procs`` processes that split the load. Nothing here knows about herd or the simulator:
callers pass a ``before_measure`` hook (reset counters) and ``on_tick`` hooks (progress).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import math
import multiprocessing as mp
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Self

import aiohttp

from benchmarks.workloads import Request

CHAT_PATH = "/v1/chat/completions"
ROLES = ("none", "leader", "follower", "cache", "bypass", "other")
_ROLE_CODE = {"leader": 1, "follower": 2, "cache": 3, "bypass": 4}
# status < 0: no HTTP answer (or a broken stream)
TIMEOUT, CONNECTION, INCOMPLETE, EXCEPTION = -1, -2, -3, -4
STATUS_NAMES = {TIMEOUT: "timeout", CONNECTION: "connection", INCOMPLETE: "incomplete stream",
                EXCEPTION: "client exception"}
_DONE = b"data: [DONE]"


def chat_url(base: str) -> str:
    """The chat endpoint of an OpenAI-compatible base URL (with or without /v1)."""
    base = base.rstrip("/")
    base = base.removesuffix("/v1")
    return base + CHAT_PATH


@dataclass(frozen=True)
class Load:
    """How hard to push: a concurrency (closed loop) or a rate (open loop)."""

    concurrency: int | None = None
    rate: float | None = None
    duration: float | None = None  # seconds; None: until `requests` are done
    requests: int | None = None  # None: until `duration` has passed
    poisson: bool = True  # open loop: exponential gaps (else evenly spaced)
    max_inflight: int = 4096  # open loop: arrivals beyond this many in flight are dropped

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency and rate")
        if self.duration is None and self.requests is None:
            raise ValueError("give a duration, a number of requests, or both")

    def share(self, k: int, n: int) -> Load:
        """Process k's part of this load when n processes split it."""
        conc = None if self.concurrency is None else self.concurrency // n + (k < self.concurrency % n)
        reqs = None if self.requests is None else self.requests // n + (k < self.requests % n)
        rate = None if self.rate is None else self.rate / n
        return Load(conc, rate, self.duration, reqs, self.poisson, max(1, self.max_inflight // n))

    def describe(self) -> str:
        how = f"{self.concurrency} connections" if self.concurrency is not None else f"{self.rate:g} req/s"
        bound = []
        if self.duration is not None:
            bound.append(f"{self.duration:g} s")
        if self.requests is not None:
            bound.append(f"{self.requests:,} requests")
        return f"{how}, {' or '.join(bound)}"


class Records:
    """Per-request results in flat arrays (cheap to append, to pickle and to turn into numpy)."""

    def __init__(self, keep_reads: bool = False) -> None:
        self.start = array.array("d")  # seconds since the phase started
        self.latency = array.array("d")  # seconds, until the last byte
        self.ttft = array.array("d")  # seconds to the first body bytes; nan for non-stream
        self.status = array.array("h")
        self.role = array.array("b")
        self.prompt = array.array("q")
        self.stream = array.array("b")
        self.itl = array.array("d")  # every gap between two reads of a stream, all streams
        self.reads: list[list[tuple[float, int]]] | None = [] if keep_reads else None  # (t, events) per stream
        self.errors: dict[str, int] = {}
        self.done = 0
        self.failed = 0
        self.lat_sum = 0.0
        self.elapsed = 0.0  # measured window, seconds
        self.cpu_s = 0.0  # the load generator's own CPU time over the window
        self.dropped = 0  # open loop: arrivals dropped because max_inflight were in flight
        self.max_lag = 0.0  # open loop: the worst lateness of an arrival, seconds

    def __len__(self) -> int:
        return len(self.latency)

    def add(self, start: float, latency: float, ttft: float, status: int, role: int, prompt: int,
            stream: bool) -> None:
        self.start.append(start)
        self.latency.append(latency)
        self.ttft.append(ttft)
        self.status.append(status)
        self.role.append(role)
        self.prompt.append(prompt)
        self.stream.append(stream)
        self.done += 1
        self.lat_sum += latency
        if status != 200:
            self.failed += 1
            name = STATUS_NAMES.get(status, f"http {status}")
            self.errors[name] = self.errors.get(name, 0) + 1

    def extend(self, other: Records) -> None:
        for name in ("start", "latency", "ttft", "status", "role", "prompt", "stream", "itl"):
            getattr(self, name).extend(getattr(other, name))
        if self.reads is not None and other.reads is not None:
            self.reads.extend(other.reads)
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v
        self.done += other.done
        self.failed += other.failed
        self.lat_sum += other.lat_sum
        self.elapsed = max(self.elapsed, other.elapsed)
        self.cpu_s += other.cpu_s
        self.dropped += other.dropped
        self.max_lag = max(self.max_lag, other.max_lag)


class Counters:
    """What the progress display reads while a phase runs (from another thread or process)."""

    def __init__(self, slots: int = 1, shared: bool = False) -> None:
        self._a = mp.get_context("fork").Array("d", 3 * slots, lock=False) if shared else [0.0] * (3 * slots)
        self.slots = slots

    def update(self, slot: int, rec: Records) -> None:
        a, i = self._a, 3 * slot
        a[i], a[i + 1], a[i + 2] = rec.done, rec.failed, rec.lat_sum

    def totals(self) -> tuple[int, int, float]:
        a = self._a
        return (int(sum(a[0::3])), int(sum(a[1::3])), float(sum(a[2::3])))


# --------------------------------------------------------------------------- one request


class _Client:
    def __init__(self, session: aiohttp.ClientSession, url: str, rec: Records, counters: Counters, slot: int,
                 t0: float) -> None:
        self.session = session
        self.url = url
        self.rec = rec
        self.counters = counters
        self.slot = slot
        self.t0 = t0

    async def send(self, req: Request) -> None:
        rec = self.rec
        clock = time.perf_counter
        ttft = math.nan
        role = 0
        reads = None
        started = clock()
        try:
            async with self.session.post(self.url, data=req.body, headers=req.headers) as resp:
                status = resp.status
                herd = resp.headers.get("x-herd")
                if herd is not None:
                    role = _ROLE_CODE.get(herd, 5)
                if req.stream and status == 200:
                    if rec.reads is not None:
                        reads = []
                    itl = rec.itl
                    prev = 0.0
                    tail = b""
                    async for data in resp.content.iter_any():
                        now = clock()
                        if prev:
                            itl.append(now - prev)
                        else:
                            ttft = now - started
                        prev = now
                        tail = (tail + data[-32:])[-32:]
                        if reads is not None:
                            reads.append((now - self.t0, data.count(b"data:")))
                    if _DONE not in tail:
                        status = INCOMPLETE  # the stream ended early, or with an error event
                else:
                    await resp.read()
        except TimeoutError:
            status = TIMEOUT
        except (aiohttp.ClientError, OSError):
            status = CONNECTION
        except asyncio.CancelledError:
            raise
        except Exception:  # counted, never fatal to the run
            status = EXCEPTION
        rec.add(started - self.t0, clock() - started, ttft, status, role, req.prompt, req.stream)
        if reads is not None:
            rec.reads.append(reads)
        if rec.done & 15 == 0:
            self.counters.update(self.slot, rec)


# --------------------------------------------------------------------------- loops


async def _closed(client: _Client, requests: Iterator[Request], load: Load) -> None:
    deadline = math.inf if load.duration is None else client.t0 + load.duration
    budget = [math.inf if load.requests is None else load.requests]
    clock = time.perf_counter

    async def worker() -> None:
        while budget[0] > 0 and clock() < deadline:
            budget[0] -= 1
            await client.send(next(requests))

    await asyncio.gather(*(worker() for _ in range(load.concurrency or 1)))


async def _open(client: _Client, requests: Iterator[Request], load: Load, seed: int) -> None:
    rng = random.Random(f"arrivals:{seed}")
    rate = float(load.rate or 1.0)
    deadline = math.inf if load.duration is None else client.t0 + load.duration
    left = math.inf if load.requests is None else load.requests
    inflight: set[asyncio.Task] = set()
    clock = time.perf_counter
    rec = client.rec
    due = client.t0
    while left > 0 and due < deadline:
        now = clock()
        if due > now:
            await asyncio.sleep(due - now)
            now = clock()
        rec.max_lag = max(rec.max_lag, now - due)
        req = next(requests)
        left -= 1
        if len(inflight) >= load.max_inflight:
            rec.dropped += 1
        else:
            task = asyncio.ensure_future(client.send(req))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        due += rng.expovariate(rate) if load.poisson else 1.0 / rate
    if inflight:
        await asyncio.gather(*inflight)


def _session(load: Load, timeout: float) -> aiohttp.ClientSession:
    limit = (load.concurrency or load.max_inflight) + 16
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=120, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout),
                                 auto_decompress=False, skip_auto_headers=("User-Agent",))


async def _drive(url: str, requests: Iterator[Request], load: Load, rec: Records, counters: Counters, slot: int,
                 seed: int, session: aiohttp.ClientSession) -> None:
    client = _Client(session, url, rec, counters, slot, time.perf_counter())
    if load.concurrency is not None:
        await _closed(client, requests, load)
    else:
        await _open(client, requests, load, seed)
    counters.update(slot, rec)


async def _phase(url: str, requests: Iterator[Request], load: Load, *, warmup: Load | None,
                 warmup_requests: Iterator[Request] | None, before_measure: Callable[[], Any] | None,
                 counters: Counters, slot: int, seed: int, timeout: float, keep_reads: bool) -> Records:
    biggest = load if warmup is None or (load.concurrency or load.max_inflight) >= (
        warmup.concurrency or warmup.max_inflight) else warmup
    async with _session(biggest, timeout) as session:
        if warmup is not None and warmup_requests is not None:
            await _drive(url, warmup_requests, warmup, Records(), Counters(), 0, seed, session)
        if before_measure is not None:
            result = before_measure()
            if asyncio.iscoroutine(result):
                await result
        rec = Records(keep_reads)
        cpu0 = _cpu()
        t0 = time.perf_counter()
        await _drive(url, requests, load, rec, counters, slot, seed, session)
        rec.elapsed = time.perf_counter() - t0
        rec.cpu_s = _cpu() - cpu0
        return rec


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _loop_runner() -> Callable[[Any], Any]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run
    return uvloop.run if hasattr(uvloop, "run") else asyncio.run


# --------------------------------------------------------------------------- progress


class Ticker:
    """Calls ``tick(elapsed_s)`` every ``interval`` seconds in a thread, while a phase runs."""

    def __init__(self, interval: float, ticks: Iterable[Callable[[float], None]]) -> None:
        self.interval = interval
        self.ticks = list(ticks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-ticker")
        self._t0 = 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            elapsed = time.perf_counter() - self._t0
            for tick in self.ticks:
                with contextlib.suppress(Exception):
                    tick(elapsed)

    def __enter__(self) -> Self:
        self._t0 = time.perf_counter()
        if self.ticks:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class Progress:
    """One status line per tick on stderr: requests, rate, errors, mean latency, upstream calls."""

    def __init__(self, label: str, counters: Counters, load: Load, upstream_calls: Callable[[], int | None] | None,
                 stream: Any = None) -> None:
        self.label = label
        self.counters = counters
        self.load = load
        self.upstream_calls = upstream_calls
        self.out = stream or sys.stderr
        self._last = (0.0, 0, 0.0)
        self._tty = bool(getattr(self.out, "isatty", lambda: False)())

    def __call__(self, elapsed: float) -> None:
        done, failed, lat_sum = self.counters.totals()
        t_prev, d_prev, l_prev = self._last
        self._last = (elapsed, done, lat_sum)
        dt = max(elapsed - t_prev, 1e-9)
        rate = (done - d_prev) / dt
        mean = (lat_sum - l_prev) / (done - d_prev) * 1000 if done > d_prev else float("nan")
        goal = f"/{self.load.duration:g}s" if self.load.duration is not None else ""
        upstream = ""
        if self.upstream_calls is not None:
            calls = self.upstream_calls()
            if calls is not None:
                upstream = f"  upstream calls {calls:,}"
        line = (f"  {self.label:<24} {elapsed:5.1f}s{goal}  done {done:,}  {rate:,.0f} req/s  "
                f"mean {mean:,.1f} ms  errors {failed:,}{upstream}")
        if self._tty:
            self.out.write("\r\x1b[2K" + line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def end(self) -> None:
        if self._tty:
            self.out.write("\r\x1b[2K")
            self.out.flush()


# --------------------------------------------------------------------------- a phase


@dataclass
class Phase:
    """One measured run of one target."""

    url: str
    requests: Iterator[Request] | Callable[[int, int], Iterator[Request]]  # or a factory (k, n) for procs
    load: Load
    warmup: Load | None = None
    warmup_requests: Iterator[Request] | Callable[[int, int], Iterator[Request]] | None = None
    before_measure: Callable[[], Any] | None = None
    ticks: list[Callable[[float], None]] = field(default_factory=list)
    label: str = ""
    upstream_calls: Callable[[], int | None] | None = None
    progress: bool = True
    timeout: float = 120.0
    keep_reads: bool = False
    seed: int = 0
    procs: int = 1
    tick_interval: float = 1.0


def _iter_for(source: Any, k: int, n: int) -> Iterator[Request] | None:
    if source is None:
        return None
    if callable(source) and not isinstance(source, Iterator):
        return source(k, n)
    if n == 1:
        return source
    raise ValueError("with procs > 1, pass request factories (k, n) -> iterator, not iterators")


def run(phase: Phase) -> Records:
    """Run one phase (warm-up, hook, measured load) and return its records.

    The load generator's own cyclic garbage collection is off while it runs (one collection
    before): a full collection over the records of 1,000 streams can stall this process for
    tens of ms, which would show up as the target's latency."""
    gc.collect()
    gc.disable()
    try:
        return _run(phase)
    finally:
        gc.enable()


def _run(phase: Phase) -> Records:
    url = chat_url(phase.url)
    n = max(1, phase.procs)
    counters = Counters(n, shared=n > 1)
    ticks = list(phase.ticks)
    progress = Progress(phase.label, counters, phase.load, phase.upstream_calls) if phase.progress else None
    if progress is not None:
        ticks.append(progress)
    if n == 1:
        return _run_here(phase, url, counters, ticks, progress)
    return _run_procs(phase, url, counters, ticks, progress, n)


def _run_here(phase: Phase, url: str, counters: Counters, ticks: list, progress: Progress | None) -> Records:
    ticker: Ticker | None = None

    def start_ticks() -> Any:
        nonlocal ticker
        result = phase.before_measure() if phase.before_measure is not None else None
        ticker = Ticker(phase.tick_interval, ticks).__enter__()
        return result

    try:
        return _loop_runner()(_phase(
            url, _iter_for(phase.requests, 0, 1), phase.load, warmup=phase.warmup,
            warmup_requests=_iter_for(phase.warmup_requests, 0, 1), before_measure=start_ticks, counters=counters,
            slot=0, seed=phase.seed, timeout=phase.timeout, keep_reads=phase.keep_reads))
    finally:
        if ticker is not None:
            ticker.__exit__()
        if progress is not None:
            progress.end()


def _child(phase: Phase, url: str, counters: Counters, k: int, n: int, ready: Any, go: Any, results: Any) -> None:
    async def wait_go() -> None:
        ready.put(k)
        await asyncio.get_running_loop().run_in_executor(None, go.wait, 600)

    try:
        rec = _loop_runner()(_phase(
            url, _iter_for(phase.requests, k, n), phase.load.share(k, n),
            warmup=phase.warmup.share(k, n) if phase.warmup else None,
            warmup_requests=_iter_for(phase.warmup_requests, k, n), before_measure=wait_go, counters=counters,
            slot=k, seed=phase.seed * 1000 + k, timeout=phase.timeout, keep_reads=phase.keep_reads))
        results.put((k, rec, None))
    except BaseException as e:  # reported to the parent
        results.put((k, None, f"{type(e).__name__}: {e}"))


def _run_procs(phase: Phase, url: str, counters: Counters, ticks: list, progress: Progress | None,
               n: int) -> Records:
    ctx = mp.get_context("fork")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    children = [ctx.Process(target=_child, args=(phase, url, counters, k, n, ready, go, results), daemon=True)
                for k in range(n)]
    for c in children:
        c.start()
    try:
        warm = 0
        limit = time.monotonic() + 600
        while warm < n:
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=1)
                warm += 1
            if not all(c.is_alive() for c in children) or time.monotonic() > limit:
                raise RuntimeError("a load generator process died during the warm-up")
        if phase.before_measure is not None:
            phase.before_measure()
        go.set()
        merged = Records(phase.keep_reads)
        with Ticker(phase.tick_interval, ticks):
            got = 0
            while got < n:
                try:
                    k, rec, error = results.get(timeout=1)
                except queue.Empty:
                    if not any(c.is_alive() for c in children):
                        raise RuntimeError("the load generator processes ended without results") from None
                    continue
                if error is not None:
                    raise RuntimeError(f"load generator process {k} failed: {error}")
                merged.extend(rec)
                got += 1
        return merged
    finally:
        if progress is not None:
            progress.end()
        for c in children:
            c.join(timeout=5)
            if c.is_alive():
                c.terminate()
