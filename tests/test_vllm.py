"""vLLM as an upstream: herd's concurrency to a GPU backend follows the backend's own load."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from benchmarks.simulator import expected_text
from proxy.config import parse_settings
from proxy.errors import Overloaded
from proxy.resilience import CapacityLimiter
from proxy.upstream.vllm import metrics_url, parse_load
from tests.harness import HerdServer, sim_reset, sim_stats

CHAT = "/v1/chat/completions"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- units -------------------------------------------------------------------------------


def test_metrics_url_and_parsing(sim):
    assert metrics_url("http://gpu:8000/v1") == "http://gpu:8000/metrics"
    assert metrics_url("http://gpu:8000/") == "http://gpu:8000/metrics"
    sim_reset(sim.url, kv_cache_usage=0.42, waiting=3)
    assert parse_load(httpx.get(sim.url + "/metrics").text) == (0.42, 3.0)
    two_engines = (
        'vllm:gpu_cache_usage_perc{engine="0"} 0.5\nvllm:gpu_cache_usage_perc{engine="1"} 0.75\n'
        'vllm:num_requests_waiting{engine="0"} 1\nvllm:num_requests_waiting{engine="1"} 2\n'
    )
    assert parse_load(two_engines) == (0.75, 3.0)  # the fullest cache, all the waiting
    assert parse_load("# nothing here\n") == (None, None)


def test_limit_halves_under_pressure_and_recovers():
    limiter = CapacityLimiter("gpu", max_limit=16, min_limit=2, kv_high=0.9, waiting_high=1)
    limiter.observe(0.95, 0)
    assert limiter.limit == 8
    limiter.observe(0.5, 4)  # requests waiting inside vLLM: pressure too
    assert limiter.limit == 4
    for _ in range(5):
        limiter.observe(0.99, None)
    assert limiter.limit == 2  # never below the minimum
    limiter.observe(0.8, 0)  # below the mark but not far: one more
    assert limiter.limit == 3
    limiter.observe(0.2, 0)  # plenty of room: double
    assert limiter.limit == 6
    limiter.observe(0.1, 0)
    limiter.observe(0.1, 0)
    assert limiter.limit == 16  # never above the maximum


async def test_queue_is_fifo_bounded_and_timed():
    limiter = CapacityLimiter("gpu", max_limit=1, queue_size=2, queue_timeout_s=0.3)
    order: list[int] = []
    release = asyncio.Event()

    async def call(i: int) -> None:
        async with limiter.slot():
            order.append(i)
            await release.wait()

    first = asyncio.create_task(call(0))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(call(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    assert limiter.active == 1 and limiter.queued == 2
    with pytest.raises(Overloaded) as info:
        await call(3)  # the queue is full
    assert info.value.status == 503 and info.value.code == "queue_full" and "retry-after" in info.value.headers
    release.set()
    await asyncio.gather(first, *queued)
    assert order == [0, 1, 2] and limiter.active == 0

    release.clear()
    holder = asyncio.create_task(call(4))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await call(5)  # waits its 0.3 s, then gives up
    assert info.value.code == "queue_timeout" and limiter.queued == 0
    waiter = asyncio.create_task(call(6))
    await asyncio.sleep(0)
    waiter.cancel()  # a waiter that leaves frees its place
    await asyncio.gather(waiter, return_exceptions=True)
    release.set()
    await holder
    assert limiter.active == 0 and limiter.queued == 0


# -- end to end --------------------------------------------------------------------------


def vllm_settings(sim_url: str, **upstream) -> object:
    return parse_settings(
        {
            "cache": {"enabled": False},
            "upstreams": {
                "gpu": {
                    "kind": "vllm",
                    "base_url": sim_url + "/v1",
                    "retries": 0,
                    **upstream,
                }
            },
        },
        env={},
    )


async def reached(herd, predicate, timeout: float = 60.0) -> bool:
    """Whether `predicate()`, run on herd's loop, becomes true within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not herd.call(predicate):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_high_kv_cache_lowers_concurrency_queues_then_refuses_with_retry_after(
    sim,
):
    sim_reset(sim.url, kv_cache_usage=0.95, ttft_ms=700)
    settings = vllm_settings(
        sim.url,
        max_concurrency=8,
        min_concurrency=1,
        queue_size=2,
        queue_timeout_s=20,
        poll_interval_s=0.05,
    )
    with HerdServer(settings) as herd:
        capacity = herd.gateway.upstreams["gpu"].capacity
        assert await reached(herd, lambda: capacity.limit == 1)
        c = openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key="sk-x", max_retries=0, timeout=60)
        loop = asyncio.get_running_loop()

        async def one(i: int):
            try:
                result = await c.chat.completions.create(model=LLAMA, messages=user(f"gpu job {i}"))
            except openai.APIStatusError as e:
                result = e
            return i, loop.time(), result

        outcomes = await asyncio.gather(*[one(i) for i in range(6)])
        metrics = herd.gateway.metrics.render().decode()

    answered = {i: r for i, _, r in outcomes if not isinstance(r, openai.APIStatusError)}
    refused = {i: r for i, _, r in outcomes if isinstance(r, openai.APIStatusError)}
    assert len(answered) == 3 and len(refused) == 3  # one running, two queued, the rest refused
    for i, r in answered.items():
        assert r.choices[0].message.content == expected_text({"messages": user(f"gpu job {i}")})
    for r in refused.values():
        assert r.status_code == 503 and r.body["code"] == "queue_full"
        assert int(r.response.headers["retry-after"]) >= 1
    # the refusals came at once, before the queued calls were served
    assert max(t for i, t, _ in outcomes if i in refused) < min(t for i, t, _ in outcomes if i in answered)
    stats = sim_stats(sim.url)
    assert stats["max_active"] == 1  # herd never ran two at once on the full GPU
    sent = sorted(last_user(e["body"]) for e in stats["log"] if e["path"] == CHAT)
    assert sent == sorted(f"gpu job {i}" for i in answered)  # nothing lost, nothing sent twice
    assert 'herd_upstream_concurrency_limit{upstream="gpu"} 1.0' in metrics


async def test_concurrency_recovers_when_the_cache_empties(sim):
    sim_reset(sim.url, kv_cache_usage=0.97, ttft_ms=400)
    settings = vllm_settings(sim.url, max_concurrency=4, min_concurrency=1, poll_interval_s=0.05)
    with HerdServer(settings) as herd:
        capacity = herd.gateway.upstreams["gpu"].capacity
        assert await reached(herd, lambda: capacity.limit == 1)
        await asyncio.to_thread(httpx.post, sim.url + "/_sim/settings", json={"kv_cache_usage": 0.1})
        assert await reached(herd, lambda: capacity.limit == 4)
        c = openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key="sk-x", max_retries=0, timeout=60)
        results = await asyncio.gather(
            *[c.chat.completions.create(model=LLAMA, messages=user(f"free gpu {i}")) for i in range(4)]
        )
    assert [r.choices[0].message.content for r in results] == [f"echo: free gpu {i}" for i in range(4)]
    assert sim_stats(sim.url)["max_active"] > 1


async def test_waiting_requests_inside_vllm_also_lower_the_limit(sim):
    sim_reset(sim.url, waiting=5)
    settings = vllm_settings(sim.url, max_concurrency=16, min_concurrency=2, poll_interval_s=0.05)
    with HerdServer(settings) as herd:
        capacity = herd.gateway.upstreams["gpu"].capacity
        assert await reached(herd, lambda: capacity.limit == 2)


def last_user(body: dict) -> str:
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
