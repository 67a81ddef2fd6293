"""Replicas sharing flights and answers over one real redis-server.

herd replicas run as real processes (`python -m proxy serve`) against one upstream
simulator; the tests start redis-server themselves on free loopback ports.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import openai
import orjson
import pytest

from benchmarks.simulator import expected_text
from proxy.answer import Answer as StoredAnswer
from proxy.apis.chat import assign_keys, parse_chat
from proxy.chunks import Chunk, split
from proxy.coalescer import Flight
from proxy.config import ConfigError, parse_settings
from proxy.gateway import Gateway
from proxy.sharing import LeaderLost, Splice
from tests.harness import (
    HerdServer,
    ManualClock,
    chat_calls,
    herd_settings,
    sim_faults,
    sim_reset,
    sim_stats,
)
from tests.redis_servers import RedisServer, herd_keys, start_replicas

HASH_KEY = "replicas-share-this-hash-key"
KEYS = ("sk-replica-tenant-a", "sk-replica-tenant-b")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def replica_sections(sim_url: str, redis_url: str, *, cluster: bool = False, cache: bool = False, **redis) -> dict:
    return {
        "server": {"host": "127.0.0.1", "request_timeout_s": 30.0, "log_level": "warning"},
        "auth": {"hash_key": HASH_KEY},
        "upstreams": {"sim": {"kind": "openai", "base_url": sim_url + "/v1"}},
        "routes": [{"model": "*", "upstream": "sim"}],
        "cache": {"enabled": cache},  # the coalescing tests must not be answered from the cache
        "redis": {"url": redis_url, "cluster": cluster, "timeout_s": 0.5, "lease_s": 3.0, "retry_after_s": 0.5,
                  **redis},
    }


@dataclass
class Answer:
    status: int = 0
    role: str = ""
    flight: str = ""
    text: str = ""
    chunks: int = 0
    done: bool = False  # a stream ended with [DONE]
    error: str | None = None
    progress: list = field(default_factory=list)


async def ask(http: aiohttp.ClientSession, url: str, text: str, *, stream: bool, key: str = KEYS[0],
              answer: Answer | None = None, stop_after: int | None = None) -> Answer:
    """One chat request over raw HTTP; a stream is read chunk by chunk (and may be left early)."""
    out = answer or Answer()
    body = {"model": "m", "messages": user(text), "stream": stream}
    try:
        async with http.post(url + "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {key}"}) as resp:
            out.status = resp.status
            out.role = resp.headers.get("x-herd", "")
            out.flight = resp.headers.get("x-herd-flight", "")
            if not stream or resp.status != 200:
                data = await resp.json(content_type=None)
                if resp.status == 200:
                    out.text = data["choices"][0]["message"]["content"]
                else:
                    out.error = orjson.dumps(data).decode()
                return out
            async for line in resp.content:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    out.done = True
                    break
                chunk = orjson.loads(payload)
                if "error" in chunk:
                    out.error = orjson.dumps(chunk).decode()
                    break
                for choice in chunk.get("choices") or ():
                    out.text += choice.get("delta", {}).get("content") or ""
                out.chunks += 1
                if stop_after is not None and out.chunks >= stop_after:
                    return out
    except (aiohttp.ClientError, TimeoutError) as e:
        out.error = f"{type(e).__name__}: {e}"
    return out


def session(timeout: float = 60) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=timeout))


def is_stream(i: int, replicas) -> bool:
    return (i // len(replicas)) % 2 == 0  # every replica gets streams and non-streams


async def burst(replicas, text: str, n: int = 300) -> list[Answer]:
    """`n` identical requests at once, spread round-robin over the replicas, half of them streams."""
    async with session() as http:
        return await asyncio.gather(
            *[ask(http, replicas[i % len(replicas)].url, text, stream=is_stream(i, replicas)) for i in range(n)]
        )


def check_burst(answers: list[Answer], replicas, text: str, **sim_settings) -> None:
    expected = expected_text({"messages": user(text)}, sim_settings)
    failed = [a for a in answers if a.status != 200 or a.error or a.text != expected]
    assert not failed, failed[:3]
    streams = [(i % len(replicas), a) for i, a in enumerate(answers) if is_stream(i, replicas)]
    assert all(a.done for _, a in streams)  # every stream client got the complete stream
    assert {i for i, _ in streams} == set(range(len(replicas)))  # ... on every replica
    roles = [a.role for a in answers]
    assert roles.count("leader") == 1 and roles.count("follower") == len(answers) - 1


def no_redis_errors(replicas) -> bool:
    errors = [line for r in replicas for line in r.metrics().splitlines()
              if line.startswith("herd_redis_errors_total{")]
    assert not errors, errors
    return True


def check_keys(server, secrets: tuple[str, ...] = KEYS) -> dict:
    """Every herd key has a TTL; no key or value holds a client key."""
    keys = herd_keys(server)
    for name, info in keys.items():
        if info["pttl"] == -2:
            continue  # it expired while we looked
        assert info["pttl"] > 0, (name, info["pttl"])
        for secret in secrets:
            assert secret not in name and secret.encode() not in info["content"], name
        assert re.fullmatch(r"herd:\{[0-9a-f]{32}\}:(lease|w|answer|s:[0-9a-f]{16})", name), name
    return keys


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture()
def workdir():
    with tempfile.TemporaryDirectory(prefix="herd-replicas-") as d:
        yield Path(d)


@pytest.fixture()
def replicas(sim, redis_server, workdir):
    started = start_replicas(3, replica_sections(sim.url, redis_server.url), workdir)
    yield started
    for r in started:
        r.stop()


# -- coalescing across replicas ----------------------------------------------------------


async def test_300_requests_across_three_replicas_make_one_upstream_call(replicas, redis_server, sim):
    sim_reset(sim.url, ttft_ms=2500, tokens_per_s=40, reply_tokens=20)
    answers = await burst(replicas, "one question, three replicas")
    check_burst(answers, replicas, "one question, three replicas", reply_tokens=20)
    assert chat_calls(sim.url) == 1
    assert all(r.ready() == {"status": "ready", "flights": 0, "mode": "exact", "redis": "up"} for r in replicas)
    check_keys(redis_server)


async def test_a_cold_burst_with_the_cache_on_makes_one_call_and_keeps_sharing_on(sim, redis_server, workdir):
    """Every request of a cold burst used to read the Redis cache before it joined a flight:
    a connection per request, a timeout, and each replica serving local-only (3 calls)."""
    replicas = start_replicas(3, replica_sections(sim.url, redis_server.url, cache=True, timeout_s=0.25), workdir)
    try:
        sim_reset(sim.url, ttft_ms=1500, tokens_per_s=40, reply_tokens=20)
        answers = await burst(replicas, "a cold burst, cache on")
        check_burst(answers, replicas, "a cold burst, cache on", reply_tokens=20)
        assert chat_calls(sim.url) == 1
        assert len({a.flight for a in answers}) == 1  # one flight, one id on every replica
        assert all(r.ready()["redis"] == "up" for r in replicas)
        assert no_redis_errors(replicas)
    finally:
        for r in replicas:
            r.stop()
    check_keys(redis_server)


async def test_many_distinct_flights_on_every_replica_keep_sharing_on(sim, redis_server, workdir):
    """Hundreds of distinct requests at once, each sent to both replicas: every flight is led
    on one and followed on the other (a claim, a cache read, a stream read each), and Redis
    stays in use: one call per prompt. redis-py's pool used to run out at about 100."""
    replicas = start_replicas(2, replica_sections(sim.url, redis_server.url, cache=True, timeout_s=0.25), workdir)
    try:
        sim_reset(sim.url, ttft_ms=1000, tokens_per_s=50, reply_tokens=5)
        prompts = [f"distinct prompt {i}" for i in range(300)]
        async with session() as http:
            answers = await asyncio.gather(*[ask(http, r.url, p, stream=i % 2 == 0)
                                             for i, p in enumerate(prompts) for r in replicas])
        bad = [a for a in answers if a.status != 200 or a.error]
        assert not bad, bad[:3]
        assert chat_calls(sim.url) == len(prompts)
        assert all(r.ready()["redis"] == "up" for r in replicas)
        assert no_redis_errors(replicas)
    finally:
        for r in replicas:
            r.stop()
    check_keys(redis_server)


