"""Legacy POST /v1/completions through herd, on the chat machinery: the openai SDK -> herd -> the simulator."""

from __future__ import annotations

import asyncio

import openai
import pytest

from benchmarks.simulator import ThreadedSimulator
from tests.harness import HerdServer, herd_settings, sim_reset, sim_stats

PATH = "/v1/completions"


def calls(sim_url: str) -> int:
    return int(sim_stats(sim_url, log=False)["by_path"].get(PATH, 0))


@pytest.fixture(scope="module")
def sim():
    with ThreadedSimulator() as s:
        yield s


@pytest.fixture(scope="module")
def herd(sim):
    with HerdServer(herd_settings(sim.url, server={"request_timeout_s": 20})) as h:
        yield h


def client(herd, key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key=key, max_retries=0, timeout=30)


async def text_of_stream(stream) -> tuple[str, list]:
    chunks = [c async for c in stream]
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


async def test_identical_completions_half_streamed_make_one_call(herd, sim):
    sim_reset(sim.url, ttft_ms=300, tokens_per_s=100, reply_tokens=8)
    c = client(herd)
    ask = {"model": "gpt-4o-mini", "prompt": "complete this line", "max_tokens": 20}

    async def streamed(usage: bool):
        extra = {"stream_options": {"include_usage": True}} if usage else {}
        return await text_of_stream(await c.completions.create(**ask, stream=True, **extra))

    results = await asyncio.gather(*[c.completions.create(**ask) if i % 2 == 0 else streamed(i % 4 == 1)
                                     for i in range(20)])
    assert calls(sim.url) == 1
    whole = [r for r in results if not isinstance(r, tuple)]
    text = whole[0].choices[0].text
    assert text.startswith("echo: complete this line") and whole[0].usage.completion_tokens == 8
    assert {w.choices[0].text for w in whole} == {text} and {w.choices[0].finish_reason for w in whole} == {"stop"}
    for i, r in enumerate(results):
        if isinstance(r, tuple):
            assert r[0] == text
            # the usage chunk goes only to the clients that asked for it
            assert (r[1][-1].usage is not None) == (i % 4 == 1)


async def test_completions_never_share_across_tenants_models_prompts_or_fields(herd, sim):
    sim_reset(sim.url, ttft_ms=400)
    cases = [
        ("sk-a", {"model": "gpt-4o-mini", "prompt": "p"}),
        ("sk-b", {"model": "gpt-4o-mini", "prompt": "p"}),
        ("sk-a", {"model": "gpt-4o", "prompt": "p"}),
        ("sk-a", {"model": "gpt-4o-mini", "prompt": ["p"]}),
        ("sk-a", {"model": "gpt-4o-mini", "prompt": "p", "max_tokens": 3}),
        ("sk-a", {"model": "gpt-4o-mini", "prompt": "p", "suffix": "!"}),
        ("sk-a", {"model": "gpt-4o-mini", "prompt": "p", "echo": True}),
    ]
    answers = await asyncio.gather(*[client(herd, key).completions.create(**args) for key, args in cases
                                     for _ in range(2)])
    assert calls(sim.url) == len(cases)
    ids = [a.id for a in answers]
    assert all(ids[2 * i] == ids[2 * i + 1] for i in range(len(cases))) and len(set(ids)) == len(cases)


async def test_bad_completion_requests_are_openai_400s(herd, sim):
    c = client(herd)
    for args, param in [({"model": "m", "prompt": None}, "prompt"), ({"model": "m", "prompt": {"a": 1}}, "prompt"),
                        ({"model": "m", "prompt": "x", "logprobs": 9}, "logprobs")]:
        with pytest.raises(openai.BadRequestError) as info:
            await c.completions.create(**args)
        assert info.value.body["param"] == param
    assert calls(sim.url) == 0
