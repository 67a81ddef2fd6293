"""How a waiter watches its client while it waits (proxy.responses.until_disconnect)."""

from __future__ import annotations

import asyncio

import pytest

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


async def _never_leaves_but_counts(calls: list[int]):
    calls.append(1)
    await asyncio.Event().wait()


@pytest.mark.parametrize("deadline_s, watched", [(0.05, False), (0.3, True)])
async def test_the_deadline_cuts_the_work_on_the_watchers_timer(deadline_s, watched):
    """One timer per waiter does both jobs: before the watch starts (deadline first) and after
    (the deadline's timer armed when the watcher starts), the work is cancelled at the
    deadline and can tell that cancellation by what on_deadline recorded."""
    calls: list[int] = []
    expired: list[float] = []
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def work():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            assert expired  # the deadline's cancellation, not another's
            asyncio.current_task().uncancel()

    def on_deadline() -> bool:
        expired.append(loop.time())
        return True

    assert await until_disconnect(work(), lambda: _never_leaves_but_counts(calls), watch_after=0.1,
                                  deadline=started + deadline_s, on_deadline=on_deadline) is True
    assert expired and expired[0] - started >= deadline_s
    assert loop.time() - started < deadline_s + 1.0
    assert bool(calls) is watched  # the watcher started only when the deadline came after watch_after
    assert not asyncio.current_task().cancelling()


async def test_a_deadline_that_on_deadline_declines_leaves_the_work_alone():
    loop = asyncio.get_running_loop()
    asked: list[bool] = []

    def on_deadline() -> bool:
        asked.append(True)
        return False

    assert await until_disconnect(asyncio.sleep(0.2), lambda: _never_leaves_but_counts([]), watch_after=0.5,
                                  deadline=loop.time() + 0.05, on_deadline=on_deadline) is True
    assert asked == [True]


def test_rendering_and_usage_read_no_chunk_twice(monkeypatch):
    """A chunk from an upstream keeps its bytes, not its object (proxy.chunks.Chunk): what
    runs per chunk or per waiter (rendering the stream, reading the usage for accounting
    and rate limits) must not parse it again. Seen red when the rendering read each
    chunk's `type` from its object, and the Responses and Messages usage read theirs."""
    import orjson

    from proxy.answer import stream_of
    from proxy.apis.chat import CHAT_WIRE
    from proxy.apis.messages import NATIVE_WIRE
    from proxy.apis.responses import RESPONSES_WIRE
    from proxy.chunks import Chunk
    from proxy.coalescer import Flight

    def made(*events: dict) -> list[Chunk]:
        return [Chunk(e, orjson.dumps(e)) for e in events]

    chat = made({"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]},
                {"id": "c", "choices": [], "usage": {"total_tokens": 3}})
    responses = made({"type": "response.output_text.delta", "delta": "hi"},
                     {"type": "response.completed", "response": {"usage": {"input_tokens": 1, "output_tokens": 2,
                                                                             "total_tokens": 3}}})
    messages = made({"type": "message_start", "message": {"usage": {"input_tokens": 1, "output_tokens": 1}}},
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
                    {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 2}})
    monkeypatch.setattr(Chunk, "data", property(lambda chunk: pytest.fail("a chunk was parsed again")))
    for wire, chunks in ((CHAT_WIRE, chat), (RESPONSES_WIRE, responses), (NATIVE_WIRE, messages)):
        flight = Flight(["k"])
        flight.extend(chunks)
        assert stream_of(flight).parts
        assert wire.usage(chunks) and wire.flight_usage(flight)


async def test_watching_a_client_leaves_no_reference_cycle_behind():
    """Each request's objects must go when it ends, by reference counting: a cycle through
    until_disconnect's timer (a closure holding the handle that holds it) kept every
    request's flight, body and response for the collector, and cost ~30% more CPU per
    request at saturation. Seen red with the timer in a variable the closure rebinds."""
    import gc

    class Response:  # stands for the FlightResponse whose _expire is on_deadline
        def expire(self) -> bool:
            return True

    loop = asyncio.get_running_loop()

    async def never():
        await asyncio.Event().wait()

    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            await until_disconnect(asyncio.sleep(0), never, deadline=loop.time() + 60, on_deadline=Response().expire)
        await asyncio.sleep(0)
        assert gc.collect() == 0
    finally:
        gc.enable()
