"""`[server] workers = N`: N processes on one port that still make one upstream call per burst.

Real processes (`python -m proxy serve` with workers = 2, the simulator, aiohttp clients),
plus the node's claims table and metrics merge on their own (proxy.node, proxy.workers).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import stat
import time
import uuid
from pathlib import Path

import aiohttp
import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.harness import Herd
from benchmarks.simulator import expected_text
from proxy.config import parse_settings
from proxy.node import BUCKET_SLOTS, ClaimTable, create_table, merge_metrics
from proxy.workers import Supervisor
from tests.harness import chat_calls, sim_reset, to_toml


def _config(sim_url: str, workers: int = 2, **server) -> str:
    return to_toml({
        "server": {"workers": workers, "shutdown_grace_s": 10, "access_log": False, **server},
        "auth": {"mode": "open"},
        "upstreams": {"sim": {"base_url": f"{sim_url}/v1"}},
    })


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))


def _metric_reaches(url: str, name: str, least: float, timeout: float = 30.0) -> float:
    """`name`'s node total once it is at least `least` (a request is counted as it ends)."""
    end = time.monotonic() + timeout
    while (value := _metric(url, name)) < least:
        assert time.monotonic() < end, f"{name} stayed at {value}, below {least}"
        time.sleep(0.1)
    return value


def _start(tmp_path: Path, sim_url: str, workers: int = 2, **server) -> Herd:
    return _start_config(tmp_path, _config(sim_url, workers, **server), workers)


def _start_config(tmp_path: Path, config: str, workers: int) -> Herd:
    herd = Herd(config, tmp_path, log_path=tmp_path / "herd.log").start(timeout=120)
    end = time.monotonic() + 120
    while _metric(herd.url, "herd_workers") < workers:  # every worker up, not only the first
        assert time.monotonic() < end, "the workers never all came up"
        time.sleep(0.2)
    return herd


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids |= {int(k) for k in (task / "children").read_text().split()}
    return kids


def _workers_of(pid: int) -> set[int]:
    """The supervisor's worker processes (its multiprocessing resource tracker aside)."""
    return {k for k in _children(pid) if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()
            and b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()}


async def _burst(url: str, n: int, prompt: str) -> list[tuple[int, str, str, bytes]]:
    """`n` identical requests at once, every other one streamed; (status, x-herd, x-herd-flight, body)."""
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                     timeout=timeout) as session:
        async def one(i: int) -> tuple[int, str, str, bytes]:
            async with session.post(url + "/v1/chat/completions", json={**body, "stream": bool(i % 2)}) as r:
                return r.status, r.headers.get("x-herd", ""), r.headers.get("x-herd-flight", ""), await r.read()

        return await asyncio.gather(*[one(i) for i in range(n)])


def _text(raw: bytes) -> str:
    """The answer's text, from a JSON body or an SSE stream."""
    if not raw.startswith(b"data:"):
        return orjson.loads(raw)["choices"][0]["message"]["content"]
    parts = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in orjson.loads(line[6:])["choices"]:
                parts.append(choice["delta"].get("content") or "")
    assert raw.rstrip().endswith(b"data: [DONE]")
    return "".join(parts)


def test_a_burst_of_1000_identical_requests_over_two_workers_makes_one_upstream_call(tmp_path, sim):
    # the flight lasts long enough for the whole burst to arrive on a loaded machine
    sim_reset(sim.url, ttft_ms=5000)
    herd = _start(tmp_path, sim.url)
    try:
        prompt = f"burst {uuid.uuid4()}"
        results = asyncio.run(_burst(herd.url, 1000, prompt))
        assert collections.Counter(status for status, *_ in results) == {200: 1000}
        want = expected_text({"messages": [{"role": "user", "content": prompt}]})
        assert {_text(raw) for *_, raw in results} == {want}
        assert chat_calls(sim.url) == 1
        roles = collections.Counter(role for _, role, _, _ in results)
        assert roles["leader"] == 1
        # one flight id, the same in both workers: the second worker followed the first's flight
        assert len({flight for _, _, flight, _ in results}) == 1
        assert _metric(herd.url, 'herd_shared_flights_total{role="follow"}') >= 1
    finally:
        herd.stop()


