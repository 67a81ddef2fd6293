"""Fault schedules under bursts, over real sockets: herd in a thread, a misbehaving upstream
(benchmarks/faulty.py) or herd's simulator, and the official SDK as the client.

Every client must end with the answer or an OpenAI-format error: no hang, no mixed stream,
no plain-text 500. A blip upstream stays a blip (design invariant 11).
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from benchmarks.faulty import FaultyUpstream
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
