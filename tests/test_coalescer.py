"""The coalescer on its own: flights, waiters, replay, cancellation. No HTTP."""

from __future__ import annotations

import asyncio

import pytest

from proxy.coalescer import FlightCancelled, Group


async def drain(flight) -> list:
    return [c async for batch in flight.follow() for c in batch]


async def test_followers_join_and_everyone_sees_every_chunk():
    group = Group()
    gate = asyncio.Event()
    calls = 0

    async def work(flight):
        nonlocal calls
        calls += 1
        for i in range(5):
            await gate.wait()
            flight.publish(i)

    first = group.acquire(["k"], work)
    leader = first.flight
    followers = [group.acquire(["k"], work) for _ in range(3)]
    assert all(t.flight is leader for t in followers) and leader.waiters == 4
    assert first.role == "leader" and {t.role for t in followers} == {"follower"}
    readers = [asyncio.create_task(drain(leader)) for _ in range(4)]
    gate.set()
    results = await asyncio.gather(*readers)
    assert results == [[0, 1, 2, 3, 4]] * 4 and calls == 1
    assert leader.done and leader.error is None
    assert group.get(["k"]) is None and len(group) == 0


async def test_late_joiner_replays_from_the_first_chunk_without_gaps_or_duplicates():
    group = Group()
    step = asyncio.Queue()

    async def work(flight):
        while (item := await step.get()) is not None:
            flight.publish(item)

    flight = group.acquire(["k"], work).flight
    early = asyncio.create_task(drain(flight))
    for i in range(3):
        await step.put(i)
    await asyncio.sleep(0.01)
    assert flight.chunks == [0, 1, 2]
    late = asyncio.create_task(drain(group.acquire(["k"], work).flight))
    for i in range(3, 6):
        await step.put(i)
    await step.put(None)
    assert await early == await late == [0, 1, 2, 3, 4, 5]


async def test_leader_is_not_delayed_by_coalescing():
    group = Group()
    started = asyncio.Event()

    async def work(flight):
        started.set()
        flight.publish("x")

    group.acquire(["k"], work)
    # The work runs at the next loop iteration: no window, no timer.
    await asyncio.sleep(0)
    assert started.is_set()


async def test_error_reaches_every_waiter_and_the_flight_is_forgotten():
    group = Group()

    async def work(flight):
        flight.publish("partial")
        await asyncio.sleep(0.01)
        raise RuntimeError("upstream broke")

    flight = group.acquire(["k"], work).flight
    group.join(flight)
    await flight.wait()
    assert isinstance(flight.error, RuntimeError) and flight.chunks == ["partial"]
    assert await drain(flight) == ["partial"]
    assert len(group) == 0


async def test_one_waiter_leaving_keeps_the_work_and_the_last_cancels_it():
    group = Group()
    cancelled = asyncio.Event()

    async def work(flight):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    leader = group.acquire(["k"], work)
    flight = leader.flight
    follower = group.acquire(["k"], work)
    group.release(follower)
    await asyncio.sleep(0.01)
    assert not flight.done and group.get(["k"]) is flight
    group.release(leader)
    await asyncio.wait_for(cancelled.wait(), 1)
    await asyncio.sleep(0)
    assert flight.done and isinstance(flight.error, FlightCancelled)
    assert group.get(["k"]) is None and len(group) == 0


async def test_private_flights_cannot_be_joined():
    group = Group()

    async def work(flight):
        flight.publish(1)

    ticket = group.acquire(["k"], work, private=True)
    assert group.get(["k"]) is None and ticket.role == "bypass"
    assert group.acquire(["k"], work, private=True).flight is not ticket.flight
    assert await drain(ticket.flight) == [1]


async def test_a_flight_answers_under_all_its_keys():
    group = Group()

    async def work(flight):
        await asyncio.sleep(0.01)

    flight = group.acquire(["exact", "normalized"], work).flight
    assert group.get(["normalized"]) is flight and group.get(["other", "exact"]) is flight
    await flight.wait()
    await asyncio.sleep(0)
    assert group.get(["exact"]) is None and group.get(["normalized"]) is None


class ListIndex:
    def __init__(self):
        self.items = {}

    def add(self, item_id, probe):
        self.items[item_id] = probe

    def remove(self, item_id):
        del self.items[item_id]

    def best(self, probe):
        for item_id, other in self.items.items():
            if other[0] == probe[0]:
                return item_id, 0.97
        return None

    def __len__(self):
        return len(self.items)


async def test_similar_flights_are_found_within_their_group_only():
    group = Group(index_factory=ListIndex)

    async def work(flight):
        await asyncio.sleep(0.01)

    flight = group.acquire(["a"], work).flight
    assert group.find_similar("g1", ("reset password",)) is None
    group.index(flight, "g1", ("reset password",))
    assert group.find_similar("g1", ("reset password",)) == (flight, 0.97)
    assert group.find_similar("g2", ("reset password",)) is None
    await flight.wait()
    await asyncio.sleep(0)
    assert group.find_similar("g1", ("reset password",)) is None
    assert group._indexes == {}


async def test_publish_after_done_is_refused():
    group = Group()

    async def work(flight):
        pass

    flight = group.acquire(["k"], work).flight
    await flight.wait()
    with pytest.raises(RuntimeError):
        flight.publish("late")


async def test_a_ticket_reads_its_role_from_what_the_work_found():
    group = Group()
    found = asyncio.Event()

    async def work(flight):
        flight.source = "follow"  # e.g. another replica leads this flight
        flight.shared_id = "remote-id"
        found.set()
        flight.publish("x")

    leader = group.acquire(["k"], work)
    follower = group.acquire(["k"], work)
    assert leader.role == "leader" and follower.role == "follower"
    await found.wait()
    assert leader.role == follower.role == "follower"
    assert leader.flight.public_id == "remote-id"

    async def cached(flight):
        flight.source = "cache"

    assert group.acquire(["c"], cached).role == "leader"
    ticket = group.acquire(["c"], cached)
    await ticket.flight.wait()
    assert ticket.role == "cache"


async def test_acquire_never_suspends_so_a_burst_runs_the_work_once():
    group = Group()
    calls = 0

    async def work(flight):
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)  # e.g. a cache read
        flight.publish("answer")

    tickets = [group.acquire(["k"], work) for _ in range(100)]
    results = await asyncio.gather(*[drain(t.flight) for t in tickets])
    assert calls == 1 and results == [["answer"]] * 100
    assert [t.leads for t in tickets].count(True) == 1