def test_unique_requests_spread_over_both_workers_and_never_share(tmp_path, sim):
    sim_reset(sim.url, ttft_ms=50)
    herd = _start(tmp_path, sim.url)
    try:
        async def unique(n: int) -> list[tuple[int, str]]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32, force_close=True)) as s:
                async def one(i: int) -> tuple[int, str]:
                    body = {"model": "m", "messages": [{"role": "user", "content": f"unique {i} {uuid.uuid4()}"}]}
                    async with s.post(herd.url + "/v1/chat/completions", json=body) as r:
                        await r.read()
                        return r.status, r.headers["x-herd"] + ":" + r.headers["x-herd-flight"]

                return await asyncio.gather(*[one(i) for i in range(n)])

        results = asyncio.run(unique(200))
        assert {status for status, _ in results} == {200}
        assert {tag.split(":")[0] for _, tag in results} == {"leader"}
        # a flight id starts with its process's own prefix (proxy.ids): both workers answered
        assert len({tag.split(":")[1][:8] for _, tag in results}) == 2
        assert chat_calls(sim.url) == 200
        # /metrics on the port is the node's: both workers' requests, summed
        assert _metric(herd.url, 'herd_requests_total{outcome="leader"}') == 200
        assert _metric(herd.url, "herd_workers") == 2
    finally:
        herd.stop()


def test_sigterm_drains_every_worker_then_exits(tmp_path, sim):
    sim_reset(sim.url, ttft_ms=3000)
    herd = _start(tmp_path, sim.url)
    assert herd.popen is not None

    async def burst_then_term() -> list[tuple[int, str, str, bytes]]:
        task = asyncio.ensure_future(_burst(herd.url, 100, "drain me"))
        end = time.monotonic() + 60
        while _metric(herd.url, "herd_inflight_waiters") < 100:
            assert time.monotonic() < end, "the burst never all joined"
            await asyncio.sleep(0.1)
        herd.popen.send_signal(signal.SIGTERM)
        return await task

    results = asyncio.run(burst_then_term())
    assert [status for status, *_ in results] == [200] * 100
    assert herd.popen.wait(timeout=60) == 0
    assert chat_calls(sim.url) == 1
    assert (tmp_path / "herd.log").read_text().count("herd stopped: every flight finished") == 2


