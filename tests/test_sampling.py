"""Sampled requests ([coalesce] sampled = share | distinct): the official openai SDK -> herd ->
the upstream simulator, counting the simulator's calls."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import openai
import pytest

from proxy.config import ConfigError
from proxy.sampling import is_sampled, policy
from tests.harness import HerdServer, chat_calls, herd_settings, sim_reset
from tests.redis_servers import RedisServer, herd_keys

SHARED = "x-herd-shared-sample"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def aclient(herd, key: str = "sk-sampling") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key=key, max_retries=0, timeout=30)


async def burst(herd, text: str, n: int = 5, key: str = "sk-sampling", model: str = "m", headers=None, **kw):
    """`n` concurrent identical requests (the last one streams); their raw responses."""
    c = aclient(herd, key)

    async def one(stream: bool):
        call = c.chat.completions.with_raw_response.create(
            model=model, messages=user(text), stream=stream, extra_headers=headers or {}, **kw
        )
        raw = await call
        if stream:
            async for _ in raw.parse():  # read the whole stream
                pass
        return raw

    return await asyncio.gather(*[one(stream=i == n - 1) for i in range(n)])


async def ask(herd, text: str, key: str = "sk-sampling", headers=None, **kw):
    return await aclient(herd, key).chat.completions.with_raw_response.create(
        model="m", messages=user(text), extra_headers=headers or {}, **kw
    )


def sampled_herd(sim, **sections) -> HerdServer:
    sections.setdefault("cache", {"enabled": True, "ttl_seconds": 300})
    return HerdServer(herd_settings(sim.url, **sections))


# -- which requests are sampled ---------------------------------------------------------


@pytest.mark.parametrize(
    "body, sampled",
    [
        ({}, True),  # OpenAI's default temperature is 1
        ({"temperature": 1}, True),
        ({"temperature": 0.2}, True),
        ({"temperature": None}, True),  # null means the default
        ({"temperature": 0}, False),
        ({"temperature": 0.0}, False),
        ({"temperature": 1, "seed": 7}, False),
        ({"seed": 0}, False),
        ({"temperature": 1, "seed": None}, True),
        ({"temperature": 0, "n": 3}, False),  # n greedy choices are one answer n times
        ({"temperature": 0.7, "n": 3}, True),
        ({"n": 3}, True),
        ({"temperature": 1, "top_p": 0}, False),  # only the most likely token: greedy
        ({"temperature": 1, "top_p": 0.9}, True),
        ({"temperature": 1, "top_k": 1}, False),  # vLLM's and Anthropic's greedy
        ({"temperature": 1, "top_k": 40}, True),
    ],
)
def test_what_counts_as_sampled(body, sampled):
    assert is_sampled(body) is sampled


def test_other_apis_give_their_own_default_temperature():
    assert is_sampled({}, default_temperature=0.0) is False  # e.g. embeddings: always deterministic
    assert is_sampled({"temperature": 0.5}, default_temperature=0.0) is True


def test_the_most_specific_policy_wins():
    assert policy("distinct", "share", "share", "share") == "distinct"  # the request's header
    assert policy("", "distinct", "share", "share") == "distinct"  # then the tenant's key
    assert policy("", "", "distinct", "share") == "distinct"  # then the route
    assert policy("", "", "", "distinct") == "distinct"  # then [coalesce] sampled
    assert policy(None, "", "", "share") == "share"


# -- distinct ---------------------------------------------------------------------------


async def test_distinct_never_merges_nor_caches_sampled_requests(sim):
    sim_reset(sim.url, ttft_ms=800)
    with sampled_herd(sim, coalesce={"sampled": "distinct"}) as herd:
        sampled = await burst(herd, "five variations please", temperature=1)
        assert chat_calls(sim.url) == 5
        assert {r.headers["x-herd"] for r in sampled} == {"bypass"}
        assert all(SHARED not in r.headers for r in sampled)
        again = await ask(herd, "five variations please", temperature=1)
        assert again.headers["x-herd"] == "bypass" and chat_calls(sim.url) == 6  # not from the cache
        assert herd.call(lambda: len(herd.gateway.cache)) == 0  # nor stored

        greedy = await burst(herd, "five variations please", temperature=0)
        assert chat_calls(sim.url) == 7
        assert sorted(r.headers["x-herd"] for r in greedy) == ["follower"] * 4 + ["leader"]
        assert (await ask(herd, "five variations please", temperature=0)).headers["x-herd"] == "cache"
        assert chat_calls(sim.url) == 7


async def test_a_seed_makes_a_sampled_request_deterministic(sim):
    sim_reset(sim.url, ttft_ms=800)
    with sampled_herd(sim, coalesce={"sampled": "distinct"}) as herd:
        results = await burst(herd, "seeded", temperature=1, seed=42)
        assert chat_calls(sim.url) == 1
        assert sorted(r.headers["x-herd"] for r in results) == ["follower"] * 4 + ["leader"]
        assert all(SHARED not in r.headers for r in results)  # not a sampled answer


# -- share ------------------------------------------------------------------------------


async def test_share_makes_one_call_and_marks_every_shared_sample(sim):
    sim_reset(sim.url, ttft_ms=800)
    with sampled_herd(sim) as herd:  # share is the default
        results = await burst(herd, "shared sample")  # no temperature: OpenAI's default of 1
        assert chat_calls(sim.url) == 1
        leader = [r for r in results if r.headers["x-herd"] == "leader"]
        followers = [r for r in results if r.headers["x-herd"] == "follower"]
        assert len(leader) == 1 and len(followers) == 4
        assert all(r.headers[SHARED] == "1" for r in followers)
        assert SHARED not in leader[0].headers  # the leader's answer is its own fresh sample
        cached = await ask(herd, "shared sample")
        assert cached.headers["x-herd"] == "cache" and cached.headers[SHARED] == "1"
        assert chat_calls(sim.url) == 1

        greedy = await burst(herd, "shared greedy", temperature=0)
        greedy.append(await ask(herd, "shared greedy", temperature=0))
        assert chat_calls(sim.url) == 2
        assert all(SHARED not in r.headers for r in greedy)  # deterministic: nothing to mark


async def test_shared_samples_are_counted_in_metrics(sim):
    sim_reset(sim.url, ttft_ms=800)
    with sampled_herd(sim) as herd:
        await burst(herd, "counted sample", temperature=0.9)
        await ask(herd, "counted sample", temperature=0.9)
        await burst(herd, "counted greedy", temperature=0)
        async with httpx.AsyncClient() as http:
            text = (await http.get(herd.url + "/metrics")).text
    assert 'herd_shared_samples_total{outcome="follower"} 4.0' in text
    assert 'herd_shared_samples_total{outcome="cache"} 1.0' in text


async def test_sampled_answers_keep_their_own_shorter_ttl(sim):
    cache = {"enabled": True, "ttl_seconds": 300, "sampled_ttl_seconds": 7}
    with sampled_herd(sim, cache=cache) as herd:
        await ask(herd, "ttl sampled", temperature=1)
        await ask(herd, "ttl greedy", temperature=0)

        def lifetimes():
            cache = herd.gateway.cache
            now = cache._clock()
            return sorted(expires - now for expires, _ in cache._entries.values())

        await asyncio.sleep(0.2)  # the store runs after the answer
        short, long = herd.call(lifetimes)
        assert 0 < short <= 7 and 200 < long <= 300


async def test_sampled_ttl_zero_never_caches_samples(sim):
    with sampled_herd(sim, cache={"enabled": True, "ttl_seconds": 300, "sampled_ttl_seconds": 0}) as herd:
        await ask(herd, "never kept", temperature=1)
        await asyncio.sleep(0.2)
        assert (await ask(herd, "never kept", temperature=1)).headers["x-herd"] == "leader"
        assert chat_calls(sim.url) == 2


# -- where the policy is set ------------------------------------------------------------


async def test_the_request_header_beats_the_config(sim):
    sim_reset(sim.url, ttft_ms=800)
    with sampled_herd(sim, coalesce={"sampled": "distinct"}) as herd:
        await burst(herd, "override to share", headers={"x-herd-sampled": "share"})
        assert chat_calls(sim.url) == 1
    sim_reset(sim.url, ttft_ms=800)
    with sampled_herd(sim, coalesce={"sampled": "share"}) as herd:
        results = await burst(herd, "override to distinct", headers={"x-herd-sampled": "Distinct"})
        assert chat_calls(sim.url) == 5 and all(SHARED not in r.headers for r in results)


def test_a_bad_sampled_header_is_an_openai_400(sim):
    with sampled_herd(sim) as herd:
        for bad in ("sometimes", "share,distinct", "0"):
            r = httpx.post(herd.url + "/v1/chat/completions", json={"model": "m", "messages": user("x")},
                           headers={"x-herd-sampled": bad})
            assert r.status_code == 400, bad
            assert r.json()["error"]["param"] == "x-herd-sampled"
            assert r.json()["error"]["type"] == "invalid_request_error"
        assert chat_calls(sim.url) == 0
        # an empty value is no value, as with x-herd-coalesce: the configured policy applies
        r = httpx.post(herd.url + "/v1/chat/completions", json={"model": "m", "messages": user("x")},
                       headers={"x-herd-sampled": ""})
        assert r.status_code == 200 and chat_calls(sim.url) == 1


async def test_a_route_can_ask_for_distinct_samples(sim):
    sim_reset(sim.url, ttft_ms=800)
    routes = [{"model": "eval-*", "upstream": "sim", "sampled": "distinct"}, {"model": "*", "upstream": "sim"}]
    with sampled_herd(sim, routes=routes) as herd:
        await burst(herd, "routed", model="eval-model")
        assert chat_calls(sim.url) == 5
        await burst(herd, "routed", model="chat-model")
        assert chat_calls(sim.url) == 6


async def test_a_tenant_can_ask_for_distinct_samples(sim):
    sim_reset(sim.url, ttft_ms=800)
    keys = [
        {"sha256": sha("sk-evals-1"), "tenant": "evals", "sampled": "distinct"},
        {"sha256": sha("sk-evals-2"), "tenant": "evals", "sampled": "distinct"},
        {"sha256": sha("sk-app"), "tenant": "app"},
    ]
    # the route says share; the tenant's own setting is more specific
    routes = [{"model": "*", "upstream": "sim", "sampled": "share"}]
    with sampled_herd(sim, auth={"mode": "keys", "keys": keys}, routes=routes) as herd:
        await burst(herd, "per tenant", key="sk-evals-1")
        assert chat_calls(sim.url) == 5
        await burst(herd, "per tenant", key="sk-app")
        assert chat_calls(sim.url) == 6
        # both keys of the tenant get distinct samples, and share deterministic answers
        await asyncio.gather(burst(herd, "per tenant greedy", key="sk-evals-1", n=2, temperature=0),
                             burst(herd, "per tenant greedy", key="sk-evals-2", n=2, temperature=0))
        assert chat_calls(sim.url) == 7


@pytest.mark.parametrize(
    "sections, where",
    [
        ({"coalesce": {"sampled": "sometimes"}}, "coalesce.sampled"),
        ({"routes": [{"model": "*", "upstream": "sim", "sampled": "never"}]}, "routes[0].sampled"),
        ({"auth": {"mode": "keys", "keys": [{"sha256": "a" * 64, "sampled": "x"}]}}, "auth.keys[0].sampled"),
        ({"auth": {"mode": "keys", "keys": [{"sha256": "a" * 64, "tenant": "t", "sampled": "share"},
                                            {"sha256": "b" * 64, "tenant": "t", "sampled": "distinct"}]}},
         "tenant 't'"),
        ({"cache": {"sampled_ttl_seconds": -1}}, "cache.sampled_ttl_seconds"),
    ],
)
def test_bad_sampled_settings_stop_herd_at_start(sections, where):
    with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
        herd_settings("http://127.0.0.1:9", **sections)


def test_the_grafana_dashboard_shows_shared_samples():
    import json
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[1] / "config" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert any("herd_shared_samples_total" in e for e in exprs)


# -- across replicas (Redis) -------------------------------------------------------------


@pytest.mark.parametrize("policy_, calls", [("share", 1), ("distinct", 6)])
async def test_the_policy_holds_across_replicas(sim, policy_, calls):
    """Two replicas sharing flights and the cache through Redis: a follower on the other
    replica only learns it follows after the claim, and still marks its shared sample."""
    sim_reset(sim.url, ttft_ms=1000)
    with RedisServer() as redis:
        def settings():
            return herd_settings(sim.url, auth={"hash_key": "sampling-replicas"},
                                 cache={"enabled": True, "ttl_seconds": 300, "sampled_ttl_seconds": 5},
                                 coalesce={"sampled": policy_}, redis={"url": redis.url, "timeout_s": 0.5})
        with HerdServer(settings()) as a, HerdServer(settings()) as b:
            first = asyncio.ensure_future(burst(a, "across replicas", n=3))
            await asyncio.sleep(0.3)  # a's flight is claimed in Redis before b's requests arrive
            second = await burst(b, "across replicas", n=3)
            results = await first + second
            assert chat_calls(sim.url) == calls
            if policy_ == "share":  # b's requests followed a's flight, not the cache
                assert [r.headers["x-herd"] for r in second] == ["follower"] * 3
            shared = [r for r in results if r.headers["x-herd"] in ("follower", "cache")]
            assert all(r.headers[SHARED] == "1" for r in shared)
            if policy_ == "share":
                assert len(shared) == 5
                await asyncio.sleep(0.3)  # the store runs after the answer
                answers = [v for k, v in herd_keys(redis).items() if k.endswith(":answer")]
                assert len(answers) == 1 and 0 < answers[0]["pttl"] <= 5000
            else:
                assert not shared and not [k for k in herd_keys(redis) if k.endswith(":answer")]
