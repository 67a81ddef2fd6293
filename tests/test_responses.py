"""How a waiter watches its client while it waits (proxy.responses.until_disconnect)."""

from __future__ import annotations

import asyncio

from proxy.responses import until_disconnect


async def test_a_quick_answer_never_watches_the_client():
    calls = 0

    async def receive():
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()

    assert await until_disconnect(asyncio.sleep(0.01), receive, watch_after=0.2) is True
    assert calls == 0


async def test_a_client_that_leaves_stops_a_long_wait_soon_after_the_watch_starts():
    gone = asyncio.Event()
    cancelled = False

    async def receive():
        await gone.wait()
        return {"type": "http.disconnect"}

    async def work():
        nonlocal cancelled
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled = True
            raise

    loop = asyncio.get_running_loop()
    loop.call_later(0.05, gone.set)  # the client leaves before the watch starts
    started = loop.time()
    assert await until_disconnect(work(), receive, watch_after=0.2) is False
    assert cancelled and 0.2 <= loop.time() - started < 1.0
    assert not asyncio.current_task().cancelling()  # this task goes on normally
