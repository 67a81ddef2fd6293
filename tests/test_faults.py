"""Fault schedules under bursts, over real sockets: herd in a thread, a misbehaving upstream
(benchmarks/faulty.py) or herd's simulator, and the official SDK as the client.

Every client must end with the answer or an OpenAI-format error: no hang, no mixed stream,
no plain-text 500. A blip upstream stays a blip (design invariant 11).
"""

from __future__ import annotations

import asyncio
import time

import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.faulty import FaultyUpstream
from proxy.chunks import Chunk, assemble, malformed
from tests.harness import HerdServer, herd_settings

CHAT = "/v1/chat/completions"
PROBE_INTERVAL_S = 1.5  # the circuit's first cool-down (circuit_reset_s, 1 s) and a probe call


@pytest.fixture
def upstream():
    with FaultyUpstream() as up:
        yield up


def client(herd: HerdServer, timeout: float = 60) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key="sk-client", max_retries=0, timeout=timeout)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def ask(c: openai.AsyncOpenAI, text: str, stream: bool = False) -> str | openai.APIError:
    """The answer's text, or the OpenAI-format error the SDK parsed (anything else raises)."""
    try:
        if stream:
            parts = []
            async for chunk in await c.chat.completions.create(model="m", messages=user(text), stream=True):
                parts += [ch.delta.content or "" for ch in chunk.choices]
            return "".join(parts)
        completion = await c.chat.completions.create(model="m", messages=user(text))
        return completion.choices[0].message.content
    except openai.APIStatusError as e:
        assert isinstance(e.body, dict) and e.body.get("message"), f"not an OpenAI-format error: {e.response.text!r}"
        return e
    except openai.APIError as e:  # an error event in a stream that had started
        assert e.body is None or isinstance(e.body, dict)
        return e


def code(outcome) -> str | None:
    return (outcome.body or {}).get("code") if isinstance(outcome, openai.APIError) else None


# -- the breaker: a blip stays a blip ----------------------------------------------------


async def test_five_500s_then_a_healthy_upstream_is_answered_at_once(upstream):
    """Reproduction (issue 12): five failed calls opened the circuit for 30 s of 503s."""
    upstream.set_fault("status", status=500, times=5)
    with HerdServer(herd_settings(upstream.url)) as herd:  # retries 0: one call per request
        c = client(herd)
        failed = [await ask(c, f"fail {i}") for i in range(5)]
        assert all(isinstance(o, openai.InternalServerError) and o.status_code == 500 for o in failed)
        healthy = [await ask(c, f"fine {i}") for i in range(5)]
    assert healthy == [f"echo: fine {i}" for i in range(5)]
    assert upstream.stats()["calls"] == 10


async def test_a_burst_of_failed_calls_counts_as_one_failure(upstream):
    """Reproduction: 50 concurrent failed calls counted as 50 consecutive failures, and their
    retries met an open circuit and gave up at once (239 of 400 clients got 503)."""
    upstream.faulty.ttft_ms = 200  # the burst's calls overlap
    upstream.set_fault("status", status=503, times=50)
    settings = herd_settings(upstream.url, upstreams={"sim": {"retries": 2, "backoff_base_s": 0.1}})
    with HerdServer(settings) as herd:
        c = client(herd)
        outcomes = await asyncio.gather(*[ask(c, f"distinct {i}", stream=i % 2 == 0) for i in range(100)])
    assert outcomes == [f"echo: distinct {i}" for i in range(100)]


async def test_a_retry_that_meets_the_open_circuit_waits_for_the_probe(upstream):
    """The first failure opens the circuit (circuit_failures = 1); the flight's retry waits out
    the cool-down and is the probe, instead of failing with 503 circuit_open at once."""
    upstream.faulty.ttft_ms = 200  # the flight lasts long enough for all six to join it
    upstream.set_fault("status", status=503, times=1)
    settings = herd_settings(upstream.url, upstreams={"sim": {
        "retries": 1, "backoff_base_s": 0.01, "circuit_failures": 1, "circuit_reset_s": 0.3}})
    with HerdServer(settings) as herd:
        c = client(herd)
        answers = await asyncio.gather(*[ask(c, "once more", stream=i % 2 == 0) for i in range(6)])
    assert answers == ["echo: once more"] * 6
    assert upstream.stats()["calls"] == 2