def test_a_killed_worker_is_restarted_and_the_nodes_counters_do_not_go_back(tmp_path, sim):
    herd = _start(tmp_path, sim.url)
    assert herd.popen is not None
    try:
        for i in range(24):  # new connections: both workers answer some
            body = {"model": "m", "messages": [{"role": "user", "content": f"before {i} {uuid.uuid4()}"}]}
            assert httpx.post(herd.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        served = _metric_reaches(herd.url, "herd_requests_total", 24)  # counted as each one ends
        before = _workers_of(herd.popen.pid)
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        end = time.monotonic() + 120
        while True:
            now = _workers_of(herd.popen.pid)
            if len(now) == 2 and victim not in now and _metric(herd.url, "herd_workers") == 2:
                break
            assert time.monotonic() < end, "the killed worker was not replaced"
            time.sleep(0.2)
        # the victim's counters as the node last reported them carry on in its successor:
        # a total that went back would read as a reset of the whole node's counters
        assert _metric(herd.url, "herd_requests_total") == served
        r = httpx.post(herd.url + "/v1/chat/completions",
                       json={"model": "m", "messages": [{"role": "user", "content": "after"}]}, timeout=30)
        assert r.status_code == 200
        assert _metric_reaches(herd.url, "herd_requests_total", served + 1) == served + 1
    finally:
        herd.stop()


def test_workers_that_keep_failing_at_start_stop_the_node_with_an_error(tmp_path, sim):
    # a valid config whose workers cannot start: the semantic model file is missing
    config = _config(sim.url) + '\n[coalesce]\nmode = "semantic"\nmodel_path = "/nonexistent/model.onnx"\n'
    herd = Herd(config, tmp_path, log_path=tmp_path / "herd.log").launch()
    assert herd.popen is not None
    assert herd.popen.wait(timeout=240) == 1
    assert "workers keep failing at start" in (tmp_path / "herd.log").read_text()


def test_the_node_directory_is_private_to_its_user(sim):
    settings = parse_settings({"auth": {"mode": "open"}, "upstreams": {"sim": {"base_url": f"{sim.url}/v1"}}})
    import socket

    sock = socket.socket()
    try:
        supervisor = Supervisor(settings, 2, [sock, sock])
        assert stat.S_IMODE(os.stat(supervisor.node_dir).st_mode) == 0o700
        os.rmdir(supervisor.node_dir)
    finally:
        sock.close()


# -- the claims table and the metrics merge, without processes --------------------------------


def test_the_claims_table_gives_a_key_to_one_worker_until_it_lets_go(tmp_path):
    create_table(tmp_path)
    a, b = ClaimTable(tmp_path, 0), ClaimTable(tmp_path, 1)
    b.pid = os.getppid()  # another live process
    try:
        assert a.claim("k", "flightA") is None  # a leads
        assert b.claim("k", "flightB") == (0, os.getpid(), "flightA")  # b follows a
        assert b.claim("other", "flightC") is None  # another key: b leads it
        a.release("k", "flightB")  # not a's flight id: nothing happens
        assert b.claim("k", "flightB") == (0, os.getpid(), "flightA")
        a.release("k", "flightA")
        assert b.claim("k", "flightB") is None  # free again: b leads now
        assert a.claim("k", "flightD") == (1, os.getppid(), "flightB")
        # takeover: a replaces b's flight (b died, or lost it)
        assert a.claim("k", "flightD", replace="flightB") is None
    finally:
        a.close()
        b.close()


def test_a_claim_held_by_a_dead_process_is_taken_over(tmp_path):
    create_table(tmp_path)
    a, b = ClaimTable(tmp_path, 0), ClaimTable(tmp_path, 1)
    a.pid = 2 ** 22 + 12345  # no such process
    try:
        assert a.claim("k", "dead") is None
        assert b.claim("k", "mine") is None
    finally:
        a.close()
        b.close()


def _keys_in_one_bucket(n: int) -> list[str]:
    """`n` keys whose claims fall in one bucket of the table (found by trying "key 0", "key 1", ...)."""
    buckets: dict[int, list[str]] = collections.defaultdict(list)
    i = 0
    while True:
        key = f"key {i}"
        bucket = buckets[ClaimTable.where(key)[1]]
        bucket.append(key)
        if len(bucket) == n:
            return bucket
        i += 1


def test_keys_that_share_a_bucket_are_each_shared(tmp_path):
    """A claim of a worker's second key must not overwrite its first one's: the sibling that
    asks for the first key then led it too, and the node made two upstream calls for it."""
    create_table(tmp_path)
    a, b = ClaimTable(tmp_path, 0), ClaimTable(tmp_path, 1)
    b.pid = os.getppid()  # another live process
    try:
        keys = _keys_in_one_bucket(BUCKET_SLOTS)
        for i, key in enumerate(keys):
            assert a.claim(key, f"a{i}") is None
        for i, key in enumerate(keys):
            assert b.claim(key, f"b{i}") == (0, os.getpid(), f"a{i}")
        a.release(keys[3], "a3")
        assert b.claim(keys[3], "b3") is None  # its slot is b's now; the others are still a's
        assert a.claim(keys[3], "a3") == (1, os.getppid(), "b3")
        assert b.claim(keys[4], "b4") == (0, os.getpid(), "a4")
    finally:
        a.close()
        b.close()


_BUCKET_KEYS = _keys_in_one_bucket(BUCKET_SLOTS + 2)
_OPS = st.lists(st.tuples(st.sampled_from([0, 1]), st.booleans(), st.sampled_from(_BUCKET_KEYS + ["alone"]),
                          st.sampled_from(["f", "g"])), max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS)
def test_the_claims_table_agrees_with_a_dictionary_of_owners(tmp_path_factory, ops):
    """Any sequence of claims and releases by two workers, on keys that crowd one bucket: a
    claim is refused exactly when the other worker holds the key, naming its flight; a key is
    left unshared only when its bucket is full of other keys' flights."""
    path = tmp_path_factory.mktemp("table")
    create_table(path)
    tables = [ClaimTable(path, 0), ClaimTable(path, 1)]
    tables[1].pid = os.getppid()
    held: dict[str, tuple[int, str]] = {}  # key -> (worker, flight id), as the table should hold it
    try:
        for who, claiming, key, flight_id in ops:
            flight_id = f"{flight_id}{who}"
            if not claiming:
                tables[who].release(key, flight_id)
                if held.get(key) == (who, flight_id):
                    del held[key]
                continue
            got = tables[who].claim(key, flight_id)
            if key in held and held[key][0] != who:
                owner, theirs = held[key]
                assert got == (owner, tables[owner].pid, theirs)
                continue
            assert got is None
            crowded = sum(k in held for k in _BUCKET_KEYS) >= BUCKET_SLOTS and key in _BUCKET_KEYS
            if key in held or not crowded:
                held[key] = (who, flight_id)
    finally:
        for table in tables:
            table.close()


def test_a_worker_whose_predecessors_counters_are_unreadable_starts_from_zero(tmp_path):
    from proxy.coalescer import Group
    from proxy.metrics import Metrics
    from proxy.node import NodeFlights, Worker

    create_table(tmp_path)
    (tmp_path / "w0.metrics").write_bytes(b"herd_requests_total{outcome= not prometheus\n")

    async def main() -> None:
        node = NodeFlights(Worker(str(tmp_path), 0, 2), Group(), Metrics())
        await node.start()
        try:
            text = node.own_metrics().decode()
            assert "herd_workers 1.0" in text.splitlines()
        finally:
            await node.aclose()

    asyncio.run(main())
    assert b"herd_workers" in (tmp_path / "w0.metrics").read_bytes()  # what it reports replaced it


def test_node_metrics_are_sums_of_the_workers(tmp_path):
    from proxy.metrics import Metrics

    one, two = Metrics(), Metrics()
    one.requests.labels("leader").inc(3)
    two.requests.labels("leader").inc(4)
    two.requests.labels("follower").inc(3)
    one.upstream_calls.labels("sim").inc(3)
    two.upstream_calls.labels("sim").inc(4)
    one.upstream_latency.labels("sim").observe(0.02)
    two.upstream_latency.labels("sim").observe(0.2)
    one.redis_up.labels("standalone").set(1)
    two.redis_up.labels("standalone").set(0)
    merged = merge_metrics([one.render(), two.render()]).decode()
    lines = set(merged.splitlines())
    assert 'herd_requests_total{outcome="leader"} 7.0' in lines
    assert 'herd_upstream_calls_total{upstream="sim"} 7.0' in lines
    assert 'herd_upstream_seconds_count{upstream="sim"} 2.0' in lines
    assert 'herd_upstream_seconds_bucket{le="0.025",upstream="sim"} 1.0' in lines
    assert 'herd_redis_up{backend="standalone"} 0.0' in lines  # up only if every worker's link is
    ratio = next(line for line in lines if line.startswith("herd_coalesce_ratio "))
    assert float(ratio.split()[1]) == pytest.approx(0.3)  # 1 - 7 calls / 10 served
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(merged)}
    assert names >= {"herd_requests", "herd_upstream_seconds"}
    assert not any(name.endswith("_created") for name in names)


