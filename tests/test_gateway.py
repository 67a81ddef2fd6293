"""The gateway's data path in one process: what a burst costs (invariant 9)."""

from __future__ import annotations

import asyncio

import httpx

from tests.harness import HerdServer, chat_calls, herd_settings, sim_reset


class CountingCache:
    """A cache whose reads take a while (as a Redis round trip does) and are counted."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gets = 0

    async def get(self, key):
        self.gets += 1
        await asyncio.sleep(0.05)
        return await self.inner.get(key)

    async def put(self, key, chunks, ttl_s):
        await self.inner.put(key, chunks, ttl_s)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def test_a_burst_costs_one_cache_read_and_one_upstream_call(sim):
    sim_reset(sim.url, ttft_ms=300)
    with HerdServer(herd_settings(sim.url, cache={"enabled": True})) as herd:
        cache = herd.gateway.cache = CountingCache(herd.gateway.cache)
        body = {"model": "m", "messages": user("one cache read for the burst")}
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as http:
            answers = await asyncio.gather(*[http.post(herd.url + "/v1/chat/completions", json=body)
                                             for _ in range(100)])
        assert [a.status_code for a in answers] == [200] * 100
        roles = [a.headers["x-herd"] for a in answers]
        assert roles.count("leader") == 1 and roles.count("follower") == 99
        assert len({a.headers["x-herd-flight"] for a in answers}) == 1
        assert cache.gets == 1  # the flight read the cache, not each request
        assert chat_calls(sim.url) == 1
        # a cached answer: every request of a burst is served by the one read of its flight
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as http:
            hits = await asyncio.gather(*[http.post(herd.url + "/v1/chat/completions", json=body)
                                          for _ in range(50)])
        assert {a.headers["x-herd"] for a in hits} == {"cache"}
        assert {a.json()["choices"][0]["message"]["content"] for a in hits} == {
            answers[0].json()["choices"][0]["message"]["content"]}
        assert cache.gets == 2 and chat_calls(sim.url) == 1


async def test_a_semantic_burst_embeds_its_prompt_once(sim):
    """Identical requests join the flight before its embedding: one embedding per burst."""
    sim_reset(sim.url, ttft_ms=300)
    settings = herd_settings(sim.url, coalesce={"mode": "semantic"}, server={"request_timeout_s": 30})
    with HerdServer(settings) as herd:
        batcher = herd.gateway.matcher.embedder

        def embeddings() -> int:
            stats = herd.call(batcher.stats)
            return stats["items"] + stats["cache_hits"] + stats["joined"]

        before = embeddings()
        body = {"model": "m", "messages": user("How do I reset my password for the portal?")}
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as http:
            answers = await asyncio.gather(*[http.post(herd.url + "/v1/chat/completions", json=body)
                                             for _ in range(50)])
        assert [a.status_code for a in answers] == [200] * 50
        assert embeddings() - before == 1
        assert chat_calls(sim.url) == 1
