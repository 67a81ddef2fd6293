"""POST /v1/embeddings through herd, coalesced per input: the openai SDK -> herd -> the simulator."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import openai
import pytest

from benchmarks.simulator import ThreadedSimulator
from tests.harness import HerdServer, herd_settings, sim_faults, sim_reset, sim_stats

PATH = "/v1/embeddings"
MODEL = "text-embedding-3-small"


def upstream(sim_url: str) -> tuple[int, int]:
    """(calls, inputs embedded) at the simulator."""
    stats = sim_stats(sim_url, log=False)
    return int(stats["by_path"].get(PATH, 0)), int(stats["embedded_inputs"])


@pytest.fixture(scope="module")
def sim():
    with ThreadedSimulator(embedding_dim=16) as s:
        yield s


@pytest.fixture(scope="module")
def herd(sim):
    with HerdServer(herd_settings(sim.url, server={"request_timeout_s": 20})) as h:
        yield h


@pytest.fixture(scope="module")
def cached_herd(sim):
    with HerdServer(herd_settings(sim.url, cache={"enabled": True})) as h:
        yield h


def client(url: str, key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def data_of(raw: bytes) -> list:
    """The `data` of an answer with every number kept as the text it was written as."""
    return json.loads(raw, parse_float=str, parse_int=str)["data"]


async def post(url: str, body: dict, key: str = "sk-test") -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(url + PATH, json=body, headers={"authorization": f"Bearer {key}"})


@pytest.mark.parametrize("fmt", ["float", "base64"])
async def test_eight_requests_from_128_strings_embed_each_string_once(herd, sim, fmt):
    sim_reset(sim.url, ttft_ms=400)
    rng = random.Random(7)
    strings = [f"chunk {i} of the handbook, {fmt}" for i in range(128)]
    asks = [rng.sample(strings, 64) for _ in range(8)]
    c = client(herd.url)
    answers = await asyncio.gather(*[
        c.embeddings.with_raw_response.create(model=MODEL, input=inputs, encoding_format=fmt) for inputs in asks])
    calls, inputs = upstream(sim.url)
    distinct = {s for inputs in asks for s in inputs}
    assert inputs == len(distinct) and calls <= 8
    # every answer carries exactly the vectors the upstream writes for those inputs, in order
    sim_reset(sim.url)
    for ask, answer in zip(asks, answers, strict=True):
        direct = await post(sim.url, {"model": MODEL, "input": ask,
                                                                    "encoding_format": fmt})
        assert data_of(answer.http_response.content) == data_of(direct.content)
        parsed = answer.parse()
        assert len(parsed.data) == 64 and [d.index for d in parsed.data] == list(range(64))


async def test_one_request_alone_is_byte_identical_to_the_upstream(herd, sim):
    sim_reset(sim.url)
    for fmt in ("float", "base64"):
        body = {"model": MODEL, "input": ["alpha beta", "gamma", "delta epsilon zeta"], "encoding_format": fmt}
        through = await post(herd.url, body)
        direct = await post(sim.url, body)
        assert through.status_code == 200 and through.headers["x-herd"] == "leader"
        assert through.content == direct.content  # usage too: the whole call was this request's
    one = {"model": MODEL, "input": "just one string"}
    assert (await post(herd.url, one)).content == (await post(sim.url, one)).content


async def test_duplicates_in_one_request_and_token_arrays(herd, sim):
    sim_reset(sim.url)
    body = {"model": MODEL, "input": ["same", [1, 2, 3], "same", [1, 2, 3], "other"]}
    answer = await post(herd.url, body)
    assert answer.status_code == 200
    data = answer.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2, 3, 4]
    assert data[0]["embedding"] == data[2]["embedding"] and data[1]["embedding"] == data[3]["embedding"]
    assert upstream(sim.url) == (1, 3)  # each distinct input once, in one call
    direct = (await post(sim.url, {"model": MODEL, "input": [[1, 2, 3]]})).json()["data"][0]["embedding"]
    assert data[1]["embedding"] == direct
    single = await post(herd.url, {"model": MODEL, "input": [5, 6, 7]})  # one input of token ids
    assert len(single.json()["data"]) == 1


async def test_never_shared_across_tenants_models_or_fields(herd, sim):
    sim_reset(sim.url, ttft_ms=300)
    cases = [
        ("sk-a", {"model": MODEL}),
        ("sk-b", {"model": MODEL}),
        ("sk-a", {"model": "text-embedding-3-large"}),
        ("sk-a", {"model": MODEL, "dimensions": 4}),
        ("sk-a", {"model": MODEL, "encoding_format": "base64"}),
        ("sk-a", {"model": MODEL, "user": "u1"}),
        ("sk-a", {"model": MODEL, "unknown_field": 1}),
    ]
    results = await asyncio.gather(*[post(herd.url, {**body, "input": ["x", "y"]}, key)
                                     for key, body in cases for _ in range(2)])
    assert all(r.status_code == 200 for r in results)
    calls, inputs = upstream(sim.url)
    assert (calls, inputs) == (len(cases), 2 * len(cases))
    # "float" written out is the default, and shares with it
    sim_reset(sim.url, ttft_ms=300)
    await asyncio.gather(post(herd.url, {"model": MODEL, "input": ["x"]}),
                         post(herd.url, {"model": MODEL, "input": ["x"], "encoding_format": "float"}))
    assert upstream(sim.url) == (1, 1)


async def test_cached_inputs_are_served_and_only_missing_ones_go_up(cached_herd, sim):
    sim_reset(sim.url)
    first = await post(cached_herd.url, {"model": MODEL, "input": ["c1", "c2", "c3"]})
    assert upstream(sim.url) == (1, 3)
    second = await post(cached_herd.url, {"model": MODEL, "input": ["c3", "c4", "c1", "c5"]})
    assert upstream(sim.url) == (2, 5)  # c4 and c5 in one call
    assert second.headers["x-herd-inputs"] == "upstream=2;joined=0;cache=2"
    assert data_of(second.content)[0]["embedding"] == data_of(first.content)[2]["embedding"]
    third = await post(cached_herd.url, {"model": MODEL, "input": ["c5", "c2"]})
    assert upstream(sim.url) == (2, 5) and third.headers["x-herd"] == "cache"
    metrics = httpx.get(cached_herd.url + "/metrics").text
    for line in ('herd_embedding_inputs_total{source="upstream"} 5.0',
                 'herd_embedding_inputs_total{source="cache"} 4.0',
                 'herd_api_requests_total{api="embeddings",outcome="cache"} 1.0'):
        assert line in metrics
    direct = await post(sim.url, {"model": MODEL, "input": ["c5", "c2"]})
    assert third.content == direct.content
    # usage: the client's own inputs, with each input's share of the call that embedded it
    assert third.json()["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


async def test_bad_input_is_a_400_in_openais_shape(herd, sim):
    for body, param in [
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": ["ok", 3]}, "input[1]"),
        ({"model": MODEL, "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"model": MODEL, "input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x"}, "model"),
    ]:
        answer = await post(herd.url, body)
        assert answer.status_code == 400, body
        assert answer.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError):
        await client(herd.url).embeddings.create(model=MODEL, input=[])


async def test_an_upstream_failure_reaches_every_waiter(herd, sim):
    sim_reset(sim.url, ttft_ms=200)
    sim_faults(sim.url, {"kind": "status", "path": PATH, "status": 500, "times": 1, "delay_ms": 300})
    results = await asyncio.gather(*[post(herd.url, {"model": MODEL, "input": ["f1", "f2"]}) for _ in range(3)])
    assert [r.status_code for r in results] == [500] * 3
    assert all("error" in r.json() for r in results)
    assert upstream(sim.url)[0] == 1
    ok = await post(herd.url, {"model": MODEL, "input": ["f1", "f2"]})  # a failed input is not remembered
    assert ok.status_code == 200


async def test_one_bad_input_fails_only_the_requests_that_sent_it(herd, sim):
    """A batch the upstream refuses for what it asked is retried input by input: a request
    that joined one of its good inputs gets its answer, not the other request's 400."""
    sim_reset(sim.url)
    sim_faults(sim.url, {"kind": "status", "path": PATH, "status": 400, "times": -1, "match": "poison",
                         "delay_ms": 300})
    bad = asyncio.create_task(post(herd.url, {"model": MODEL, "input": ["poison pill", "good chunk"]}))
    await asyncio.sleep(0.1)  # its batch is in flight: this joins "good chunk"
    good = await post(herd.url, {"model": MODEL, "input": ["good chunk"]})
    assert good.status_code == 200 and good.headers["x-herd"] == "follower"
    assert (await bad).status_code == 400
    direct = await post(sim.url, {"model": MODEL, "input": ["good chunk"]})
    assert data_of(good.content) == data_of(direct.content)


