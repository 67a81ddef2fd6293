"""The result cache in Redis, shared by every replica, with a memory cache in front.

An entry is `{prefix}:{<key>}:answer`: the flight's `Answer` as one bytes value
(`Answer.encode`: its SSE events and JSON body, rendered once), stored with the cache TTL
(`SET ... PX`), so it expires on its own. The key is the gateway's keyed digest (tenant hash
included). A value in any other format (an older herd's) reads as a miss.

The memory cache in front serves repeated hits without a round trip and keeps the cache
working while Redis is down (it is the whole cache then); an entry copied from Redis keeps
the TTL Redis has left for it.
"""

from __future__ import annotations

from proxy.answer import Answer
from proxy.cache import MemoryCache
from proxy.redis.link import Link, RedisUnavailable


class RedisCache:
    def __init__(self, link: Link, memory: MemoryCache) -> None:
        self.link = link
        self.memory = memory

    def _key(self, key: str) -> str:
        return self.link.key(key, "answer")

    async def get(self, key: str) -> Answer | None:
        answer = await self.memory.get(key)
        if answer is not None or not self.link.up:
            return answer
        name = self._key(key)

        def fetch(pipe) -> None:
            pipe.get(name)
            pipe.pttl(name)

        try:
            raw, ttl_ms = await self.link.call(fetch)
        except RedisUnavailable:
            return None
        if raw is None:
            return None
        answer = Answer.decode(raw)
        if answer is None:
            return None  # not ours to trust: a miss
        if ttl_ms and ttl_ms > 0:
            await self.memory.put(key, answer, ttl_ms / 1000)
        return answer

    async def put(self, key: str, answer: Answer, ttl_s: float) -> None:
        await self.memory.put(key, answer, ttl_s)
        if not self.link.up:
            return
        value = answer.encode()
        try:
            await self.link.call(lambda pipe: pipe.set(self._key(key), value, px=max(1, int(ttl_s * 1000))))
        except RedisUnavailable:
            pass