# -- a flight led by a sibling, in one process (two NodeFlights on one table) ------------------


def _chunk(text: str):
    from proxy.chunks import Chunk

    return Chunk({"id": "c1", "created": 1, "choices": [{"index": 0, "delta": {"content": text}}]})


async def _two_workers(tmp_path):
    from proxy.coalescer import Group
    from proxy.metrics import Metrics
    from proxy.node import NodeFlights, Worker

    create_table(tmp_path)
    owner = NodeFlights(Worker(str(tmp_path), 0, 2), Group(), Metrics())
    follower = NodeFlights(Worker(str(tmp_path), 1, 2), Group(), Metrics())
    follower.table.pid = os.getppid()  # a live process other than the owner's
    await owner.start()
    await follower.start()
    return owner, follower


async def _until(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def test_a_worker_that_misses_its_cache_gets_the_answer_a_sibling_keeps(tmp_path):
    """NodeCache: an answer kept by one worker is a hit in the other (asked over the owner's
    socket, kept there too for the time it has left); an answer the owner dropped is a miss."""
    from proxy.answer import Answer
    from proxy.cache import MemoryCache
    from proxy.node import NodeCache

    async def main() -> None:
        owner, sibling = await _two_workers(tmp_path)
        sibling.answers.pid = os.getppid()  # its notes, like its claims, come from another process
        clock = [1000.0]
        mine = NodeCache(MemoryCache(clock=lambda: clock[0]), owner)
        theirs = NodeCache(MemoryCache(clock=lambda: clock[0]), sibling)
        answer = Answer(b"data: {}\n\n", b"", b'{"id": "x"}')
        try:
            assert await theirs.get("k") is None  # nobody keeps it
            mine.keep("k", answer, 30.0)
            clock[0] += 10.0
            got = await theirs.get("k")
            assert got is not None and (got.sse, got.usage_sse, got.body) == (answer.sse, answer.usage_sse, answer.body)
            entry = theirs.memory.entry("k")  # kept here too, with the 20 s it had left
            assert entry is not None and entry[1] == pytest.approx(20.0, abs=1.0)
            mine.keep("gone", answer, 5.0)
            clock[0] += 6.0  # expired at the owner: the sibling's ask is a miss
            assert await theirs.get("gone") is None
            asks = sibling.metrics.node_cache_asks
            assert asks.labels("hit")._value.get() == 1 and asks.labels("miss")._value.get() == 1
            assert await mine.get("k") is not None  # its own, without an ask
        finally:
            await sibling.aclose()
            await owner.aclose()

    asyncio.run(main())


def test_the_answer_directory_names_the_live_sibling_that_noted_a_key_last(tmp_path):
    from proxy.node import AnswerDirectory

    create_table(tmp_path)
    a, b = AnswerDirectory(tmp_path, 0), AnswerDirectory(tmp_path, 1)
    b.pid = os.getppid()
    try:
        assert a.holder("k") is None and b.holder("k") is None
        a.note("k")
        assert b.holder("k") == 0 and a.holder("k") is None  # not itself
        assert b.holder("other") is None
        b.note("k")
        assert a.holder("k") == 1 and b.holder("k") is None
        a.pid = 2 ** 22 + 12345  # no such process
        a.note("dead")
        assert b.holder("dead") is None
    finally:
        a.close()
        b.close()


def test_a_follower_takes_the_flight_over_when_its_owner_is_lost_mid_flight(tmp_path):
    async def main() -> None:
        owner, follower = await _two_workers(tmp_path)
        release = asyncio.Event()

        async def owner_work(flight) -> None:
            claim = await owner.claim("k", flight.id)
            assert claim.lead
            owner.lead("k", flight, claim)
            flight.publish(_chunk("a"))
            await release.wait()  # never answered: the owner is lost first

        calls = []

        async def call(splice, stream: bool) -> None:
            calls.append(stream)
            splice.extend([_chunk("a"), _chunk("b")])

        led = []

        async def follower_work(flight) -> None:
            claim = await follower.claim("k", flight.id)
            assert not claim.lead
            await follower.mirror("k", claim, flight, call, True, led.append)

        mine = owner.group.acquire(["k"], owner_work)
        await _until(lambda: bool(mine.flight.chunks))
        theirs = follower.group.acquire(["k"], follower_work)
        await _until(lambda: bool(theirs.flight.chunks))  # the owner's first chunk came over
        assert calls == []
        # the owner is lost: its socket closes mid-flight, and its flight is no longer there
        owner._server.close()
        owner._led.clear()
        for task in list(owner._tasks):
            task.cancel()
        await theirs.flight.wait()
        assert theirs.flight.error is None
        assert [c.data["choices"][0]["delta"]["content"] for c in theirs.flight.chunks] == ["a", "b"]
        assert calls == [True] and len(led) == 1  # it called the upstream itself, as the new leader
        follower.group.release(theirs)
        owner.group.release(mine)
        await follower.aclose()
        await owner.aclose()

    asyncio.run(main())


def test_the_owner_keeps_its_call_while_a_sibling_follows_and_cancels_it_when_everyone_left(tmp_path):
    async def main() -> None:
        owner, follower = await _two_workers(tmp_path)
        cancelled = asyncio.Event()

        async def owner_work(flight) -> None:
            claim = await owner.claim("k", flight.id)
            owner.lead("k", flight, claim)
            flight.publish(_chunk("a"))
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def call(splice, stream: bool) -> None:
            raise AssertionError("the follower must not call the upstream")

        async def follower_work(flight) -> None:
            claim = await follower.claim("k", flight.id)
            await follower.mirror("k", claim, flight, call, True, lambda claim: None)

        mine = owner.group.acquire(["k"], owner_work)
        await _until(lambda: bool(mine.flight.chunks))
        theirs = follower.group.acquire(["k"], follower_work)
        await _until(lambda: bool(theirs.flight.chunks))
        owner.group.release(mine)  # the owner's own client leaves: the sibling's still waits
        await asyncio.sleep(0.2)
        assert not cancelled.is_set() and not mine.flight.done
        follower.group.release(theirs)  # the sibling's client leaves too: nobody waits
        await asyncio.wait_for(cancelled.wait(), 20)
        await _until(lambda: owner.table.claim("k", "next") is None)  # the slot was freed
        await follower.aclose()
        await owner.aclose()

    asyncio.run(main())


def test_embeddings_inputs_are_embedded_once_across_workers(tmp_path, sim):
    """8 requests of 64 inputs drawn from 128 strings, each on a new connection (so both
    workers get some): each distinct string is embedded upstream once, whichever worker led it."""
    import random

    from tests.harness import sim_stats

    sim_reset(sim.url, ttft_ms=1500)
    herd = _start(tmp_path, sim.url)
    try:
        rng = random.Random(5)
        strings = [f"node chunk {i} {uuid.uuid4()}" for i in range(128)]
        asks = [rng.sample(strings, 64) for _ in range(8)]

        async def burst() -> list[tuple[int, list]]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
                async def one(inputs: list[str]) -> tuple[int, list]:
                    body = {"model": "text-embedding-3-small", "input": inputs}
                    async with s.post(herd.url + "/v1/embeddings", json=body) as r:
                        return r.status, (await r.json())["data"]

                return await asyncio.gather(*[one(a) for a in asks])

        results = asyncio.run(burst())
        assert [status for status, _ in results] == [200] * 8
        assert all(len(data) == 64 for _, data in results)
        assert sim_stats(sim.url, log=False)["embedded_inputs"] == len({s for a in asks for s in a})
        assert _metric(herd.url, 'herd_shared_flights_total{role="follow"}') >= 1
    finally:
        herd.stop()


@pytest.mark.parametrize("redis", ["up", "down", "cache only"])
def test_workers_share_flights_through_redis_while_it_is_up_else_through_the_node(tmp_path, sim, redis):
    """[redis] url set: the workers share a flight through Redis as replicas do; while nobody
    listens there (or it keeps only the cache), through the node's table: never one upstream
    call per worker."""
    from benchmarks.harness import free_port
    from tests.redis_servers import RedisServer

    sim_reset(sim.url, ttft_ms=3000)
    with contextlib.ExitStack() as stack:
        if redis == "down":
            section = f'url = "redis://127.0.0.1:{free_port()}/0"'
        else:
            server = stack.enter_context(RedisServer(workdir=tmp_path))
            section = f'url = "{server.url}"' + ("\nshare_flights = false" if redis == "cache only" else "")
        config = _config(sim.url) + f"\n[redis]\n{section}\n"
        config = config.replace('[auth]\nmode = "open"', '[auth]\nmode = "open"\nhash_key = "node-secret"')
        herd = _start_config(tmp_path, config, 2)
        try:
            results = asyncio.run(_burst(herd.url, 300, f"{redis} burst {uuid.uuid4()}"))
            assert collections.Counter(status for status, *_ in results) == {200: 300}
            assert chat_calls(sim.url) == 1
            assert len({flight for _, _, flight, _ in results}) == 1
            assert _metric(herd.url, 'herd_shared_flights_total{role="follow"}') >= 1
            assert _metric(herd.url, "herd_redis_up") == (0 if redis == "down" else 1)
        finally:
            herd.stop()


def test_an_answer_cached_by_one_worker_is_a_cache_hit_on_every_worker(tmp_path, sim):
    """Without Redis each worker keeps its own memory cache; a repeat that lands on the other
    worker (24 new connections: both get some) is still a hit, from the sibling's cache."""
    sim_reset(sim.url, ttft_ms=50)
    herd = _start(tmp_path, sim.url)
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": f"cached once {uuid.uuid4()}"}]}
        first = httpx.post(herd.url + "/v1/chat/completions", json=body, timeout=60)
        assert first.status_code == 200 and first.headers["x-herd"] == "leader"

        async def repeats(n: int) -> list[tuple[int, str, str, bytes]]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                out = []
                for _ in range(n):
                    async with session.post(herd.url + "/v1/chat/completions", json=body) as r:
                        out.append((r.status, r.headers["x-herd"], r.headers["x-herd-flight"], await r.read()))
                return out

        results = asyncio.run(repeats(24))
        assert {(status, role) for status, role, _, _ in results} == {(200, "cache")}
        assert {orjson.loads(raw)["choices"][0]["message"]["content"] for *_, raw in results} == \
            {first.json()["choices"][0]["message"]["content"]}
        assert len({flight[:8] for _, _, flight, _ in results}) == 2  # both workers answered
        assert chat_calls(sim.url) == 1
        assert _metric(herd.url, 'herd_node_cache_asks_total{result="hit"}') >= 1
    finally:
        herd.stop()


def test_workers_that_share_nothing_each_lead_their_own_flight(tmp_path, sim):
    """[server] workers_share = false: N herds behind one port (what the bench compares the
    node's sharing with): a burst over 2 workers makes one call per worker."""
    sim_reset(sim.url, ttft_ms=3000)
    herd = _start(tmp_path, sim.url, workers_share=False)
    try:
        results = asyncio.run(_burst(herd.url, 300, f"alone burst {uuid.uuid4()}"))
        assert collections.Counter(status for status, *_ in results) == {200: 300}
        assert chat_calls(sim.url) == 2
        assert len({flight for _, _, flight, _ in results}) == 2
        assert _metric(herd.url, "herd_shared_flights_total") == 0
    finally:
        herd.stop()


def test_workers_whose_supervisor_was_killed_drain_and_exit(tmp_path, sim):
    herd = _start(tmp_path, sim.url)
    assert herd.popen is not None
    workers = _workers_of(herd.popen.pid)
    assert len(workers) == 2
    herd.popen.kill()  # SIGKILL: the supervisor cannot tell its workers
    herd.popen.wait(timeout=10)
    end = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and b"Z" not in _state(pid) for pid in workers):
        assert time.monotonic() < end, "orphaned workers kept running"
        time.sleep(0.2)


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return b"Z"


