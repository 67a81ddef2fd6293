"""The result cache (memory backend) through herd, with the official openai SDK."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.simulator import expected_text
from proxy.answer import Answer
from proxy.cache import MemoryCache
from proxy.gateway import Gateway
from tests.harness import HerdServer, ManualClock, chat_calls, herd_settings, sim_faults, sim_reset


def answer(text: bytes, size: int = 0) -> Answer:
    return Answer(b"data: " + text.ljust(size) + b"\n\n", b"", b'{"x": "' + text + b'"}')


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def clock():
    return ManualClock()


@pytest.fixture(scope="module")
def cached_herd(sim, clock):
    settings = herd_settings(sim.url, cache={"enabled": True, "ttl_seconds": 60.0})
    with HerdServer(settings, Gateway(settings, clock=clock)) as h:
        yield h


def ask(herd, text: str, key: str = "sk-a", **kw):
    c = openai.OpenAI(base_url=herd.url + "/v1", api_key=key, max_retries=0)
    return c.chat.completions.with_raw_response.create(model="m", messages=user(text), **kw)


def test_hit_within_ttl_and_miss_after(cached_herd, sim, clock):
    first = ask(cached_herd, "cache me")
    second = ask(cached_herd, "cache me")
    assert first.headers["x-herd"] == "leader" and second.headers["x-herd"] == "cache"
    assert second.parse().choices[0].message.content == expected_text({"messages": user("cache me")})
    assert chat_calls(sim.url) == 1
    clock.advance(60.1)  # past the TTL of an answer stored before `second` was served from it
    assert ask(cached_herd, "cache me").headers["x-herd"] == "leader"
    assert chat_calls(sim.url) == 2


def test_cache_is_per_tenant(cached_herd, sim):
    ask(cached_herd, "tenant cache", key="sk-a")
    other = ask(cached_herd, "tenant cache", key="sk-b")
    assert other.headers["x-herd"] == "leader"
    assert chat_calls(sim.url) == 2


def test_errors_and_cut_streams_are_not_cached(cached_herd, sim):
    sim_faults(sim.url, {"kind": "status", "status": 500, "match": "failing"})
    with pytest.raises(openai.InternalServerError):
        ask(cached_herd, "failing")
    assert ask(cached_herd, "failing").headers["x-herd"] == "leader"
    assert chat_calls(sim.url) == 2
    sim_reset(sim.url, reply_tokens=8)  # counters start again
    sim_faults(sim.url, {"kind": "reset", "after_chunks": 3, "match": "cut"})
    with pytest.raises(openai.APIError):
        ask(cached_herd, "cut")
    assert ask(cached_herd, "cut").headers["x-herd"] == "leader"
    assert chat_calls(sim.url) == 2


def test_cached_answer_replays_as_a_stream_of_chunks(cached_herd, sim):
    sim_reset(sim.url, reply_tokens=12)
    c = openai.OpenAI(base_url=cached_herd.url + "/v1", api_key="sk-a", max_retries=0)
    list(c.chat.completions.create(model="m", messages=user("replay me"), stream=True))  # a streamed answer
    raw = c.chat.completions.with_raw_response.create(
        model="m", messages=user("replay me"), stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["x-herd"] == "cache"
    chunks = list(raw.parse())
    text_chunks = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(text_chunks) == 12  # one chunk a token, not one blob
    assert "".join(ch.choices[0].delta.content for ch in text_chunks) == expected_text(
        {"messages": user("replay me")}, {"reply_tokens": 12}
    )
    assert chunks[-1].usage is not None
    assert chat_calls(sim.url) == 1


def test_answer_of_a_non_stream_call_replays_to_a_stream_client(cached_herd, sim):
    sim_reset(sim.url, reply_tokens=12)
    first = ask(cached_herd, "one piece")  # a non-stream flight: one non-stream upstream call
    c = openai.OpenAI(base_url=cached_herd.url + "/v1", api_key="sk-a", max_retries=0)
    raw = c.chat.completions.with_raw_response.create(
        model="m", messages=user("one piece"), stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["x-herd"] == "cache"
    chunks = list(raw.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == first.parse().choices[0].message.content == expected_text(
        {"messages": user("one piece")}, {"reply_tokens": 12}
    )
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert chat_calls(sim.url) == 1


def test_cache_control_no_cache_and_no_store(cached_herd, sim):
    ask(cached_herd, "directives")
    fresh = httpx.post(cached_herd.url + "/v1/chat/completions", json={"model": "m", "messages": user("directives")},
                       headers={"authorization": "Bearer sk-a", "cache-control": "no-cache"})
    assert fresh.headers["x-herd"] == "leader"
    httpx.post(cached_herd.url + "/v1/chat/completions", json={"model": "m", "messages": user("not kept")},
               headers={"authorization": "Bearer sk-a", "cache-control": "no-store"})
    assert ask(cached_herd, "not kept").headers["x-herd"] == "leader"
    assert chat_calls(sim.url) == 4


def test_bypass_neither_reads_nor_writes_the_cache(cached_herd, sim):
    ask(cached_herd, "bypassing")
    r = httpx.post(cached_herd.url + "/v1/chat/completions", json={"model": "m", "messages": user("bypassing")},
                   headers={"authorization": "Bearer sk-a", "x-herd-coalesce": "off"})
    assert r.headers["x-herd"] == "bypass"
    assert chat_calls(sim.url) == 2


async def test_memory_cache_is_a_bounded_lru_with_expiry():
    now = [0.0]
    cache = MemoryCache(max_entries=2, clock=lambda: now[0])
    await cache.put("a", answer(b"1"), ttl_s=10)
    await cache.put("b", answer(b"2"), ttl_s=10)
    assert await cache.get("a") == answer(b"1")  # a is now the most recent
    await cache.put("c", answer(b"3"), ttl_s=10)
    assert await cache.get("b") is None and await cache.get("a") is not None and len(cache) == 2
    now[0] = 11
    assert await cache.get("a") is None and await cache.get("c") is None


async def test_memory_cache_is_bounded_in_bytes_least_recently_used_first():
    size = answer(b"a", 1000).nbytes + 1  # each entry's cost: its answer's bytes and its key
    cache = MemoryCache(max_bytes=3 * size, max_entries=100)
    for key in "abc":
        await cache.put(key, answer(key.encode(), 1000), ttl_s=10)
    assert cache.nbytes == 3 * size and len(cache) == 3
    await cache.get("a")  # b is now the least recently used
    await cache.put("d", answer(b"d", 1000), ttl_s=10)
    assert await cache.get("b") is None and len(cache) == 3 and cache.nbytes == 3 * size
    await cache.put("big", answer(b"big", 4 * size), ttl_s=10)  # bigger than the whole cache: not kept
    assert await cache.get("big") is None and len(cache) == 3
    await cache.put("a", answer(b"a", 10), ttl_s=10)  # replacing an entry counts its new size only
    assert cache.nbytes == 2 * size + answer(b"a", 10).nbytes + 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 5000), st.booleans()), max_size=60),
       st.integers(1, 20_000), st.integers(1, 8))
def test_memory_cache_never_holds_more_than_max_bytes(ops, max_bytes, max_entries):
    cache = MemoryCache(max_bytes=max_bytes, max_entries=max_entries)

    async def run():
        for key, size, read in ops:
            if read:
                await cache.get(key)
            else:
                await cache.put(key, answer(key.encode(), size), ttl_s=10)
            kept = [cache._entries[k][1] for k in cache._entries]
            assert cache.nbytes == sum(a.nbytes + len(k) for k, a in zip(cache._entries, kept, strict=True))
            assert cache.nbytes <= max_bytes and len(cache) <= max_entries

    asyncio.run(run())


def test_an_answer_is_one_bytes_value_and_anything_else_is_a_miss():
    a = Answer(b"data: {}\n\n" * 3, b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n', b'{"usage":{"x":1}}')
    assert Answer.decode(a.encode()) == a and a.usage == {"total_tokens": 3}
    assert Answer(b"", b"", b'{"usage":{"x":1}}').usage == {"x": 1}
    for raw in (b"", b'[{"choices": []}]', a.encode()[:-1], a.encode() + b"x"):
        assert Answer.decode(raw) is None


def metric(herd, name: str) -> float:
    for line in httpx.get(herd.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def test_the_cache_stays_within_max_bytes_and_reports_it(sim):
    sim_reset(sim.url, reply_tokens=40)
    settings = herd_settings(sim.url, cache={"enabled": True, "max_bytes": 40_000})
    with HerdServer(settings) as herd:
        for i in range(6):  # each answer takes about 12 KB: the oldest make room
            list(ask(herd, f"bounded {i}", stream=True).parse())
        kept, size = metric(herd, "herd_cache_entries"), metric(herd, "herd_cache_bytes")
        assert 1 <= kept < 6 and 0 < size <= 40_000 and metric(herd, "herd_cache_evictions_total") == 6 - kept
        assert ask(herd, "bounded 5").headers["x-herd"] == "cache"  # the most recent is kept
        assert ask(herd, "bounded 0").headers["x-herd"] == "leader"  # the oldest went first
