"""Semantic coalescing end to end: paraphrases share a flight, near-misses never do."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from benchmarks.harness import Stack
from tests.harness import HerdServer, chat_calls, herd_settings, sim_reset, start_herd


@pytest.fixture(scope="module")
def semantic_herd(sim):
    settings = herd_settings(sim.url, coalesce={"mode": "semantic"}, server={"request_timeout_s": 30})
    with HerdServer(settings) as h:
        yield h


def client(herd) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key="sk-sem", max_retries=0, timeout=60)


async def pair(herd, first: list[dict], second: list[dict], **kw):
    """Send `first`, then `second` while the first is in flight; return both raw responses."""
    c = client(herd)
    a = asyncio.create_task(c.chat.completions.with_raw_response.create(model="m", messages=first, **kw))
    await asyncio.sleep(0.3)
    b = await c.chat.completions.with_raw_response.create(model="m", messages=second, **kw)
    return await a, b


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


PARAPHRASES = [
    ("How do I reset my password?", "how can I reset my password"),
    ("How can I change my email address?", "Hi, how do I change my email address, please?"),
    ("Can I get a refund for my order?", "Could I get a refund for my order, please?"),
    ("How do I cancel my subscription?", "How can I cancel my subscription?"),
]


@pytest.mark.parametrize("a, b", PARAPHRASES)
async def test_paraphrases_share_one_upstream_call(semantic_herd, sim, a, b):
    sim_reset(sim.url, ttft_ms=1500)
    first, second = await pair(semantic_herd, user(a), user(b))
    assert chat_calls(sim.url) == 1
    assert second.headers["x-herd"] == "follower"
    assert float(second.headers["x-herd-similarity"]) > 0.5
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content


async def test_normalized_equal_prompts_merge_without_an_embedding(semantic_herd, sim):
    sim_reset(sim.url, ttft_ms=1500)
    batcher = semantic_herd.gateway.matcher.embedder
    await pair(semantic_herd, user("Warm-up text that gets embedded"), user("Warm-up text that gets embedded"))

    def embed_calls() -> int:
        stats = semantic_herd.call(batcher.stats)
        return stats["items"] + stats["cache_hits"] + stats["joined"]

    before = embed_calls()
    sim_reset(sim.url, ttft_ms=1500)
    c = client(semantic_herd)
    first = asyncio.create_task(c.chat.completions.create(model="m", messages=user("  What TIME is it in Tokyo?? ")))
    await asyncio.sleep(0.3)
    raw = await c.chat.completions.with_raw_response.create(model="m", messages=user("what time is it in tokyo"))
    await first
    assert raw.headers["x-herd"] == "follower" and chat_calls(sim.url) == 1
    # the leader needed its embedding; the normalized-equal follower did not ask for one
    assert embed_calls() - before == 1


def test_embedding_runs_are_measured(semantic_herd, sim):
    text = httpx.get(semantic_herd.url + "/metrics").text
    count = re.search(r"^herd_embedding_batch_size_count (\S+)$", text, re.MULTILINE)
    assert count and float(count.group(1)) > 0
    assert re.search(r"^herd_embedding_seconds_bucket", text, re.MULTILINE)


NEAR_MISSES = {
    "dates": ("What's the weather in Paris today?", "What's the weather in Paris tomorrow?"),
    "numbers": ("List the top 5 programming languages", "List the top 10 programming languages"),
    "negation": ("Cancel my subscription", "Don't cancel my subscription"),
    "polarity": ("Is the pharmacy open on Sundays?", "Is the pharmacy closed on Sundays?"),
    "entities": ("What is the population of Germany?", "What is the population of Austria?"),
    "format": ("Give me the list of planets as JSON", "Give me the list of planets as a table"),
    "language": ("Translate 'good morning' into French", "Translate 'good morning' into Spanish"),
    "identifiers": ("What is the status of order A-1234?", "What is the status of order A-1243?"),
    "roles": ("How do I gain fat and lose muscle?", "How do I lose fat and gain muscle?"),
    "script": ("启用通知", "禁用通知"),
    "long": ("I manage a bakery with two shops and a van. " * 12 + "Should I keep the van?",
             "I manage a bakery with two shops and a van. " * 12 + "Should I sell the van?"),
}


@pytest.mark.parametrize("kind", sorted(NEAR_MISSES))
async def test_near_misses_of_each_class_make_two_calls(semantic_herd, sim, kind):
    sim_reset(sim.url, ttft_ms=1000)
    a, b = NEAR_MISSES[kind]
    first, second = await pair(semantic_herd, user(a), user(b))
    assert chat_calls(sim.url) == 2, kind
    assert first.headers["x-herd"] == second.headers["x-herd"] == "leader"


async def test_same_final_message_after_a_different_system_prompt_makes_two_calls(semantic_herd, sim):
    sim_reset(sim.url, ttft_ms=1000)
    q = user("How do I reset my password?")
    await pair(semantic_herd, [{"role": "system", "content": "You support Acme Bank."}] + q,
               [{"role": "system", "content": "You support Globex Telecom."}] + q)
    assert chat_calls(sim.url) == 2


async def test_same_final_message_after_different_history_makes_two_calls(semantic_herd, sim):
    sim_reset(sim.url, ttft_ms=1000)
    h1 = [{"role": "user", "content": "I have a Flixora plan."}, {"role": "assistant", "content": "OK."}]
    h2 = [{"role": "user", "content": "I have a PulseFit membership."}, {"role": "assistant", "content": "OK."}]
    await pair(semantic_herd, h1 + user("cancel it"), h2 + user("Cancel it."))
    assert chat_calls(sim.url) == 2


async def test_long_prompts_differing_only_at_the_end_make_two_calls(semantic_herd, sim):
    sim_reset(sim.url, ttft_ms=1000)
    body = " ".join(f"paragraph {i} says the same long thing about the report." for i in range(80))
    await pair(semantic_herd, user(body + " Summarise it in English."), user(body + " Summarise it in English!"))
    assert chat_calls(sim.url) == 2


async def test_other_parameters_still_split_semantic_flights(semantic_herd, sim):
    sim_reset(sim.url, ttft_ms=1000)
    await pair(semantic_herd, user("How do I reset my password?"), user("how can I reset my password"))
    assert chat_calls(sim.url) == 1
    sim_reset(sim.url, ttft_ms=1000)
    c = client(semantic_herd)
    await asyncio.gather(
        c.chat.completions.create(model="m", messages=user("How do I reset my password?"), temperature=0),
        c.chat.completions.create(model="m", messages=user("how can I reset my password"), temperature=1),
    )
    assert chat_calls(sim.url) == 2


LOAD_SCRIPT = """
import asyncio, sys, aiohttp
url, n = sys.argv[1], int(sys.argv[2])
async def main():
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as http:
        async def one(i):
            text = f"Unique question number {i} about topic {i * 7919 % 1000} and item {i}"
            async with http.post(url, json={"model": "m", "messages": [{"role": "user", "content": text}]}) as r:
                await r.read()
                return r.status
        statuses = await asyncio.gather(*[one(i) for i in range(n)])
    print(sum(s == 200 for s in statuses))