def test_a_follower_gets_the_end_of_a_flight_that_finishes_right_after_a_chunk(tmp_path):
    # The owner's publisher waits for the flight's next change; a flight that finishes in the
    # same few loop steps as its last chunk must still be seen to end (it once was missed,
    # and the sibling's clients waited until their deadline).
    async def main() -> None:
        owner, follower = await _two_workers(tmp_path)
        for steps in range(8):
            go = asyncio.Event()
            key = f"k{steps}"

            async def owner_work(flight, key=key, go=go, steps=steps) -> None:
                claim = await owner.claim(key, flight.id)
                owner.lead(key, flight, claim)
                await go.wait()
                flight.publish(_chunk("a"))
                for _ in range(steps):
                    await asyncio.sleep(0)

            async def call(splice, stream: bool) -> None:
                raise AssertionError("the follower must not call the upstream")

            async def follower_work(flight, key=key) -> None:
                claim = await follower.claim(key, flight.id)
                await follower.mirror(key, claim, flight, call, True, lambda claim: None)

            mine = owner.group.acquire([key], owner_work)
            await asyncio.sleep(0.01)
            theirs = follower.group.acquire([key], follower_work)
            await _until(lambda flight=mine.flight: flight.waiters == 2)  # the sibling follows
            await asyncio.sleep(0.05)
            go.set()
            await asyncio.wait_for(theirs.flight.wait(), 5)
            assert theirs.flight.error is None and len(theirs.flight.chunks) == 1
            follower.group.release(theirs)
            owner.group.release(mine)
        await follower.aclose()
        await owner.aclose()

    asyncio.run(main())