async def test_one_second_blip_at_20_per_second_fails_only_the_blip(upstream):
    """Reproduction: at 20 req/s with HTTP 500 for one second, every request failed with 503
    circuit_open for the next 30 s. Now: what the blip itself fails, and nothing started
    more than one probe interval after it ended."""
    settings = herd_settings(upstream.url, upstreams={"sim": {"retries": 2}})  # herd's default resilience
    results: list[tuple[float, object]] = []
    with HerdServer(settings) as herd:
        c = client(herd)

        async def one(i: int) -> None:
            started = time.monotonic()
            results.append((started, await ask(c, f"steady {i}", stream=i % 2 == 0)))

        tasks = []
        t0 = time.monotonic()
        for i in range(100):  # 5 s at 20 req/s; the upstream fails from 1 s to 2 s
            if i == 20:
                upstream.set_fault("status", status=500, for_s=1.0)
                blip_end = time.monotonic() + 1.0
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(max(0.0, t0 + (i + 1) / 20 - time.monotonic()))
        await asyncio.gather(*tasks)
    late = [o for started, o in results if started > blip_end + PROBE_INTERVAL_S]
    assert late and all(isinstance(o, str) for o in late), [code(o) for o in late if not isinstance(o, str)]
    failed = [o for _, o in results if not isinstance(o, str)]
    assert len(failed) <= 40, len(failed)  # at most the blip's requests and one probe interval's


# -- malformed answers and echoed keys ---------------------------------------------------


async def burst_outcomes(herd: HerdServer, text: str, n: int, key: str = "sk-client", leader_streams=True) -> list:
    """n requests for `text` at once, alternately stream and not, the first as `leader_streams`."""
    c = openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key=key, max_retries=0, timeout=60)
    first = asyncio.create_task(ask(c, text, stream=leader_streams))
    await asyncio.sleep(0.05)  # it leads: the flight calls the upstream the way it asked
    rest = await asyncio.gather(*[ask(c, text, stream=i % 2 == 0) for i in range(n - 1)])
    return [await first, *rest]


@pytest.mark.parametrize(
    "mode, leader",
    [("string_delta", "stream"), ("string_delta", "json"), ("non_object", "stream"), ("non_object", "json"),
     ("bad_sse", "stream"), ("bad_json", "json")],
)
async def test_a_malformed_answer_is_an_openai_502_for_everyone_and_never_cached(upstream, mode, leader):
    upstream.faulty.ttft_ms = 300
    upstream.set_fault(mode, times=1)
    with HerdServer(herd_settings(upstream.url, cache={"enabled": True})) as herd:
        outcomes = await burst_outcomes(herd, f"malformed {mode}", 10, leader_streams=leader == "stream")
        assert all(isinstance(o, openai.APIError) for o in outcomes), outcomes
        assert all(o.status_code == 502 for o in outcomes if isinstance(o, openai.APIStatusError))
        assert all("malformed" in o.message for o in outcomes), [o.message for o in outcomes]
        again = await burst_outcomes(herd, f"malformed {mode}", 2)  # the upstream is fine again
    assert again == [f"echo: malformed {mode}"] * 2  # the broken answer was not cached
    assert upstream.stats()["calls"] == 2


async def test_an_upstream_error_that_echoes_a_key_is_redacted(upstream):
    upstream.set_fault("echo_key")
    provider = herd_settings(upstream.url, upstreams={"sim": {"api_key": "sk-provider-secret-123"}},
                             auth={"mode": "open"})
    with HerdServer(provider) as herd:
        (outcome,) = await burst_outcomes(herd, "who am i", 1)
    assert outcome.status_code == 500 and "sk-provider-secret-123" not in outcome.response.text
    assert "[redacted]" in outcome.message
    upstream.set_fault("echo_key")
    with HerdServer(herd_settings(upstream.url)) as herd:  # no key of its own: the client's is sent
        outcomes = await burst_outcomes(herd, "and me", 2, key="sk-client-secret-456")
    assert all("sk-client-secret-456" not in o.response.text for o in outcomes)


