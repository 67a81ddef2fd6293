"""The same cross-replica sharing against a real 3-master Redis Cluster (`[redis] cluster = true`)."""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest

from benchmarks.simulator import expected_text
from tests.harness import chat_calls, sim_reset
from tests.redis_servers import RedisCluster, start_replicas
from tests.test_redis import (
    ask,
    burst,
    check_burst,
    check_keys,
    leader_killed_mid_stream,
    replica_sections,
    session,
    user,
)


@pytest.fixture(scope="module")
def cluster():
    with RedisCluster() as c:
        yield c


@pytest.fixture()
def workdir():
    with tempfile.TemporaryDirectory(prefix="herd-cluster-replicas-") as d:
        yield Path(d)


def flights_by_tag(keys: dict) -> dict[str, set[int]]:
    """Hash tag -> the nodes (ports) its keys live on."""
    nodes: dict[str, set[int]] = defaultdict(set)
    for name, info in keys.items():
        nodes[re.search(r"\{([0-9a-f]+)\}", name).group(1)].add(info["port"])
    return nodes


async def test_300_requests_across_three_replicas_on_a_cluster_make_one_upstream_call(cluster, sim, workdir):
    replicas = start_replicas(3, replica_sections(sim.url, cluster.url, cluster=True, cache=True), workdir)
    try:
        assert all(r.ready()["redis"] == "up" for r in replicas)
        sim_reset(sim.url, ttft_ms=2500, tokens_per_s=40, reply_tokens=20)
        answers = await burst(replicas, "one question, one cluster")
        check_burst(answers, replicas, "one question, one cluster", reply_tokens=20)
        assert chat_calls(sim.url) == 1
        # more flights, so that their keys land on different masters
        sim_reset(sim.url, ttft_ms=300)
        async with session() as http:
            more = await asyncio.gather(*[ask(http, replicas[i % 3].url, f"spread {i % 12}", stream=i % 2 == 0)
                                          for i in range(48)])
        assert all(a.status == 200 and a.error is None for a in more)
        assert chat_calls(sim.url) == 12
        # answers are cached in the cluster: another replica replays one as a stream
        async with session() as http:
            hit = await ask(http, replicas[2].url, "spread 3", stream=True)
        assert hit.role == "cache" and hit.done and hit.text == expected_text({"messages": user("spread 3")})
        assert chat_calls(sim.url) == 12
    finally:
        for r in replicas:
            r.stop()
    keys = check_keys(cluster)
    by_tag = flights_by_tag(keys)
    assert all(len(ports) == 1 for ports in by_tag.values())  # one flight's keys share a slot
    assert len(set().union(*by_tag.values())) > 1  # and flights spread over the masters


async def test_leader_killed_mid_stream_on_a_cluster(cluster, sim, workdir):
    replicas = start_replicas(3, replica_sections(sim.url, cluster.url, cluster=True, lease_s=2.0), workdir)
    try:
        await leader_killed_mid_stream(replicas, sim, "who leads the cluster when the leader dies")
    finally:
        for r in replicas:
            r.kill()
    check_keys(cluster)