async def leader_killed_mid_stream(replicas, sim, text: str) -> None:
    """The leader's process dies mid-stream: the followers on the other replicas finish by takeover."""
    sim_reset(sim.url, ttft_ms=100, tokens_per_s=12, reply_tokens=36)  # a 3 s stream
    leader, others = replicas[0], replicas[1:]
    expected = expected_text({"messages": user(text)}, {"reply_tokens": 36})
    async with session(timeout=40) as http:
        first = asyncio.create_task(ask(http, leader.url, text, stream=True))
        await asyncio.sleep(0.3)
        watched = [Answer() for _ in others]
        followers = [asyncio.create_task(ask(http, r.url, text, stream=True, answer=w))
                     for r, w in zip(others, watched)]
        followers += [asyncio.create_task(ask(http, r.url, text, stream=s)) for r in others for s in (True, False) * 3]
        for _ in range(200):  # until the followers have streamed part of the answer
            if all(w.chunks >= 6 for w in watched):
                break
            await asyncio.sleep(0.02)
        assert all(0 < w.chunks < 30 for w in watched), [w.chunks for w in watched]
        leader.kill()
        _, pending = await asyncio.wait(followers, timeout=30)
        assert not pending, "a follower hung after its leader died"
        answers = [t.result() for t in followers]
        await first
    assert [(a.status, a.error, a.text) for a in answers] == [(200, None, expected)] * len(answers)
    assert all(a.done for a in watched)
    # the dead leader's call, then exactly one takeover call (the other replica follows it)
    assert chat_calls(sim.url) == 2