def test_a_flight_that_ended_is_followed_unless_the_request_wants_a_fresh_answer(tmp_path):
    """A sibling may reach a flight that has ended but is still registered (its task's done
    callback, which frees the slot, has not run yet): it gets that answer, unless the request
    wants a fresh one (cache-control: no-cache, or a sampled answer that may not be reused),
    which takes the flight over instead."""
    from proxy.coalescer import Flight

    async def main() -> None:
        owner, follower = await _two_workers(tmp_path)
        ended = Flight(["k"])  # no task: stays registered after its end
        claim = await owner.claim("k", ended.id)
        owner.lead("k", ended, claim)
        ended.publish(_chunk("a"))
        ended.finish()

        calls = []

        async def call(splice, stream: bool) -> None:
            calls.append(stream)
            splice.publish(_chunk("new"))

        async def follow(fresh: bool):
            async def work(flight) -> None:
                claim = await follower.claim("k", flight.id)
                assert not claim.lead
                await follower.mirror("k", claim, flight, call, True, lambda claim: None, fresh=fresh)

            ticket = follower.group.acquire(["k"], work)
            await asyncio.wait_for(ticket.flight.wait(), 10)
            follower.group.release(ticket)
            return ticket.flight

        late = await follow(fresh=False)
        assert [c.data["choices"][0]["delta"]["content"] for c in late.chunks] == ["a"] and calls == []
        fresh = await follow(fresh=True)
        assert [c.data["choices"][0]["delta"]["content"] for c in fresh.chunks] == ["new"] and calls == [True]
        await follower.aclose()
        await owner.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("api", ["chat", "embeddings"])
