"""The link to Redis on its own (proxy.redis.link): bounded connections, pipelined calls,
health judged on an error rate. Against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.config import RedisConfig
from proxy.metrics import Metrics
from proxy.redis.link import Health, Link, RedisUnavailable, within
from tests.redis_servers import RedisServer


@pytest.fixture()
def server():
    with RedisServer() as s:
        yield s


async def started(server: RedisServer, **cfg) -> Link:
    link = Link(RedisConfig(url=server.url, **{"timeout_s": 0.25, "retry_after_s": 0.5, **cfg}), Metrics())
    await link.start()
    assert link.up
    return link


def connections(server: RedisServer) -> int:
    return len(server.client().client_list()) - 1  # less the one asking


async def test_a_thousand_concurrent_calls_share_a_few_pipelines(server):
    link = await started(server, pool_size=8)
    try:
        replies = await asyncio.gather(*[link.call(lambda pipe, i=i: pipe.set(f"k{i}", i)) for i in range(1000)])
        assert replies == [[True]] * 1000
        assert server.client().dbsize() == 1000
        assert connections(server) <= 4  # the pipelines' connections, not one per call
        # blocking reads take connections of their own: more readers than connections queue, none fails
        reads = await asyncio.gather(*[link.run(lambda r, i=i: r.xread({f"s{i}": "0-0"}, block=100), timeout=5)
                                       for i in range(40)])
        assert reads == [[]] * 40
        assert connections(server) <= 8 + 4
        assert link.up
    finally:
        await link.aclose()


async def test_one_slow_moment_does_not_turn_sharing_off(server):
    link = await started(server, retry_after_s=5.0)
    try:
        server.freeze()
        asyncio.get_running_loop().call_later(0.35, server.thaw)
        with pytest.raises(RedisUnavailable):
            await link.run(lambda r: r.ping())  # this one call is too slow
        for _ in range(20):  # meanwhile the link pings, and Redis answers
            assert link.up
            await asyncio.sleep(0.05)
        assert await link.call(lambda pipe: pipe.ping()) == [True]
    finally:
        server.thaw()
        await link.aclose()


async def test_a_frozen_redis_is_marked_down_soon_even_without_traffic_and_up_again_when_it_thaws(server):
    link = await started(server)
    try:
        server.freeze()
        with pytest.raises(RedisUnavailable):
            await link.call(lambda pipe: pipe.ping())
        for _ in range(50):
            if not link.up:
                break
            await asyncio.sleep(0.05)
        assert not link.up  # the pings after that one failure settled it
        with pytest.raises(RedisUnavailable):
            await link.call(lambda pipe: pipe.ping())  # at once: no waiting on a frozen Redis
        server.thaw()
        for _ in range(60):
            if link.up:
                break
            await asyncio.sleep(0.05)
        assert link.up
    finally:
        server.thaw()
        await link.aclose()


def test_health_is_an_error_rate_over_a_window():
    now = [0.0]
    health = Health(window_s=2.0, min_failures=3, ratio=0.5, clock=lambda: now[0])
    for _ in range(10):
        assert not health.record(True)
    assert not health.record(False) and not health.record(False) and not health.record(False)  # 3 of 13
    now[0] = 3.0  # the successes left the window
    assert not health.record(False)  # 1 of 1: not enough failures
    assert not health.record(False)
    assert health.record(False)  # 3 of 3
    now[0] = 10.0
    assert not health.record(False)  # an old outage is forgotten


async def test_a_reply_that_came_while_the_loop_was_busy_is_not_a_timeout():
    loop = asyncio.get_running_loop()
    reply = loop.create_future()
    loop.call_later(0.01, time.sleep, 0.3)  # the loop is stuck past the deadline...
    loop.call_later(0.02, reply.set_result, "in time")  # ...while the reply was due in time
    assert await within(reply, 0.1) == "in time"  # asyncio.timeout: TimeoutError


async def test_a_deadline_whose_timer_ran_late_waits_one_more_period():
    loop = asyncio.get_running_loop()
    reply = loop.create_future()
    loop.call_later(0.01, time.sleep, 0.3)  # the timer at 0.1 s cannot run before 0.31 s
    loop.call_later(0.35, reply.set_result, "a little later")
    assert await within(reply, 0.1) == "a little later"
    never = loop.create_future()
    with pytest.raises(TimeoutError):
        await within(never, 0.05)  # on time, and nothing came: Redis is slow


def test_a_redis_server_started_and_then_entered_runs_once_and_is_stopped():
    server = RedisServer().start()
    first = server.proc
    assert first is not None
    with server as entered:  # `with RedisServer().start() as r:`: no second redis-server
        assert entered.proc is first
    assert first.poll() is not None  # stopped on exit, not left running