async def test_leader_killed_mid_stream_followers_take_over(sim, redis_server, workdir):
    replicas = start_replicas(3, replica_sections(sim.url, redis_server.url, lease_s=2.0), workdir)
    try:
        await leader_killed_mid_stream(replicas, sim, "who leads when the leader dies")
        assert all(r.ready()["redis"] == "up" for r in replicas[1:])
    finally:
        for r in replicas:
            r.kill()
    check_keys(redis_server)


async def test_leader_clients_leaving_does_not_cancel_remote_followers(replicas, sim):
    sim_reset(sim.url, ttft_ms=100, tokens_per_s=15, reply_tokens=30)
    text = "the leader's client leaves early"
    expected = expected_text({"messages": user(text)}, {"reply_tokens": 30})
    async with session() as http:
        leaving = asyncio.create_task(ask(http, replicas[0].url, text, stream=True, stop_after=10))
        await asyncio.sleep(0.15)
        followers = [ask(http, r.url, text, stream=s) for r in replicas[1:] for s in (True, False)]
        answers = await asyncio.gather(*followers)
        assert (await leaving).chunks == 10
    assert [(a.status, a.error, a.text) for a in answers] == [(200, None, expected)] * 4
    stats = sim_stats(sim.url)
    assert stats["calls"] == 1 and stats["disconnects"] == 0


async def test_everyone_leaving_on_every_replica_cancels_the_upstream_call(replicas, sim):
    sim_reset(sim.url, ttft_ms=50, tokens_per_s=10, reply_tokens=100)
    text = "everyone everywhere leaves"
    async with session() as http:
        leaving = [ask(http, replicas[0].url, text, stream=True, stop_after=8)]
        await asyncio.sleep(0.15)
        leaving += [ask(http, r.url, text, stream=True, stop_after=12) for r in replicas[1:]]
        await asyncio.gather(*leaving)
    for _ in range(150):
        stats = sim_stats(sim.url)
        if stats["active"] == 0:
            break
        await asyncio.sleep(0.05)
    assert stats["calls"] == 1 and stats["active"] == 0 and stats["disconnects"] == 1


async def test_upstream_error_reaches_followers_on_every_replica_without_the_key(replicas, redis_server, sim):
    secret = KEYS[1]
    body = {"error": {"message": f"Incorrect API key provided: {secret}", "type": "invalid_request_error",
                      "param": None, "code": "invalid_api_key"}}
    sim_reset(sim.url, ttft_ms=300)
    sim_faults(sim.url, {"kind": "status", "status": 401, "body": body, "delay_ms": 600, "match": "bad key"})
    async with session() as http:
        first = asyncio.create_task(ask(http, replicas[0].url, "bad key", stream=False, key=secret))
        await asyncio.sleep(0.2)
        rest = await asyncio.gather(*[ask(http, r.url, "bad key", stream=s, key=secret)
                                      for r in replicas[1:] for s in (True, False)])
        answers = [await first, *rest]
    assert chat_calls(sim.url) == 1
    assert [a.status for a in answers] == [401] * 5
    assert all("invalid_api_key" in a.error for a in answers)
    assert all(secret not in a.error for a in rest)  # what crossed Redis was redacted
    check_keys(redis_server)


# -- takeovers -----------------------------------------------------------------------------