# -- 429 storms ---------------------------------------------------------------------------


async def test_a_429_storm_retries_once_per_flight_spread_out_not_in_one_wave(upstream):
    upstream.faulty.ttft_ms = 100
    upstream.set_fault("status", status=429, retry_after=1, times=1)
    settings = herd_settings(upstream.url, upstreams={"sim": {"retries": 2}})
    with HerdServer(settings) as herd:
        c = client(herd)
        shared = await asyncio.gather(*[ask(c, "one flight", stream=i % 2 == 0) for i in range(20)])
        assert shared == ["echo: one flight"] * 20
        assert upstream.stats()["calls"] == 2  # one flight: one 429, one retry, whatever its waiters
        upstream.reset()
        upstream.faulty.ttft_ms = 100
        upstream.set_fault("status", status=429, retry_after=1, times=30)
        distinct = await asyncio.gather(*[ask(c, f"flight {i}") for i in range(30)])
    assert distinct == [f"echo: flight {i}" for i in range(30)]
    times = upstream.stats()["times"]
    retries = sorted(times[30:])
    assert len(retries) == 30
    assert retries[-1] - retries[0] > 0.2  # jitter on top of Retry-After: not one synchronized wave


# -- the simulator's fault schedules under bursts ----------------------------------------


@pytest.fixture(scope="module")
def simulator():
    from benchmarks.simulator import ThreadedSimulator

    with ThreadedSimulator() as sim:
        yield sim


@pytest.mark.parametrize(
    "faults",
    [
        [{"kind": "status", "status": 500, "times": 8}],
        [{"kind": "status", "status": 502, "times": -1}],  # down for good: every client gets an error
        [{"kind": "reset", "times": 8}],
        [{"kind": "reset", "after_chunks": 3, "times": 4}],
        [{"kind": "stall", "after_chunks": 2, "stall_s": 30, "times": 2}],
        [{"kind": "status", "status": 429, "headers": {"retry-after": "0.2"}, "times": 12}],
        [{"kind": "reset", "times": 2}, {"kind": "status", "status": 503, "times": 2},
         {"kind": "reset", "after_chunks": 5, "times": 2}],
    ],
    ids=["500x8", "502-forever", "reset-before-x8", "reset-mid-x4", "stall-x2", "429-storm", "mixed"],
)
async def test_every_client_of_a_burst_gets_the_answer_or_an_openai_error(simulator, faults):
    from benchmarks.harness import sim_faults, sim_reset
    from benchmarks.simulator import expected_text

    sim_reset(simulator.url, ttft_ms=100, tokens_per_s=100, reply_tokens=12)
    sim_faults(simulator.url, *faults)
    settings = herd_settings(
        simulator.url,
        upstreams={"sim": {"retries": 2, "backoff_base_s": 0.05, "idle_timeout_s": 1, "first_byte_timeout_s": 3}},
        server={"request_timeout_s": 10},
    )
    with HerdServer(settings) as herd:
        c = client(herd, timeout=30)
        texts = [f"burst {i % 10}" for i in range(40)]
        outcomes = await asyncio.gather(*[ask(c, t, stream=i % 3 == 0) for i, t in enumerate(texts)])
        assert herd.flights == 0  # nothing left running
    reply = {"reply_tokens": 12}
    for text, outcome in zip(texts, outcomes):
        if isinstance(outcome, str):  # the whole answer, never another prompt's or a mix
            assert outcome == expected_text({"messages": user(text)}, reply)
        else:
            assert isinstance(outcome, openai.APIError) and outcome.message
    if faults[0].get("times") == -1:
        assert not any(isinstance(o, str) for o in outcomes)
        assert {code(o) for o in outcomes} <= {None, "circuit_open"}


# -- what counts as a malformed chunk ------------------------------------------------------

GOOD = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]}