def test_a_request_that_missed_the_cache_just_before_a_siblings_flight_ended_gets_its_answer(tmp_path, sim, api):
    """A worker reads its cache (a miss), the sibling's flight for that key then ends (the
    answer kept, the slot freed), and the worker wins the claim: it looks at the answer
    directory once more and answers from the sibling's cache, not with a second call."""
    from proxy.gateway import Gateway
    from proxy.node import Worker
    from tests.harness import HerdServer, herd_settings, sim_stats

    create_table(tmp_path)
    sim_reset(sim.url)
    settings = herd_settings(sim.url, auth={"hash_key": "node-secret"}, cache={"enabled": True})
    path, body = {
        "chat": ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "ended just now"}]}),
        "embeddings": ("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["ended", "just now"]}),
    }[api]

    def upstream_work() -> tuple[int, int]:
        return chat_calls(sim.url), sim_stats(sim.url, log=False)["embedded_inputs"]

    with HerdServer(settings, Gateway(settings, worker=Worker(str(tmp_path), 0, 2))) as owner, \
            HerdServer(settings, Gateway(settings, worker=Worker(str(tmp_path), 1, 2))) as sibling:
        node = sibling.gateway.node
        assert node is not None
        node.table.pid = node.answers.pid = os.getppid()  # as if in a process of its own
        first = httpx.post(owner.url + path, json=body, timeout=30)
        assert first.status_code == 200 and first.headers["x-herd"] == "leader"
        done = upstream_work()
        cache = sibling.gateway.cache

        async def read_before_the_end(key: str):
            return None  # what its cache read gave, before the owner kept the answer

        cache.get = read_before_the_end  # type: ignore[method-assign]
        late = httpx.post(sibling.url + path, json=body, timeout=30)
        assert late.status_code == 200 and late.headers["x-herd"] == "cache"
        assert late.json()["data" if api == "embeddings" else "choices"] == \
            first.json()["data" if api == "embeddings" else "choices"]
        assert upstream_work() == done