class DeadLeader:
    """The Redis side of a leader replica that published part of a flight and then died (or
    lost Redis) before the stream's end: its lease, and its stream with `chunks` in it."""

    def __init__(self, server: RedisServer, herd: HerdServer, text: str, key: str = KEYS[0]) -> None:
        gateway = herd.gateway
        req = parse_chat(orjson.dumps({"model": "m", "messages": user(text)}))
        assign_keys(req, gateway.auth.identify({"authorization": f"Bearer {key}"}).tenant, "sim")
        self.redis = server.client()
        self.flight_id = "0123456789abcdef"
        self.lease = f"herd:{{{req.key}}}:lease"
        self.stream = f"herd:{{{req.key}}}:s:{self.flight_id}"

    def publish(self, chunks: list[Chunk], *, whole: bool) -> None:
        self.redis.set(self.lease, f"deadbeef0000:{self.flight_id}", px=20000)
        for i, chunk in enumerate(chunks):
            fields = {"c": chunk.raw}
            if i == 0:
                fields["u"] = "sim"
                if whole:
                    fields["w"] = "1"  # what a leader whose upstream call was non-stream writes
            self.redis.xadd(self.stream, fields)
        self.redis.pexpire(self.stream, 20000)

    def die(self) -> None:
        self.redis.delete(self.lease)


def nonstream_answer(sim, text: str) -> dict:
    """The simulator's non-stream answer to `text` (then its counters are reset)."""
    answer = httpx.post(sim.url + "/v1/chat/completions", json={"model": "m", "messages": user(text)},
                        timeout=10).json()
    sim_reset(sim.url)
    return answer


@pytest.fixture()
def follower_herd(sim, redis_server):
    settings = herd_settings(sim.url, auth={"hash_key": HASH_KEY},
                             redis={"url": redis_server.url, "timeout_s": 0.5, "lease_s": 1.5})
    with HerdServer(settings) as herd:
        yield herd


async def test_a_takeover_after_a_non_stream_leader_gives_the_same_answer_to_every_follower(
        sim, redis_server, follower_herd):
    """The leader's answer came in one piece (a non-stream call) and its replica died before the
    stream's end: the takeover calls the upstream the same way, so a deterministic upstream's
    answer matches what the followers already have (it used to stream, and fail them all with
    502 leader_lost)."""
    text = "a non-stream leader dies"
    leader = DeadLeader(redis_server, follower_herd, text)
    leader.publish(split(nonstream_answer(sim, text)), whole=True)
    async with session() as http:
        followers = [asyncio.create_task(ask(http, follower_herd.url, text, stream=s)) for s in (True, False) * 3]
        await asyncio.sleep(0.5)
        leader.die()
        answers = await asyncio.wait_for(asyncio.gather(*followers), 20)
    expected = expected_text({"messages": user(text)})
    assert [(a.status, a.error, a.text) for a in answers] == [(200, None, expected)] * 6
    assert all(a.role == "follower" for a in answers)
    assert {a.flight for a in answers} == {leader.flight_id}  # the id every replica reports
    assert chat_calls(sim.url) == 1  # the takeover's


