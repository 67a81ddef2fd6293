"""Retries, fallbacks, circuit breaking and rate limits around a flight's one upstream call."""

from __future__ import annotations

import asyncio

import openai
import pytest

from benchmarks.simulator import expected_text
from proxy.config import UpstreamConfig, parse_settings
from proxy.errors import (
    InvalidRequest,
    Overloaded,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.resilience import (
    CircuitBreaker,
    CircuitOpen,
    RateLimited,
    RateLimiter,
    RetryPolicy,
    TokenBucket,
    retry_after,
)
from tests.harness import HerdServer, sim_faults, sim_reset, sim_stats

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- units -------------------------------------------------------------------------------


def test_retry_policy_backs_off_exponentially_with_full_jitter():
    policy = RetryPolicy(retries=3, base_s=0.5, max_s=3.0, uniform=lambda a, b: b)
    error = UpstreamError(503)
    assert [policy.delay(k, error) for k in range(4)] == [
        0.5,
        1.0,
        2.0,
        None,
    ]  # capped tries
    policy.uniform = lambda a, b: a
    assert policy.delay(0, error) == 0.0  # full jitter: anywhere from zero
    import random

    policy = RetryPolicy(retries=10, base_s=0.5, max_s=3.0, uniform=random.Random(7).uniform)
    delays = [policy.delay(k, error) for k in range(8)]
    assert all(0 <= d <= min(3.0, 0.5 * 2**k) for k, d in enumerate(delays))
    assert len(set(delays)) == len(delays)


@pytest.mark.parametrize(
    "error, retryable",
    [
        (UpstreamUnavailable("connect"), True),
        (UpstreamTimeout("slow"), True),
        (UpstreamError(408), True),
        (UpstreamError(409), True),
        (UpstreamError(429), True),
        (UpstreamError(500), True),
        (UpstreamError(529), True),
        (UpstreamError(400), False),
        (UpstreamError(401), False),
        (UpstreamError(404), False),
        (InvalidRequest("no"), False),
        (Overloaded("full"), False),
    ],
)
def test_only_retryable_failures_are_retried(error, retryable):
    policy = RetryPolicy(retries=2, base_s=0.1, max_s=1.0)
    assert (policy.delay(0, error) is not None) is retryable


def test_retry_after_is_waited_with_jitter_on_top_and_capped():
    policy = RetryPolicy(retries=2, base_s=0.1, max_s=8.0, uniform=lambda a, b: b)  # the jitter's longest
    assert policy.delay(0, UpstreamError(429, headers={"retry-after": "2"})) == 3.0  # + up to half the hint
    assert policy.delay(0, UpstreamError(429, headers={"retry-after-ms": "1500"})) == 2.25
    assert policy.delay(0, UpstreamError(429, headers={"retry-after": "7.5"})) == 8.0  # never past max_s
    assert policy.delay(0, UpstreamError(503, headers={"retry-after": "0"})) == 0.1
    assert policy.delay(0, UpstreamError(429, headers={"retry-after": "30"})) is None  # fall back instead
    policy.uniform = lambda a, b: a
    assert policy.delay(0, UpstreamError(429, headers={"retry-after": "2"})) == 2.0  # the hint is a floor
    import random

    policy.uniform = random.Random(3).uniform
    waits = [policy.delay(0, UpstreamError(429, headers={"retry-after": "2"})) for _ in range(100)]
    assert all(2.0 <= w <= 3.0 for w in waits) and max(waits) - min(waits) > 0.5  # spread, not one wave
    assert retry_after(UpstreamError(429, headers={"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert retry_after(UpstreamError(429, headers={"retry-after": "soon"})) is None


def test_circuit_opens_after_repeated_failures_and_half_opens_later():
    clock = FakeClock()
    breaker = CircuitBreaker(failures=3, reset_s=10, reset_max_s=25, clock=clock)
    for _ in range(2):
        breaker.record(UpstreamError(502), breaker.admit("u"))
    breaker.record(UpstreamError(400), breaker.admit("u"))  # the upstream answered: the count starts over
    for _ in range(3):
        breaker.record(UpstreamUnavailable("down"), breaker.admit("u"))
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen) as info:
        breaker.admit("u")
    assert info.value.status == 503 and info.value.headers["retry-after"] == "10" and info.value.wait == 10

    clock.now += 10
    assert breaker.state == "half_open"
    probe = breaker.admit("u")  # the one probe call
    with pytest.raises(CircuitOpen) as info:
        breaker.admit("u")  # others wait for its verdict
    assert info.value.wait is None and info.value.headers["retry-after"] == "1"
    breaker.record(UpstreamTimeout("slow"), probe)
    assert breaker.state == "open"  # the probe failed: open again, for twice as long
    clock.now += 19
    assert breaker.state == "open"
    clock.now += 1
    breaker.release(breaker.admit("u"))  # cancelled probe: no verdict, the next call may probe
    probe = breaker.admit("u")
    breaker.record(UpstreamUnavailable("still down"), probe)
    assert breaker.retry_after() == 25  # doubled again, up to reset_max_s
    clock.now += 25
    probe = breaker.admit("u")
    breaker.record(UpstreamError(429), probe)  # throttled is not broken: no verdict
    probe = breaker.admit("u")
    breaker.success(probe)
    assert breaker.state == "closed"
    for _ in range(2):
        breaker.failure(breaker.admit("u"))
    breaker.failure(breaker.admit("u"))
    assert breaker.retry_after() == 10  # a success starts the next opening from reset_s again


def test_concurrent_failures_are_one_failed_round():
    """Calls that ran together and failed together count once: a burst into a blip is one failure."""
    clock = FakeClock()
    breaker = CircuitBreaker(failures=3, reset_s=1, clock=clock)
    burst = [breaker.admit("u") for _ in range(50)]
    for ticket in burst:
        breaker.failure(ticket)
    assert breaker.failed == 1 and breaker.state == "closed"
    retries = [breaker.admit("u") for _ in range(50)]  # they started after the first failure: a new round
    for ticket in retries:
        breaker.failure(ticket)
    assert breaker.failed == 2 and breaker.state == "closed"
    late = breaker.admit("u")
    breaker.failure(breaker.admit("u"))
    assert breaker.state == "open"
    breaker.failure(late)  # started before the failure that opened it: that round is over
    clock.now += 1
    assert breaker.state == "half_open" and breaker.retry_after() == 0


async def test_enter_waits_out_a_short_cool_down_and_one_probe_decides_for_all():
    breaker = CircuitBreaker(failures=1, reset_s=0.2)
    breaker.failure(breaker.admit("u"))
    with pytest.raises(CircuitOpen):
        await breaker.enter("u", max_wait=0.01)  # too long to wait: 503 at once
    tickets = asyncio.gather(*[breaker.enter("u", max_wait=30) for _ in range(20)])
    while breaker.probe is None:  # the cool-down ends: one of them probes, the others wait
        await asyncio.sleep(0.01)
    probe = breaker.probe
    await asyncio.sleep(0.05)
    assert breaker.calls == probe and not tickets.done()
    breaker.success(probe)
    assert len(set(await tickets)) == 20 and breaker.state == "closed"
    # a failed probe: the others are refused once their wait is used up, never hang
    breaker = CircuitBreaker(failures=1, reset_s=0.3, reset_max_s=60)
    breaker.failure(breaker.admit("u"))
    waiting = asyncio.gather(*[breaker.enter("u", max_wait=0.5) for _ in range(5)], return_exceptions=True)
    while breaker.probe is None:
        await asyncio.sleep(0.01)
    breaker.failure(breaker.probe)  # open again for 0.6 s: past what they may wait
    outcomes = await waiting
    assert sum(isinstance(o, CircuitOpen) for o in outcomes) == 4 and breaker.state == "open"
    with pytest.raises(CircuitOpen) as info:  # down, not a blip: no waiting, however long one may wait
        await asyncio.wait_for(breaker.enter("u", max_wait=30), 0.2)
    assert 0 < info.value.wait <= 0.6


def test_token_bucket_bursts_then_holds_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(per_minute=120, burst_s=1, clock=clock)  # 2 a second, 2 at once
    assert bucket.capacity == 2
    waits = [bucket.reserve(1, max_wait=10)[1] for _ in range(5)]
    assert waits == [0, 0, 0.5, 1.0, 1.5]  # in the order asked
    assert bucket.reserve(1, max_wait=1.9) is None  # 2.0 s away: refused, nothing taken
    assert bucket.reserve(1, max_wait=2.0) == (1, 2.0)
    clock.now += 10
    assert bucket.reserve(1, 0) == (1, 0)


async def test_rate_limiter_reserves_tokens_and_settles_with_usage():
    clock = FakeClock()
    cfg = UpstreamConfig(
        name="u",
        requests_per_minute=600,
        tokens_per_minute=6000,
        rate_limit_burst_s=1,
        rate_limit_wait_s=0,
    )
    limiter = RateLimiter(cfg, clock)  # 10 requests and 100 tokens a second, a second's worth at once
    permit = await limiter.acquire(80)
    with pytest.raises(RateLimited) as info:
        await limiter.acquire(50)  # 30 short
    assert info.value.status == 429 and info.value.type == "tokens" and info.value.headers["retry-after"] == "1"
    assert limiter.requests.level == 9  # the refused call gave its request back
    limiter.settle(permit, 20)  # it used less than it reserved
    await limiter.acquire(50)
    assert limiter.tokens.level == pytest.approx(30)


# -- end to end --------------------------------------------------------------------------


def settings(
    sim_url: str,
    primary: dict | None = None,
    backup: dict | None = None,
    fallback: bool = True,
    **sections,
):
    route = {"model": "*", "upstream": "primary"}
    if fallback:
        route.update(fallbacks=["backup"], fallback_models={"backup": "claude-3-5-haiku-latest"})
    data = {
        "auth": {"mode": "open"},
        "cache": {"enabled": False},
        "server": {"request_timeout_s": 30},
        "upstreams": {
            "primary": {
                "kind": "openai",
                "base_url": sim_url + "/v1",
                **(primary or {}),
            },
            "backup": {
                "kind": "anthropic",
                "base_url": sim_url,
                "api_key": "sk-ant-herd",
                **(backup or {}),
            },
        },
        "routes": [route],
        **sections,
    }
    return parse_settings(data, env={})


def aclient(herd) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key="sk-client", max_retries=0, timeout=60)


def arrivals(sim, path: str) -> list[float]:
    return [e["t"] for e in sim_stats(sim.url)["log"] if e["path"] == path]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def burst(herd, text: str, n: int) -> list:
    """n identical requests, half of them streaming: (upstream header, text or error) each."""
    c = aclient(herd)

    async def one(stream: bool):
        try:
            raw = await c.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=user(text), stream=stream
            )
            parsed = raw.parse()
            if stream:
                body = "".join([ch.choices[0].delta.content or "" async for ch in parsed if ch.choices])
            else:
                body = parsed.choices[0].message.content
            return raw.headers["x-herd-upstream"], body
        except openai.APIError as e:  # a status, or an error event in a stream that had started
            return e

    return await asyncio.gather(*[one(i % 2 == 0) for i in range(n)])


async def test_failing_primary_retries_with_backoff_then_falls_back_for_every_waiter(
    sim,
):
    sim_reset(sim.url, ttft_ms=300)
    sim_faults(sim.url, {"kind": "status", "status": 503, "times": 3, "path": CHAT})
    primary = {"retries": 2, "backoff_base_s": 0.3, "backoff_max_s": 5}
    with HerdServer(settings(sim.url, primary)) as herd:
        herd.gateway.dispatcher.guards["primary"].retry.uniform = lambda a, b: b  # the jitter's longest wait
        outcomes = await burst(herd, "please survive", 40)
        metrics = herd.gateway.metrics
        assert metrics.upstream_retries.labels("primary")._value.get() == 2
        assert metrics.upstream_fallbacks.labels("primary", "backup")._value.get() == 1
        # the flight's latency counts for the upstream that answered it
        latency = metrics.registry.get_sample_value
        assert latency("herd_upstream_seconds_count", {"upstream": "backup"}) == 1
        assert not latency("herd_upstream_seconds_count", {"upstream": "primary"})
    expected = expected_text({"messages": user("please survive")})
    assert outcomes == [("backup", expected)] * 40
    tries = arrivals(sim, CHAT)
    assert len(tries) == 3  # one flight: one call and its two retries
    assert tries[1] - tries[0] >= 0.3 - 0.02 and tries[2] - tries[1] >= 0.6 - 0.02  # spaced as configured
    (fallback,) = arrivals(sim, MESSAGES)
    assert fallback >= tries[2]
    assert [e["model"] for e in sim_stats(sim.url)["log"] if e["path"] == MESSAGES] == ["claude-3-5-haiku-latest"]


async def test_when_everything_fails_every_waiter_gets_one_openai_error(sim):
    sim_faults(sim.url, {"kind": "status", "status": 500, "times": -1, "delay_ms": 300})
    primary = {"retries": 1, "backoff_base_s": 0.05}
    with HerdServer(settings(sim.url, primary, backup={"retries": 0})) as herd:
        outcomes = await burst(herd, "doomed", 20)
    assert all(isinstance(o, openai.InternalServerError) for o in outcomes), outcomes
    assert len({o.response.headers["x-herd-flight"] for o in outcomes}) == 1
    assert len({o.response.text for o in outcomes}) == 1
    assert set(outcomes[0].body) >= {"message", "type"} and outcomes[0].body["message"]
    assert len(arrivals(sim, CHAT)) == 2 and len(arrivals(sim, MESSAGES)) == 1


async def test_a_client_error_is_not_retried_nor_sent_to_the_fallback(sim):
    sim_faults(sim.url, {"kind": "status", "status": 400, "path": CHAT, "delay_ms": 300})
    with HerdServer(settings(sim.url, {"retries": 2, "backoff_base_s": 0.05})) as herd:
        outcomes = await burst(herd, "malformed somehow", 4)
    assert all(isinstance(o, openai.BadRequestError) for o in outcomes)
    assert len(arrivals(sim, CHAT)) == 1 and arrivals(sim, MESSAGES) == []


async def test_a_stream_that_breaks_after_sending_is_never_retried(sim):
    sim_reset(sim.url, ttft_ms=300, tokens_per_s=50, reply_tokens=10)
    sim_faults(sim.url, {"kind": "reset", "after_chunks": 3, "path": CHAT})
    # The flight must stream whichever request leads it: a non-stream upstream call that
    # breaks has sent nobody anything, and is rightly retried.
    always_stream = {"upstream_stream": "always"}
    with HerdServer(settings(sim.url, {"retries": 2, "backoff_base_s": 0.05}, coalesce=always_stream)) as herd:
        outcomes = await burst(herd, "half a stream", 4)
    assert len(arrivals(sim, CHAT)) == 1 and arrivals(sim, MESSAGES) == []
    assert all(isinstance(o, openai.APIError) and "upstream" in o.message for o in outcomes)
    non_stream = [o for i, o in enumerate(outcomes) if i % 2]
    assert all(isinstance(o, openai.APIStatusError) and o.status_code == 502 for o in non_stream)


async def test_429_retry_after_is_honoured(sim):
    sim_faults(
        sim.url,
        {
            "kind": "status",
            "status": 429,
            "headers": {"retry-after": "2"},
            "path": CHAT,
        },
    )
    with HerdServer(settings(sim.url, {"retries": 2, "backoff_base_s": 0.01}, fallback=False)) as herd:
        completion = await aclient(herd).chat.completions.create(model="m", messages=user("patience"))
    assert completion.choices[0].message.content == "echo: patience"
    first, second = arrivals(sim, CHAT)
    assert second - first >= 2.0 - 0.02


async def test_a_retry_after_longer_than_backoff_max_is_not_waited_for(sim):
    sim_faults(
        sim.url,
        {
            "kind": "status",
            "status": 429,
            "headers": {"retry-after": "30"},
            "path": CHAT,
        },
    )
    herd = HerdServer(settings(sim.url, {"retries": 2, "backoff_max_s": 5}, fallback=False))
    with herd, pytest.raises(openai.RateLimitError) as info:
        await aclient(herd).chat.completions.create(model="m", messages=user("not that patient"))
    assert info.value.response.headers["retry-after"] == "30"  # the upstream's advice reaches the client
    assert len(arrivals(sim, CHAT)) == 1


async def test_circuit_opens_after_repeated_failures_then_half_opens(sim):
    sim_faults(sim.url, {"kind": "status", "status": 500, "times": -1, "path": CHAT})
    primary = {"retries": 0, "circuit_failures": 3, "circuit_reset_s": 1.0}
    with HerdServer(settings(sim.url, primary)) as herd:
        c = aclient(herd)

        async def ask(text: str) -> str:
            raw = await c.chat.completions.with_raw_response.create(model="m", messages=user(text))
            assert raw.parse().choices[0].message.content == f"echo: {text}"
            return raw.headers["x-herd-upstream"]

        circuit = herd.gateway.dispatcher.guards["primary"].circuit
        assert [await ask(f"q{i}") for i in range(3)] == ["backup"] * 3
        assert herd.call(lambda: circuit.state) == "open"
        assert await ask("q3") == "backup"
        assert len(arrivals(sim, CHAT)) == 3  # open: the primary was not even tried
        sim_reset(sim.url)  # the primary recovers
        await asyncio.sleep(1.05)
        assert herd.call(lambda: circuit.state) == "half_open"
        assert await ask("q4") == "primary"  # the trial call
        assert herd.call(lambda: circuit.state) == "closed"
        assert await ask("q5") == "primary"
        assert "herd_circuit_state" in herd.gateway.metrics.render().decode()


async def test_open_circuit_without_fallback_is_a_503_with_retry_after(sim):
    sim_faults(sim.url, {"kind": "status", "status": 502, "times": -1, "path": CHAT})
    primary = {"retries": 0, "circuit_failures": 2, "circuit_reset_s": 20, "backoff_max_s": 5}
    with HerdServer(settings(sim.url, primary, fallback=False)) as herd:
        c = aclient(herd)
        for i in range(2):
            with pytest.raises(openai.APIStatusError) as info:
                await c.chat.completions.create(model="m", messages=user(f"fail {i}"))
            assert info.value.status_code == 502
        with pytest.raises(openai.InternalServerError) as info:
            await c.chat.completions.create(model="m", messages=user("fail 2"))
    assert info.value.status_code == 503 and info.value.body["code"] == "circuit_open"
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 20
    assert len(arrivals(sim, CHAT)) == 2


async def test_without_a_fallback_a_request_waits_out_a_short_cool_down_and_probes(sim):
    sim_faults(sim.url, {"kind": "status", "status": 502, "times": 2, "path": CHAT})
    primary = {"retries": 0, "circuit_failures": 2, "circuit_reset_s": 0.5}
    with HerdServer(settings(sim.url, primary, fallback=False)) as herd:
        c = aclient(herd)
        for i in range(2):
            with pytest.raises(openai.APIStatusError):
                await c.chat.completions.create(model="m", messages=user(f"fail {i}"))
        circuit = herd.gateway.dispatcher.guards["primary"].circuit
        assert herd.call(lambda: circuit.state) == "open"
        answers = await asyncio.gather(*[c.chat.completions.create(model="m", messages=user(f"ok {i}"))
                                         for i in range(10)])
    assert [a.choices[0].message.content for a in answers] == [f"echo: ok {i}" for i in range(10)]
    assert len(arrivals(sim, CHAT)) == 12  # nothing refused: each waited for the probe, then called


async def test_rate_limits_hold_under_a_burst_of_distinct_prompts(sim):
    # 2 requests a second, 2 at once; a call may wait up to 1.2 s for its turn
    primary = {
        "requests_per_minute": 120,
        "rate_limit_burst_s": 1,
        "rate_limit_wait_s": 1.2,
    }
    with HerdServer(settings(sim.url, primary, fallback=False)) as herd:
        c = aclient(herd)

        async def one(i: int):
            try:
                return await c.chat.completions.create(model="m", messages=user(f"distinct {i}"))
            except openai.RateLimitError as e:
                return e

        outcomes = await asyncio.gather(*[one(i) for i in range(12)])
    answered = [o for o in outcomes if not isinstance(o, openai.RateLimitError)]
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(answered) + len(refused) == 12
    assert 2 <= len(answered) <= 6 and refused
    assert all(o.body["code"] == "rate_limit_exceeded" and int(o.response.headers["retry-after"]) >= 1 for o in refused)
    times = sorted(arrivals(sim, CHAT))
    assert len(times) == len(answered)  # nothing refused reached the upstream, nothing twice
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            # j - i + 1 calls in [t_i, t_j]: two at once, then one every half second
            assert times[j] - times[i] >= (j - i + 1 - 2) / 2 - 0.15


async def test_rate_limited_primary_falls_back(sim):
    primary = {
        "requests_per_minute": 1,
        "rate_limit_burst_s": 1,
        "rate_limit_wait_s": 0,
    }
    with HerdServer(settings(sim.url, primary)) as herd:
        first = await burst(herd, "first one", 1)
        second = await burst(herd, "second one", 1)
    assert first == [("primary", "echo: first one")]
    assert second == [("backup", "echo: second one")]


@pytest.mark.parametrize("name", ["openai", "anthropic", "vllm", "fallback"])
def test_example_configs_load(name):
    from pathlib import Path

    from proxy.config import load_settings

    env = {"OPENAI_API_KEY": "sk-o", "ANTHROPIC_API_KEY": "sk-a"}
    s = load_settings(Path(__file__).parent.parent / "config" / f"{name}.toml", env=env)
    kinds = {u.kind for u in s.upstreams.values()}
    assert {
        "openai": {"openai"},
        "anthropic": {"anthropic"},
        "vllm": {"vllm"},
        "fallback": {"vllm", "openai", "anthropic"},
    }[name] == kinds
    if name == "fallback":
        assert s.route_for("llama-3.1-8b").fallbacks == ["openai", "anthropic"]
        assert "sk-o" not in repr(s.upstreams["openai"])  # keys stay out of reprs


@pytest.mark.parametrize(
    "route, message",
    [
        ({"fallbacks": ["nowhere"]}, "not a configured upstream"),
        ({"fallbacks": ["primary"]}, "own upstream"),
        ({"fallbacks": ["backup", "backup"]}, "twice"),
        (
            {"fallbacks": ["backup"], "fallback_models": {"other": "m"}},
            "not in this route's fallbacks",
        ),
    ],
)
def test_bad_fallbacks_are_config_errors(route, message):
    from proxy.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_settings(
            {
                "upstreams": {
                    "primary": {"base_url": "http://a/v1"},
                    "backup": {"base_url": "http://b/v1"},
                },
                "routes": [{"model": "*", "upstream": "primary", **route}],
            },
            env={},
        )


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"retries": -1}, "retries"),
        ({"circuit_reset_s": 0}, "circuit_reset_s"),
        ({"kv_cache_high": 1.5}, "kv_cache_high"),
        ({"min_concurrency": 10, "max_concurrency": 4}, "min_concurrency"),
        ({"metrics_url": "gpu:9"}, "metrics_url"),
    ],
)
def test_bad_resilience_settings_are_config_errors(patch, key):
    from proxy.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        parse_settings({"upstreams": {"u": {"base_url": "http://a/v1", **patch}}}, env={})