def test_a_sampled_answer_that_may_not_be_cached_is_not_handed_to_a_sibling_after_its_flight(tmp_path, sim):
    # [cache] sampled_ttl_seconds = 0: a sampled answer is never reused once its flight ended,
    # on one worker (no cache entry) or across workers (none in the sibling's cache either)
    from proxy.gateway import Gateway
    from proxy.node import Worker
    from tests.harness import HerdServer, herd_settings

    create_table(tmp_path)
    settings = herd_settings(sim.url, auth={"hash_key": "node-secret"},
                             cache={"enabled": True, "sampled_ttl_seconds": 0})
    body = {"model": "m", "temperature": 1, "messages": [{"role": "user", "content": "draw once"}]}
    with HerdServer(settings, Gateway(settings, worker=Worker(str(tmp_path), 0, 2))) as owner, \
            HerdServer(settings, Gateway(settings, worker=Worker(str(tmp_path), 1, 2))) as sibling:
        assert sibling.gateway.node is not None
        node = sibling.gateway.node
        node.table.pid = node.answers.pid = os.getppid()  # as if in a process of its own
        first = httpx.post(owner.url + "/v1/chat/completions", json=body, timeout=30)
        assert first.status_code == 200 and chat_calls(sim.url) == 1
        late = httpx.post(sibling.url + "/v1/chat/completions", json=body, timeout=30)
        assert late.status_code == 200
        assert chat_calls(sim.url) == 2  # its own draw
        # an answer that may be cached is handed over: the same request, not sampled
        plain = {**body, "temperature": 0}
        httpx.post(owner.url + "/v1/chat/completions", json=plain, timeout=30)
        calls = chat_calls(sim.url)
        handed = httpx.post(sibling.url + "/v1/chat/completions", json=plain, timeout=30)
        assert handed.status_code == 200 and handed.headers["x-herd"] == "cache"
        assert chat_calls(sim.url) == calls


def test_worker_sockets_share_one_port_even_when_the_kernel_picks_it():
    from proxy.config import ServerConfig
    from proxy.workers import worker_sockets

    sockets = worker_sockets(ServerConfig(host="127.0.0.1", port=0), 3)
    try:
        assert len({s.getsockname()[1] for s in sockets}) == 1
    finally:
        for s in sockets:
            s.close()


@pytest.mark.parametrize("first_workers", [1, 2])
def test_a_second_node_on_a_port_in_use_is_refused_not_silently_sharing_it(tmp_path, sim, first_workers):
    """SO_REUSEPORT lets two nodes bind one port and split its traffic without a word:
    a node (or a single process) started on a port something already serves exits 2."""
    import subprocess
    import sys

    if first_workers == 1:
        herd = Herd(_config(sim.url, 1), tmp_path, log_path=tmp_path / "herd.log").start(timeout=120)
    else:
        herd = _start(tmp_path, sim.url, workers=first_workers)
    try:
        config = tmp_path / "second.toml"
        config.write_text(_config(sim.url, 2))
        for workers in ("2", "1"):
            done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(config),
                                   "--port", str(herd.port), "--workers", workers],
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 2, done.stderr
            assert f"cannot listen on 127.0.0.1:{herd.port}" in done.stderr
            assert "Traceback" not in done.stderr
    finally:
        herd.stop()