async def test_coalescing_off_sends_each_request_as_it_came(herd, sim):
    sim_reset(sim.url, ttft_ms=200)
    body = {"model": MODEL, "input": ["o1", "o2"]}
    async with httpx.AsyncClient(timeout=30) as http:
        answers = await asyncio.gather(*[http.post(herd.url + PATH, json=body, headers={"x-herd-coalesce": "off"})
                                         for _ in range(3)])
    assert [a.headers["x-herd"] for a in answers] == ["bypass"] * 3
    assert upstream(sim.url) == (3, 6)


async def test_the_last_client_leaving_cancels_the_upstream_call(herd, sim):
    sim_reset(sim.url, ttft_ms=4000)
    async with httpx.AsyncClient(timeout=1.0) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(herd.url + PATH, json={"model": MODEL, "input": ["leave", "early"]})
    deadline = asyncio.get_running_loop().time() + 10
    while sim_stats(sim.url, log=False)["disconnects"] < 1:
        assert asyncio.get_running_loop().time() < deadline, "the upstream call was not cancelled"
        await asyncio.sleep(0.05)


def test_vectors_are_cut_out_as_written_whatever_the_layout():
    """OpenAI pretty-prints its JSON; an upstream may list items out of order: each input's
    vector is its own bytes, by `index`."""
    from proxy.apis.embeddings import shares, vectors

    raw = (b'{\n  "object": "list",\n  "data": [\n    {\n      "object": "embedding",\n      "index": 1,\n'
           b'      "embedding": [\n        -0.0069292834,\n        1e-05\n      ]\n    },\n'
           b'    {"embedding": "AACAPwAAAEA=", "index": 0, "object": "embedding"}\n  ],\n'
           b'  "model": "text-embedding-3-small",\n  "usage": {"prompt_tokens": 7, "total_tokens": 7}\n}\n')
    found, model, tokens = vectors(raw, "up", 2)
    assert found == [b'"AACAPwAAAEA="', b"[\n        -0.0069292834,\n        1e-05\n      ]"]
    assert (model, tokens) == ("text-embedding-3-small", 7)
    assert shares(7, [1, 1]) in ([4, 3], [3, 4]) and sum(shares(10, [3, 1, 1])) == 10
    with pytest.raises(Exception, match="malformed"):
        vectors(raw, "up", 3)