async def test_a_different_answer_after_a_takeover_fails_only_the_streams_that_got_part_of_the_first(
        sim, redis_server, follower_herd):
    text = "the new leader answers differently"
    leader = DeadLeader(redis_server, follower_herd, text)
    first = [Chunk({"id": "chatcmpl-dead", "object": "chat.completion.chunk", "created": 1, "model": "m",
                    "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
             for word in ("something ", "else ")]
    leader.publish(first, whole=False)
    async with session() as http:
        watched = Answer()
        streams = [asyncio.create_task(ask(http, follower_herd.url, text, stream=True, answer=watched))]
        await wait_for(lambda: watched.chunks >= 2)  # this stream was sent "something else"
        waiting = [asyncio.create_task(ask(http, follower_herd.url, text, stream=False)) for _ in range(3)]
        await asyncio.sleep(0.3)
        leader.die()
        answers = await asyncio.wait_for(asyncio.gather(*streams, *waiting), 20)
    streamed, *plain = answers
    assert streamed.status == 200 and "leader_lost" in streamed.error and not streamed.done
    assert [(a.status, a.error, a.text) for a in plain] == [(200, None, expected_text({"messages": user(text)}))] * 3


async def test_a_different_answer_after_a_takeover_reaches_the_replicas_that_follow_the_new_leader(
        sim, redis_server, follower_herd):
    """Two replicas follow a leader that dies; one takes over and its answer differs. The one
    that follows the new leader sees its stream start over (the prefix, then a restart): on
    both, streams that got part of the first answer end with leader_lost, the rest get the new one."""
    settings = herd_settings(sim.url, auth={"hash_key": HASH_KEY},
                             redis={"url": redis_server.url, "timeout_s": 0.5, "lease_s": 1.5})
    with HerdServer(settings) as other:
        sim_reset(sim.url, ttft_ms=300, tokens_per_s=20, reply_tokens=8)
        text = "two replicas, a new leader, a different answer"
        leader = DeadLeader(redis_server, follower_herd, text)
        leader.publish([Chunk({"id": "chatcmpl-dead", "object": "chat.completion.chunk", "created": 1, "model": "m",
                               "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]})
                        for w in ("something ", "else ")], whole=False)
        herds = (follower_herd, other)
        async with session() as http:
            watched = [Answer() for _ in herds]
            streams = [asyncio.create_task(ask(http, h.url, text, stream=True, answer=w))
                       for h, w in zip(herds, watched)]
            await wait_for(lambda: all(w.chunks >= 2 for w in watched))
            plain = [asyncio.create_task(ask(http, h.url, text, stream=False)) for h in herds for _ in range(2)]
            await asyncio.sleep(0.3)
            leader.die()
            answers = await asyncio.wait_for(asyncio.gather(*streams, *plain), 20)
    expected = expected_text({"messages": user(text)}, {"reply_tokens": 8})
    assert [(a.status, "leader_lost" in (a.error or ""), a.done) for a in answers[:2]] == [(200, True, False)] * 2
    assert [(a.status, a.error, a.text) for a in answers[2:]] == [(200, None, expected)] * 4
    assert chat_calls(sim.url) == 1  # the new leader's call, followed by the other replica


async def test_a_non_stream_leader_whose_clients_leave_keeps_calling_for_other_replicas(replicas, sim):
    sim_reset(sim.url, ttft_ms=1500, tokens_per_s=50, reply_tokens=10)
    text = "the non-stream leader's client leaves"
    async with session() as http, session(timeout=0.6) as impatient:
        leaving = asyncio.create_task(ask(impatient, replicas[0].url, text, stream=False))
        await asyncio.sleep(0.2)
        followers = [ask(http, r.url, text, stream=s) for r in replicas[1:] for s in (True, False)]
        answers = await asyncio.gather(*followers)
        assert (await leaving).error is not None  # it gave up before the answer
    expected = expected_text({"messages": user(text)}, {"reply_tokens": 10})
    assert [(a.status, a.error, a.text) for a in answers] == [(200, None, expected)] * 4
    stats = sim_stats(sim.url)
    assert stats["calls"] == 1 and stats["disconnects"] == 0


async def test_a_claim_whose_reply_came_too_late_still_leads_the_flight_for_other_replicas(sim, workdir):
    """Redis stalls while a replica claims a flight: the claim times out here, but Redis takes
    the lease once it wakes. The replica leads and publishes anyway, so another replica that
    finds its lease follows its stream (it used to wait for that lease to expire, then call
    the upstream a second time)."""
    with RedisServer() as server:
        def settings():
            return herd_settings(sim.url, auth={"hash_key": HASH_KEY},
                                 redis={"url": server.url, "timeout_s": 0.25, "lease_s": 1.5, "retry_after_s": 0.5})
        with HerdServer(settings()) as a, HerdServer(settings()) as b:
            sim_reset(sim.url, ttft_ms=1500, tokens_per_s=50, reply_tokens=5)
            text = "a claim answered late"
            async with session() as http:
                server.freeze()
                asyncio.get_running_loop().call_later(0.4, server.thaw)
                first = asyncio.create_task(ask(http, a.url, text, stream=False))
                await asyncio.sleep(0.7)
                assert a.gateway.redis.up  # one slow moment
                second = await ask(http, b.url, text, stream=True)
                answers = [await first, second]
            expected = expected_text({"messages": user(text)}, {"reply_tokens": 5})
            assert [(x.status, x.error, x.text) for x in answers] == [(200, None, expected)] * 2
            assert second.role == "follower" and chat_calls(sim.url) == 1


# -- Redis trouble -----------------------------------------------------------------------


async def steady_load(replicas, stop: asyncio.Event, answers: list[Answer]) -> None:
    """Requests over and over (20 prompts, streams and not, every replica) until `stop`."""
    async with session() as http:
        counter = iter(range(10**9))

        async def worker() -> None:
            while not stop.is_set():
                i = next(counter)
                answers.append(await ask(http, replicas[i % len(replicas)].url, f"steady {i % 20}",
                                         stream=i % 3 == 0))

        await asyncio.gather(*[worker() for _ in range(12)])


def up_gauge(replica) -> float:
    m = re.search(r'^herd_redis_up\{backend="standalone"\} (\S+)$', replica.metrics(), re.MULTILINE)
    return float(m.group(1))


async def wait_for(predicate, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_redis_stopped_under_load_degrades_then_sharing_resumes(sim, workdir):
    with RedisServer() as server:
        replicas = start_replicas(2, replica_sections(sim.url, server.url), workdir)
        try:
            sim_reset(sim.url, ttft_ms=30, tokens_per_s=200, reply_tokens=10)
            stop, answers = asyncio.Event(), []
            load = asyncio.create_task(steady_load(replicas, stop, answers))
            await asyncio.sleep(1.0)
            server.stop()
            await wait_for(lambda: all(r.ready()["status"] == "degraded" for r in replicas))
            assert all(r.ready() | {"flights": 0} == {"status": "degraded", "redis": "down", "flights": 0,
                                                       "mode": "exact"} for r in replicas)
            assert all(up_gauge(r) == 0 for r in replicas)
            assert all(re.search(r"^herd_redis_errors_total\{kind=\"\w+\"\} [1-9]", r.metrics(), re.MULTILINE)
                       for r in replicas)
            await asyncio.sleep(1.0)  # serving local-only
            server.start()
            await wait_for(lambda: all(r.ready()["status"] == "ready" for r in replicas))
            assert all(r.ready()["redis"] == "up" and up_gauge(r) == 1 for r in replicas)
            await asyncio.sleep(0.5)
            stop.set()
            await load
            assert len(answers) > 50
            bad = [a for a in answers if a.status != 200 or a.error or not a.text.startswith("echo: steady")]
            assert not bad, bad[:3]
            # sharing resumed: a burst across both replicas makes one call again
            sim_reset(sim.url, ttft_ms=1500, tokens_per_s=50, reply_tokens=10)
            answers = await burst(replicas, "after the outage", n=40)
            check_burst(answers, replicas, "after the outage", reply_tokens=10)
            assert chat_calls(sim.url) == 1
        finally:
            for r in replicas:
                r.stop()
        check_keys(server)


async def test_frozen_redis_mid_flight_times_out_and_every_waiter_is_served(sim, workdir):
    with RedisServer() as server:
        replicas = start_replicas(2, replica_sections(sim.url, server.url), workdir)
        try:
            sim_reset(sim.url, ttft_ms=100, tokens_per_s=15, reply_tokens=30)
            text = "redis freezes mid-flight"
            expected = expected_text({"messages": user(text)}, {"reply_tokens": 30})
            async with session() as http:
                first = asyncio.create_task(ask(http, replicas[0].url, text, stream=True))
                await asyncio.sleep(0.3)
                watched = Answer()
                followers = [asyncio.create_task(ask(http, replicas[1].url, text, stream=True, answer=watched))]
                followers += [asyncio.create_task(ask(http, replicas[1].url, text, stream=False))]
                await wait_for(lambda: watched.chunks >= 4)
                server.freeze()  # a Redis that answers nothing: every call runs into timeout_s
                try:
                    late = await ask(http, replicas[1].url, "asked while redis is frozen", stream=False)
                    await wait_for(lambda: all(r.ready()["status"] == "degraded" for r in replicas))
                    answers = await asyncio.wait_for(asyncio.gather(first, *followers), 20)
                finally:
                    server.thaw()
            assert [(a.status, a.error, a.text) for a in answers] == [(200, None, expected)] * 3
            asked = {"messages": user("asked while redis is frozen")}
            assert late.status == 200 and late.text == expected_text(asked, {"reply_tokens": 30})
            await wait_for(lambda: all(r.ready()["status"] == "ready" for r in replicas))
        finally:
            for r in replicas:
                r.stop()


@pytest.mark.parametrize("trouble", ["freeze", "kill"])
async def test_redis_trouble_under_a_non_stream_leader_fails_no_request(sim, workdir, trouble):
    """Redis freezes (SIGSTOP) or dies while a non-stream leader's call is pending and while
    its answer streams to the other replica: with a deterministic upstream every waiter, on
    either replica, stream or not, gets the answer."""
    with RedisServer() as server:
        replicas = start_replicas(2, replica_sections(sim.url, server.url), workdir)
        try:
            for when, text in ((0.6, "redis trouble before the answer"), (1.7, "redis trouble as it streams")):
                sim_reset(sim.url, ttft_ms=1200, tokens_per_s=10, reply_tokens=12)
                if not server.proc:
                    server.start()
                await wait_for(lambda: all(r.ready()["redis"] == "up" for r in replicas))
                async with session() as http:
                    first = asyncio.create_task(ask(http, replicas[0].url, text, stream=False))
                    await asyncio.sleep(0.3)
                    followers = [asyncio.create_task(ask(http, r.url, text, stream=s))
                                 for r in replicas for s in (True, False)]
                    await asyncio.sleep(when - 0.3)
                    if trouble == "freeze":
                        server.freeze()
                    else:
                        server.stop()
                    try:
                        answers = await asyncio.wait_for(asyncio.gather(first, *followers), 30)
                    finally:
                        if trouble == "freeze":
                            server.thaw()
                expected = expected_text({"messages": user(text)}, {"reply_tokens": 12})
                assert [(a.status, a.error, a.text) for a in answers] == [(200, None, expected)] * 5, text
        finally:
            for r in replicas:
                r.stop()


async def test_redis_down_at_start_serves_local_only_and_joins_when_it_comes_up(sim, workdir):
    server = RedisServer()  # not started yet
    replicas = start_replicas(2, replica_sections(sim.url, server.url), workdir)
    try:
        assert all(r.ready()["status"] == "degraded" for r in replicas)
        sim_reset(sim.url, ttft_ms=800)
        answers = await burst(replicas, "no redis yet", n=10)
        assert all(a.status == 200 and a.error is None for a in answers)
        assert chat_calls(sim.url) == 2  # one flight per replica: local-only
        server.start()
        await wait_for(lambda: all(r.ready()["status"] == "ready" for r in replicas))
        sim_reset(sim.url, ttft_ms=1000)
        answers = await burst(replicas, "redis is here now", n=10)
        check_burst(answers, replicas, "redis is here now")
        assert chat_calls(sim.url) == 1
    finally:
        for r in replicas:
            r.stop()
        server.close()


# -- the result cache in Redis -----------------------------------------------------------


@pytest.fixture(scope="module")
def cache_clock():
    return ManualClock()


@pytest.fixture(scope="module")
def cache_pair(sim, redis_server, cache_clock):
    """Two in-process herds sharing the Redis cache (an answer stored by one is a hit on the other);
    their memory caches count TTLs with `cache_clock`."""
    def settings():
        return herd_settings(sim.url, auth={"hash_key": HASH_KEY}, cache={"enabled": True, "ttl_seconds": 60.0},
                             redis={"url": redis_server.url, "timeout_s": 0.5})
    sa, sb = settings(), settings()
    with HerdServer(sa, Gateway(sa, clock=cache_clock)) as a, HerdServer(sb, Gateway(sb, clock=cache_clock)) as b:
        yield a, b


def sdk(herd, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=herd.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_redis_cache_hits_within_ttl_on_another_replica_and_misses_after(cache_pair, sim, redis_server, cache_clock):
    a, b = cache_pair
    stored_before = set(herd_keys(redis_server))
    first = sdk(a).chat.completions.with_raw_response.create(model="m", messages=user("cache across"))
    second = sdk(b).chat.completions.with_raw_response.create(model="m", messages=user("cache across"))
    assert first.headers["x-herd"] == "leader" and second.headers["x-herd"] == "cache"
    assert second.parse().choices[0].message.content == expected_text({"messages": user("cache across")})
    assert chat_calls(sim.url) == 1
    keys = check_keys(redis_server)
    answers = [k for k in keys if k.endswith(":answer") and k not in stored_before]
    assert len(answers) == 1 and 0 < keys[answers[0]]["pttl"] <= 60_000
    # the TTL passes: on the replicas' clock, and in Redis (an expired key is a missing key)
    cache_clock.advance(60.1)
    redis_server.client().delete(answers[0])
    assert sdk(b).chat.completions.with_raw_response.create(
        model="m", messages=user("cache across")).headers["x-herd"] == "leader"
    assert chat_calls(sim.url) == 2


def test_redis_cache_is_per_tenant(cache_pair, sim):
    a, b = cache_pair
    sdk(a, KEYS[0]).chat.completions.create(model="m", messages=user("tenant cache"))
    other = sdk(b, KEYS[1]).chat.completions.with_raw_response.create(model="m", messages=user("tenant cache"))
    assert other.headers["x-herd"] == "leader"
    same = sdk(b, KEYS[0]).chat.completions.with_raw_response.create(model="m", messages=user("tenant cache"))
    assert same.headers["x-herd"] == "cache"
    assert chat_calls(sim.url) == 2


def test_redis_cache_keeps_no_errors(cache_pair, sim, redis_server):
    a, b = cache_pair
    sim_faults(sim.url, {"kind": "status", "status": 400, "match": "failing"})  # the first call fails
    before = set(herd_keys(redis_server))
    with pytest.raises(openai.BadRequestError):
        sdk(a).chat.completions.create(model="m", messages=user("failing"))
    time.sleep(0.1)
    assert not [k for k in set(herd_keys(redis_server)) - before if k.endswith(":answer")]
    retry = sdk(b).chat.completions.with_raw_response.create(model="m", messages=user("failing"))
    assert retry.headers["x-herd"] == "leader"  # not an error from the cache
    assert chat_calls(sim.url) == 2


def test_redis_cached_answer_replays_as_a_stream(cache_pair, sim):
    a, b = cache_pair
    sim_reset(sim.url, reply_tokens=12)
    list(sdk(a).chat.completions.create(model="m", messages=user("replay from redis"), stream=True))
    raw = sdk(b).chat.completions.with_raw_response.create(
        model="m", messages=user("replay from redis"), stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["x-herd"] == "cache"
    chunks = list(raw.parse())
    text_chunks = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(text_chunks) == 12
    assert "".join(ch.choices[0].delta.content for ch in text_chunks) == expected_text(
        {"messages": user("replay from redis")}, {"reply_tokens": 12})
    assert chunks[-1].usage is not None
    assert chat_calls(sim.url) == 1


def test_redis_keeps_the_answer_as_its_bytes_and_reads_any_other_value_as_a_miss(cache_pair, sim, redis_server):
    a, b = cache_pair
    before = set(herd_keys(redis_server))
    sdk(a).chat.completions.create(model="m", messages=user("stored as bytes"))
    [name] = [k for k in set(herd_keys(redis_server)) - before if k.endswith(":answer")]
    answer = StoredAnswer.decode(redis_server.client().get(name))
    assert answer is not None and b"data: " in answer.sse
    assert orjson.loads(answer.body)["choices"][0]["message"]["content"] == expected_text(
        {"messages": user("stored as bytes")})
    # an older herd's value (the chunks as a JSON list), or anything else: a miss, never an error
    redis_server.client().set(name, orjson.dumps([{"choices": []}]), px=60_000)
    again = sdk(b).chat.completions.with_raw_response.create(model="m", messages=user("stored as bytes"))
    assert again.headers["x-herd"] == "leader" and chat_calls(sim.url) == 2


# -- pieces --------------------------------------------------------------------------------


def _chunk(content: str, id: str = "chatcmpl-a") -> Chunk:
    return Chunk({"id": id, "created": 1, "object": "chat.completion.chunk", "model": "m",
                  "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})


async def test_takeover_splices_only_an_identical_prefix():
    flight = Flight(["k"])
    first = Splice(flight)
    for word in ("a ", "b "):
        first.publish(_chunk(word))
    same = Splice(flight)  # a new source replays from its first chunk
    for word in ("a ", "b ", "c "):
        same.publish(_chunk(word, id="chatcmpl-other"))
    same.complete()
    assert [c.data["choices"][0]["delta"]["content"] for c in flight.chunks] == ["a ", "b ", "c "]
    assert {c.data["id"] for c in flight.chunks} == {"chatcmpl-a"}  # one stream to the client


def _words(flight) -> list[str]:
    return [c.data["choices"][0]["delta"]["content"] for c in flight.chunks]


async def test_a_different_answer_after_a_takeover_reaches_waiters_that_were_sent_none_of_the_first():
    flight = Flight(["k"])
    Splice(flight).extend([_chunk("a "), _chunk("b ")])
    streaming = aiter(flight.follow())
    assert len(await anext(streaming)) == 2  # a stream waiter was sent "a b"
    fresh = aiter(flight.follow())  # a waiter that was sent nothing (a non-stream one, say)
    different = Splice(flight)
    different.extend([_chunk("a ", id="chatcmpl-new"), _chunk("x ", id="chatcmpl-new")])
    different.complete()
    assert _words(flight) == ["a ", "x "] and {c.data["id"] for c in flight.chunks} == {"chatcmpl-new"}
    with pytest.raises(LeaderLost) as e:
        await anext(streaming)
    assert e.value.status == 502 and "differs" in e.value.message
    assert [c.data["choices"][0]["delta"]["content"] for c in await anext(fresh)] == ["a ", "x "]
    shorter = Splice(flight)
    shorter.publish(_chunk("a "))
    shorter.complete()  # shorter than what was published: the flight starts over with it
    assert _words(flight) == ["a "]


def test_redis_settings_are_checked():
    base = {"upstreams": {"sim": {"base_url": "http://x/v1"}}, "auth": {"hash_key": "k"}}
    assert parse_settings(base, env={}).cache.backend == "auto"
    assert parse_settings({**base, "redis": {"url": "redis://x"}}, env={}).redis.lease_s == 3.0
    for bad in (
        {"cache": {"backend": "redis"}},
        {"cache": {"backend": "disk"}},
        {"redis": {"url": "http://x"}},
        {"redis": {"url": "redis://x"}, "auth": {}},  # replicas need one hash key
        {"redis": {"url": "redis://x", "lease_s": 0.5}},
        {"redis": {"url": "redis://x", "key_prefix": "{x}"}},
    ):
        with pytest.raises(ConfigError):
            parse_settings({**base, **bad}, env={})