asyncio.run(main())
"""


def test_event_loop_answers_health_checks_while_the_embedder_is_saturated(tmp_path):
    """herd, the simulator and the load each run in a process of their own. Behaviour only:
    the health checks are answered while 600 semantic requests are being embedded, and
    every request succeeds; how fast the loop answers meanwhile is measured by
    `python -m benchmarks.semantic_throughput`, not asserted on shared cores."""
    with Stack() as stack:
        sim = stack.simulator(ttft_ms=50)
        proc, url = start_herd(tmp_path, sim.url, extra='[coalesce]\nmode = "semantic"\n')
        try:
            with httpx.Client(timeout=30) as http:
                load = subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, url + "/v1/chat/completions", "600"],
                                        stdout=subprocess.PIPE, text=True)
                time.sleep(0.5)  # the requests have arrived and the embedder is busy by now
                statuses = []
                for _ in range(15):
                    statuses.append(http.get(url + "/healthz").status_code)
                    time.sleep(0.05)
                out, _ = load.communicate(timeout=120)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert statuses == [200] * 15
    assert out.strip() == "600", "every request of the load must succeed"


def test_semantic_mode_shortens_the_gil_switch_interval_and_exact_mode_does_not():
    # Embedding workers hand each vector back through the GIL; at CPython's default 5 ms a
    # busy event loop kept them waiting with their cores idle (benchmarks/SEMANTIC.md).
    code = (
        "import asyncio, sys\n"
        "from tests.harness import herd_settings\n"
        "from proxy.gateway import Gateway, EMBED_SWITCH_INTERVAL_S\n"
        "async def interval(mode):\n"
        "    g = Gateway(herd_settings('http://127.0.0.1:9', coalesce={'mode': mode}))\n"
        "    await g.start()\n"
        "    await g.aclose()\n"
        "    return sys.getswitchinterval()\n"
        "before = sys.getswitchinterval()\n"
        "print(before, asyncio.run(interval('exact')), asyncio.run(interval('semantic')), EMBED_SWITCH_INTERVAL_S)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, exact, semantic, wanted = map(float, out.stdout.split())
    assert exact == before == 0.005
    assert semantic == pytest.approx(wanted, rel=0.01) and wanted <= 0.0002