# -- across replicas, through Redis ----------------------------------------------------------


def replica_sections(sim_url: str, redis_url: str) -> dict:
    return {
        "server": {"host": "127.0.0.1", "request_timeout_s": 30.0, "log_level": "warning"},
        "auth": {"hash_key": "replicas-share-this-hash-key"},
        "upstreams": {"sim": {"kind": "openai", "base_url": sim_url + "/v1", "retries": 0}},
        "routes": [{"model": "*", "upstream": "sim"}],
        "cache": {"enabled": False},  # shared flights alone, not the shared cache
        "redis": {"url": redis_url, "timeout_s": 0.5, "lease_s": 3.0, "retry_after_s": 0.5},
    }


async def burst_across(replicas, fmt: str, tag: str) -> tuple[list[list[str]], list]:
    """2 replicas x 4 concurrent requests of 64 inputs drawn from 128 distinct strings."""
    rng = random.Random(11)
    strings = [f"{tag} chunk {i}, {fmt}" for i in range(128)]
    asks = [rng.sample(strings, 64) for _ in range(8)]
    clients = [client(r.url) for r in replicas]
    answers = await asyncio.gather(*[
        clients[i % 2].embeddings.with_raw_response.create(model=MODEL, input=inputs, encoding_format=fmt)
        for i, inputs in enumerate(asks)], return_exceptions=True)
    return asks, answers


async def same_as_upstream(sim_url: str, asks: list[list[str]], answers: list, fmt: str) -> None:
    for ask, answer in zip(asks, answers, strict=True):
        assert not isinstance(answer, BaseException), answer
        direct = await post(sim_url, {"model": MODEL, "input": ask, "encoding_format": fmt})
        assert data_of(answer.http_response.content) == data_of(direct.content)