@pytest.mark.parametrize(
    "data, ok",
    [
        (GOOD, True),
        ({"choices": [], "usage": {"total_tokens": 3}}, True),
        ({"choices": [{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "function": {"name": "f", "arguments": ""}}]}, "finish_reason": None}]}, True),
        ({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]}, True),
        ([GOOD], False),
        (5, False),
        ({"choices": {"0": {}}}, False),
        ({"choices": ["text"]}, False),
        ({"choices": [{"index": "0", "delta": {}}]}, False),
        ({"choices": [{"index": 0, "delta": "oops"}]}, False),
        ({"choices": [{"index": 0, "delta": {"content": 5}}]}, False),
        ({"choices": [{"index": 0, "delta": {"role": ["assistant"]}}]}, False),
        ({"choices": [{"index": 0, "delta": {"tool_calls": {"function": {}}}}]}, False),
        ({"choices": [{"index": 0, "delta": {"tool_calls": [{"function": "f"}]}}]}, False),
        ({"choices": [{"index": 0, "delta": {"function_call": "f"}}]}, False),
        ({"choices": [{"index": 0, "delta": {}, "finish_reason": 1}]}, False),
        ({"choices": [], "usage": 7}, False),
        ({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "1"}]}}]}, False),
        ({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 10**12}]}}]}, False),  # would fill memory
        ({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": -1}]}}]}, False),
        ({"choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"name": 5}}]}}]}, False),
        ({"choices": [{"index": 0, "delta": {"tool_calls": [{"id": ["x"]}]}}]}, False),
        ({"choices": [{"index": 0, "delta": {"function_call": {"arguments": {}}}}]}, False),
        ({"choices": [{"index": 0, "delta": {}, "logprobs": {"content": 5}}]}, False),
        ({"choices": [{"index": 0, "delta": {}, "logprobs": {"content": [{"token": "a"}]}}]}, True),
    ],
)
def test_malformed_chunks_are_told_apart(data, ok):
    assert (malformed(data) is None) is ok
    if ok:
        assemble([Chunk(data)])  # what passes can be assembled


# -- any JSON an upstream sends: chunks that assemble, or an upstream error -----------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)
_delta = st.dictionaries(
    st.sampled_from(["role", "content", "refusal", "tool_calls", "function_call"]),
    _json | st.lists(st.dictionaries(st.sampled_from(["index", "id", "type", "function"]),
                                     _json | st.integers(-3, 2**40)
                                     | st.dictionaries(st.sampled_from(["name", "arguments"]), _json)),
                     max_size=2),
)
_chunkish = st.fixed_dictionaries(
    {"choices": st.lists(st.fixed_dictionaries({}, optional={"index": _json, "delta": _json | _delta,
                                                             "finish_reason": _json, "logprobs": _json}),
                         max_size=2) | _json},
    optional={"usage": _json, "id": _json, "error": _json},
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_json | _chunkish, min_size=1, max_size=4), _json | _delta)
def test_any_json_an_upstream_streams_is_chunks_that_assemble_or_an_upstream_error(values, message):
    from proxy.apis.chat import CHAT_WIRE
    from proxy.errors import HerdError
    from proxy.sse import Event

    try:
        chunks, _, _ = CHAT_WIRE.events([Event(orjson.dumps(v)) for v in values], "u")
    except HerdError as e:
        assert e.status == 502
    else:
        assemble(chunks)
    try:
        chunks = CHAT_WIRE.whole(orjson.dumps({"choices": [{"index": 0, "message": message}]}), "u")
    except HerdError as e:
        assert e.status == 502
    else:
        assemble(chunks)


@pytest.mark.parametrize("message", [{"tool_calls": ["x"]}, {"tool_calls": "x"}, {"tool_calls": [{"function": 5}]}])
def test_a_non_stream_answer_with_broken_tool_calls_is_an_upstream_error(message):
    from proxy.apis.chat import CHAT_WIRE
    from proxy.errors import UpstreamUnavailable

    with pytest.raises(UpstreamUnavailable) as info:
        CHAT_WIRE.whole(orjson.dumps({"choices": [{"index": 0, "message": message}]}), "u")
    assert info.value.status == 502