@pytest.mark.parametrize("fmt", ["float", "base64"])
async def test_two_replicas_embed_each_string_once_through_redis(sim, fmt):
    """Each input's flight is claimed across replicas (one pipelined claim per request): the
    inputs another replica leads are mirrored from Redis, not embedded again."""
    import tempfile
    from pathlib import Path

    from tests.redis_servers import RedisServer, start_replicas

    sim_reset(sim.url, ttft_ms=1500)
    with RedisServer() as redis_server, tempfile.TemporaryDirectory(prefix="herd-replicas-") as d:
        replicas = start_replicas(2, replica_sections(sim.url, redis_server.url), Path(d))
        try:
            asks, answers = await burst_across(replicas, fmt, "shared")
            calls, inputs = upstream(sim.url)
            metrics = [httpx.get(r.url + "/metrics").text for r in replicas]
        finally:
            for r in replicas:
                r.stop()
    assert inputs == len({s for ask in asks for s in ask}) and calls <= 8
    assert any('herd_shared_flights_total{role="follow"}' in m for m in metrics)
    sim_reset(sim.url)
    await same_as_upstream(sim.url, asks, answers, fmt)


async def test_two_replicas_answer_every_input_when_redis_dies(sim):
    """Redis killed while inputs are mirrored from the other replica: each replica calls the
    upstream for them itself; every request succeeds with the upstream's vectors. Then, with
    Redis gone, the same again, local-only."""
    import tempfile
    from pathlib import Path

    from tests.redis_servers import RedisServer, start_replicas

    sim_reset(sim.url, ttft_ms=1500)
    with RedisServer() as redis_server, tempfile.TemporaryDirectory(prefix="herd-replicas-") as d:
        replicas = start_replicas(2, replica_sections(sim.url, redis_server.url), Path(d))
        try:
            burst = asyncio.create_task(burst_across(replicas, "float", "doomed"))
            await asyncio.sleep(0.5)  # the inputs are claimed and in flight by now
            redis_server.stop()
            asks, answers = await burst
            again = await burst_across(replicas, "float", "after")
        finally:
            for r in replicas:
                r.stop()
    sim_reset(sim.url)
    await same_as_upstream(sim.url, asks, answers, "float")
    await same_as_upstream(sim.url, *again, "float")


async def test_an_input_led_here_ends_without_waiting_for_inputs_mirrored_from_elsewhere(sim):
    """Replica A's request leads "fast" and mirrors "slow" (led by B); B's own request for
    "fast" mirrors it from A. B must get "fast" as soon as A's upstream call answers, not when
    A's whole request (its mirror of "slow") ends: two replicas each mirroring what the other
    leads, in requests that also lead, would otherwise wait on each other until the deadline."""
    import tempfile
    from pathlib import Path

    from tests.redis_servers import RedisServer, start_replicas

    sim_reset(sim.url, ttft_ms=0)
    sim_faults(sim.url, {"kind": "stall", "match": "slow", "stall_s": 20})

    async def until_calls(n: int) -> None:
        deadline = asyncio.get_running_loop().time() + 20
        while upstream(sim.url)[0] < n:
            assert asyncio.get_running_loop().time() < deadline, f"the upstream never saw call {n}"
            await asyncio.sleep(0.02)

    with RedisServer() as redis_server, tempfile.TemporaryDirectory(prefix="herd-replicas-") as d:
        a, b = start_replicas(2, replica_sections(sim.url, redis_server.url), Path(d))
        try:
            ca, cb = client(a.url), client(b.url)
            slow = asyncio.create_task(cb.embeddings.create(model=MODEL, input=["slow"]))  # B leads "slow"
            await until_calls(1)
            both = asyncio.create_task(ca.embeddings.create(model=MODEL, input=["fast", "slow"]))
            await until_calls(2)  # A called the upstream for "fast" alone: it mirrors "slow"
            fast = await cb.embeddings.create(model=MODEL, input=["fast"])  # mirrored from A
            assert not slow.done() and not both.done(), "'slow' was answered: the test proves nothing"
            assert upstream(sim.url) == (2, 2)
            direct = await post(sim.url, {"model": MODEL, "input": ["fast"]})
            assert fast.data[0].embedding == direct.json()["data"][0]["embedding"]
            slow.cancel()
            both.cancel()
            await asyncio.gather(slow, both, return_exceptions=True)
        finally:
            for r in (a, b):
                r.stop()
    sim_reset(sim.url)
