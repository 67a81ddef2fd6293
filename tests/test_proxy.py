"""herd end to end: the official openai SDK -> herd -> the upstream simulator."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from benchmarks.simulator import expected_text
from tests.harness import HerdServer, chat_calls, herd_settings, sim_faults, sim_reset, sim_stats


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def answer(text: str, **body) -> str:
    return expected_text({"messages": user(text), **body})


def client(herd, key: str = "sk-test-1") -> openai.OpenAI:
    return openai.OpenAI(base_url=herd.url + "/v1", api_key=key, max_retries=0, timeout=30)


def aclient(herd, key: str = "sk-test-1") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key=key, max_retries=0, timeout=30)


async def collect_stream(c: openai.AsyncOpenAI, text: str, **kw) -> str:
    stream = await c.chat.completions.create(model="m", messages=user(text), stream=True, **kw)
    return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])


def test_sync_sdk_non_stream_and_stream(herd, sim):
    c = client(herd)
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=user("hello there"))
    assert raw.headers["x-herd"] == "leader"
    assert raw.headers["x-herd-upstream"] == "sim"
    completion = raw.parse()
    assert completion.choices[0].message.content == answer("hello there")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == len(answer("hello there").split())

    chunks = list(
        c.chat.completions.create(
            model="gpt-4o-mini", messages=user("stream me"), stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == answer("stream me")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(answer("stream me").split())
    assert chat_calls(sim.url) == 2


def test_stream_without_include_usage_gets_no_usage_chunk(herd, sim):
    chunks = list(client(herd).chat.completions.create(model="m", messages=user("no usage"), stream=True))
    assert all(ch.choices for ch in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_async_sdk_non_stream_and_stream(herd, sim):
    c = aclient(herd)
    completion = await c.chat.completions.create(model="m", messages=user("async hello"))
    assert completion.choices[0].message.content == answer("async hello")
    assert await collect_stream(c, "async stream") == answer("async stream")


async def test_tool_calls_pass_through(herd, sim):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    c = aclient(herd)
    completion = await c.chat.completions.create(model="m", messages=user("please call tool now"), tools=tools)
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "lookup"
    assert call.function.arguments == '{"q":"please call tool now"}' or '"q"' in call.function.arguments


async def test_200_identical_requests_make_one_upstream_call(herd, sim):
    sim_reset(sim.url, ttft_ms=1500, tokens_per_s=200)
    c = aclient(herd)
    results = await asyncio.gather(
        *[c.chat.completions.with_raw_response.create(model="m", messages=user("same question")) for _ in range(200)]
    )
    assert chat_calls(sim.url) == 1
    assert all(r.parse().choices[0].message.content == answer("same question") for r in results)
    roles = sorted(r.headers["x-herd"] for r in results)
    assert roles.count("leader") == 1 and roles.count("follower") == 199
    assert len({r.headers["x-herd-flight"] for r in results}) == 1


async def test_mixed_stream_and_non_stream_burst_shares_one_flight(herd, sim):
    sim_reset(sim.url, ttft_ms=1500, tokens_per_s=100)
    c = aclient(herd)
    non_stream = [c.chat.completions.create(model="m", messages=user("mixed burst")) for _ in range(50)]
    streams = [collect_stream(c, "mixed burst") for _ in range(50)]
    results = await asyncio.gather(*non_stream, *streams)
    assert chat_calls(sim.url) == 1
    expected = answer("mixed burst")
    assert [r.choices[0].message.content for r in results[:50]] == [expected] * 50
    assert results[50:] == [expected] * 50


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize(
    "first, second",
    [
        ({"key": "sk-tenant-a"}, {"key": "sk-tenant-b"}),
        ({"model": "model-a"}, {"model": "model-b"}),
        ({"temperature": 0.2}, {"temperature": 0.7}),
        ({}, {"tools": TOOLS}),
        ({}, {"extra_body": {"some_future_param": 1}}),
        ({"extra_body": {"some_future_param": 1}}, {"extra_body": {"some_future_param": 2}}),
        ({"messages": [{"role": "system", "content": "Be brief."}] + user("scoped")}, {}),
    ],
    ids=["tenant", "model", "temperature", "tools", "unknown-field", "unknown-value", "history"],
)
async def test_requests_differing_in_scope_never_share(herd, sim, first, second):
    sim_reset(sim.url, ttft_ms=800)

    async def send(spec: dict):
        spec = dict(spec)
        c = aclient(herd, spec.pop("key", "sk-tenant-a"))
        params = {"model": spec.pop("model", "m"), "messages": spec.pop("messages", user("scoped")), **spec}
        return await c.chat.completions.with_raw_response.create(**params)

    a, b = await asyncio.gather(send(first), send(second))
    assert chat_calls(sim.url) == 2
    assert a.headers["x-herd"] == b.headers["x-herd"] == "leader"


async def test_same_params_in_another_order_and_float_form_do_share(herd, sim):
    sim_reset(sim.url, ttft_ms=800)
    c = aclient(herd)
    await asyncio.gather(
        c.chat.completions.create(model="m", messages=user("order"), temperature=1, top_p=0.5),
        c.chat.completions.create(model="m", messages=user("order"), top_p=0.5, temperature=1.0),
        c.chat.completions.create(model="m", temperature=1, top_p=0.5,
                                  messages=[{"role": "user", "content": [{"type": "text", "text": "order"}]}]),
    )
    assert chat_calls(sim.url) == 1


async def test_late_stream_joiner_gets_the_whole_stream_in_order(herd, sim):
    sim_reset(sim.url, ttft_ms=50, tokens_per_s=20, reply_tokens=30)
    c = aclient(herd)
    early = asyncio.create_task(collect_stream(c, "late joiner"))
    await asyncio.sleep(0.8)  # the flight is well into its stream
    raw = await c.chat.completions.with_raw_response.create(model="m", messages=user("late joiner"), stream=True)
    assert raw.headers["x-herd"] == "follower"
    late = "".join([ch.choices[0].delta.content or "" async for ch in raw.parse() if ch.choices])
    expected = expected_text({"messages": user("late joiner")}, {"reply_tokens": 30})
    assert late == expected
    assert await early == expected
    assert chat_calls(sim.url) == 1


def _upstream_calls(sim_url: str) -> list[dict]:
    return [e for e in sim_stats(sim_url)["log"] if e["path"].endswith("/chat/completions")]


async def test_the_upstream_is_called_the_way_the_flight_leader_asked(herd, sim):
    sim_reset(sim.url, ttft_ms=300, reply_tokens=10)
    c = aclient(herd)
    expected = expected_text({"messages": user("one piece")}, {"reply_tokens": 10})
    leader = asyncio.create_task(c.chat.completions.with_raw_response.create(model="m", messages=user("one piece")))
    await asyncio.sleep(0.1)
    # A stream request that joins a non-stream flight gets the whole answer as a stream.
    raw = await c.chat.completions.with_raw_response.create(
        model="m", messages=user("one piece"), stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-herd"] == "follower"
    chunks = [ch async for ch in raw.parse()]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    assert chunks[-1].usage.completion_tokens == 10
    answer = (await leader).parse()
    assert answer.choices[0].message.content == expected and answer.usage.completion_tokens == 10
    assert answer.system_fingerprint == "fp_herdsim"  # the upstream's own body
    (call,) = _upstream_calls(sim.url)
    assert call["stream"] is False and "stream_options" not in call["body"]

    sim_reset(sim.url, ttft_ms=0, reply_tokens=10)
    assert await collect_stream(c, "streamed") == expected_text({"messages": user("streamed")}, {"reply_tokens": 10})
    (call,) = _upstream_calls(sim.url)
    assert call["stream"] is True and call["body"]["stream_options"] == {"include_usage": True}


async def test_upstream_stream_always_streams_every_flight(sim):
    settings = herd_settings(sim.url, coalesce={"upstream_stream": "always"})
    with HerdServer(settings) as herd:
        sim_reset(sim.url, reply_tokens=5)
        answer = await aclient(herd).chat.completions.create(model="m", messages=user("streamed anyway"))
        assert answer.choices[0].message.content == expected_text({"messages": user("streamed anyway")},
                                                                  {"reply_tokens": 5})
        (call,) = _upstream_calls(sim.url)
        assert call["stream"] is True


async def _read_some_then_disconnect(url: str, text: str, chunks: int = 2) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        body = {"model": "m", "messages": user(text), "stream": True}
        async with http.stream("POST", url + "/v1/chat/completions", json=body,
                               headers={"authorization": "Bearer sk-test-1"}) as resp:
            seen = 0
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    seen += 1
                    if seen >= chunks:
                        return  # leaving the block closes the connection mid-stream


async def test_leader_disconnect_does_not_fail_followers(herd, sim):
    sim_reset(sim.url, ttft_ms=100, tokens_per_s=20, reply_tokens=20)
    # the leader leaves after 6 chunks (~350 ms): well after the followers joined, even on a busy machine
    leader = asyncio.create_task(_read_some_then_disconnect(herd.url, "leader leaves", chunks=6))
    await asyncio.sleep(0.05)
    c = aclient(herd)
    followers = [c.chat.completions.create(model="m", messages=user("leader leaves")) for _ in range(5)]
    followers += [collect_stream(c, "leader leaves") for _ in range(5)]
    results = await asyncio.gather(*followers)
    await leader
    expected = expected_text({"messages": user("leader leaves")}, {"reply_tokens": 20})
    assert [r.choices[0].message.content for r in results[:5]] == [expected] * 5
    assert results[5:] == [expected] * 5
    stats = sim_stats(sim.url)
    assert stats["calls"] == 1 and stats["disconnects"] == 0


async def test_all_clients_leaving_cancels_the_upstream_call(herd, sim):
    sim_reset(sim.url, ttft_ms=50, tokens_per_s=10, reply_tokens=100)
    await asyncio.gather(*[_read_some_then_disconnect(herd.url, "everyone leaves") for _ in range(3)])
    for _ in range(100):
        stats = sim_stats(sim.url)
        if stats["disconnects"] == 1 and stats["active"] == 0:
            break
        await asyncio.sleep(0.05)
    assert stats["calls"] == 1
    assert stats["disconnects"] == 1 and stats["active"] == 0
    assert herd.flights == 0


async def test_non_stream_client_disconnect_releases_its_place(herd, sim):
    sim_reset(sim.url, ttft_ms=3000)
    async with httpx.AsyncClient(timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(herd.url + "/v1/chat/completions", json={"model": "m", "messages": user("impatient")})
    for _ in range(100):
        if herd.flights == 0:
            break
        await asyncio.sleep(0.05)
    assert herd.flights == 0
    for _ in range(100):
        if sim_stats(sim.url)["active"] == 0:
            break
        await asyncio.sleep(0.05)
    assert sim_stats(sim.url)["active"] == 0


async def _burst_outcomes(herd, text: str, n: int = 6) -> list:
    c = aclient(herd)

    async def one(stream: bool):
        try:
            if stream:
                return await collect_stream(c, text)
            return await c.chat.completions.create(model="m", messages=user(text))
        except openai.APIError as e:
            return e

    return await asyncio.gather(*[one(i % 2 == 0) for i in range(n)])


async def test_upstream_500_reaches_every_waiter(herd, sim):
    sim_reset(sim.url, ttft_ms=300)
    sim_faults(sim.url, {"kind": "status", "status": 500, "match": "boom", "delay_ms": 500})
    outcomes = await _burst_outcomes(herd, "boom")
    assert chat_calls(sim.url) == 1
    assert all(isinstance(o, openai.InternalServerError) for o in outcomes), outcomes
    assert all(o.status_code == 500 and isinstance(o.body, dict) and "message" in o.body for o in outcomes)
    assert len({o.response.headers["x-herd-flight"] for o in outcomes}) == 1  # one flight, one error


async def test_upstream_reset_reaches_every_waiter(herd, sim):
    sim_reset(sim.url, ttft_ms=300, tokens_per_s=50, reply_tokens=10)
    sim_faults(sim.url, {"kind": "reset", "after_chunks": 2, "match": "reset"})
    outcomes = await _burst_outcomes(herd, "reset")
    assert chat_calls(sim.url) == 1
    assert all(isinstance(o, openai.APIError) for o in outcomes), outcomes
    assert all("upstream" in o.message for o in outcomes)


async def test_upstream_stall_past_deadline_reaches_every_waiter(sim):
    settings = herd_settings(sim.url, server={"request_timeout_s": 1.0})
    sim_reset(sim.url, ttft_ms=100, tokens_per_s=50, reply_tokens=10)
    sim_faults(sim.url, {"kind": "stall", "after_chunks": 2, "stall_s": 30, "match": "stall"})
    with HerdServer(settings) as herd:
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcomes = await _burst_outcomes(herd, "stall")
        assert loop.time() - started < 5
        assert all(isinstance(o, openai.APIError) for o in outcomes), outcomes
        assert any(getattr(o, "status_code", None) == 504 for o in outcomes)
        for _ in range(100):
            if herd.flights == 0:
                break
            await asyncio.sleep(0.05)
        assert herd.flights == 0  # every waiter left: the stalled call was cancelled
    assert chat_calls(sim.url) == 1


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model"),
        (b'{"model": "m"}', 400, "messages"),
        (b'{"model": "m", "messages": []}', 400, "messages"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "hi"}]}', 400, "model"),
        (b'{"model": "m", "messages": "hi"}', 400, "messages"),
        (b'{"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages[0].role"),
        (b'{"model": "m", "messages": [{"role": "user", "content": 7}]}', 400, "messages[0].content"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "temperature"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}', 400, "temperature"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "stream"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": true}', 400, "n"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}', 400, "stop"),
    ],
)
def test_bad_input_gets_openai_4xx(herd, sim, body, status, param):
    r = httpx.post(herd.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert chat_calls(sim.url) == 0


def test_oversized_body_gets_413(herd, sim):
    big = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (5 * 1024 * 1024) + b'"}]}'
    r = httpx.post(herd.url + "/v1/chat/completions", content=big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_bad_coalesce_header_and_unknown_paths_get_openai_errors(herd, sim):
    r = httpx.post(herd.url + "/v1/chat/completions", json={"model": "m", "messages": user("x")},
                   headers={"x-herd-coalesce": "sometimes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-herd-coalesce"
    r = httpx.get(herd.url + "/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.put(herd.url + "/healthz")
    assert r.status_code == 405 and "error" in r.json()


def test_an_internal_error_on_the_chat_path_is_an_openai_500_and_counted(sim):
    with HerdServer(herd_settings(sim.url)) as herd:
        def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        herd.gateway.submit = broken
        r = httpx.post(herd.url + "/v1/chat/completions", json={"model": "m", "messages": user("x")})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "a bug" not in r.text
        metrics = httpx.get(herd.url + "/metrics").text
        assert 'herd_requests_total{outcome="error"} 1.0' in metrics


async def test_bad_request_does_not_disturb_flights_in_progress(herd, sim):
    sim_reset(sim.url, ttft_ms=600)
    c = aclient(herd)
    good = [asyncio.create_task(c.chat.completions.create(model="m", messages=user("steady"))) for _ in range(5)]
    await asyncio.sleep(0.1)
    async with httpx.AsyncClient() as http:
        bad = await http.post(herd.url + "/v1/chat/completions", content=b'{"model": "m", "messages": [')
    assert bad.status_code == 400
    results = await asyncio.gather(*good)
    assert all(r.choices[0].message.content == answer("steady") for r in results)


def test_upstream_4xx_reaches_client_with_its_status_and_body(herd, sim):
    body = {"error": {"message": "no such model here", "type": "invalid_request_error", "param": "model",
                      "code": "model_not_found"}}
    sim_faults(sim.url, {"kind": "status", "status": 404, "body": body})
    with pytest.raises(openai.NotFoundError) as e:
        client(herd).chat.completions.create(model="m", messages=user("x"))
    assert e.value.status_code == 404
    assert e.value.body == body["error"]


def test_other_v1_calls_are_forwarded(herd, sim):
    c = client(herd, key="sk-forwarded")
    emb = c.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(emb.data[0].embedding) > 0
    assert [m.id for m in c.models.list()]
    legacy = c.completions.create(model="m", prompt="hi")
    assert legacy.choices
    log = sim_stats(sim.url)["log"]
    assert {entry["path"] for entry in log} >= {"/v1/embeddings", "/v1/models", "/v1/completions"}
    # the client's own key travels upstream when herd holds none
    assert all(entry["headers"].get("authorization") == "Bearer sk-forwarded" for entry in log)


def test_bypass_header_never_coalesces(herd, sim):
    r = httpx.post(herd.url + "/v1/chat/completions", json={"model": "m", "messages": user("bypass me")},
                   headers={"x-herd-coalesce": "off"})
    assert r.status_code == 200 and r.headers["x-herd"] == "bypass"
    assert r.json()["choices"][0]["message"]["content"] == answer("bypass me")


def test_health_endpoints(herd):
    assert httpx.get(herd.url + "/healthz").json()["status"] == "ok"
    assert httpx.get(herd.url + "/readyz").status_code == 200


async def test_no_flight_is_left_after_10000_requests(herd, sim):
    import aiohttp

    sim_reset(sim.url, ttft_ms=2)
    texts = [f"question {i % 300}" for i in range(10_000)]
    statuses: list[int] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        queue = iter(enumerate(texts))

        async def worker() -> None:
            for i, text in queue:
                body = {"model": "m", "messages": user(text), "stream": i % 3 == 0}
                async with http.post(herd.url + "/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    statuses.append(resp.status)

        await asyncio.gather(*[worker() for _ in range(64)])
    assert len(statuses) == 10_000 and set(statuses) == {200}
    assert herd.flights == 0
    group = herd.gateway.group
    assert herd.call(lambda: (len(group._flights), len(group._by_id), len(group._indexes))) == (0, 0, 0)
    assert chat_calls(sim.url) <= 10_000


async def test_upstream_first_byte_and_idle_timeouts(sim):
    limits = {"first_byte_timeout_s": 0.5, "idle_timeout_s": 0.3, "total_timeout_s": 2.0}
    settings = herd_settings(sim.url, upstreams={"sim": limits})
    with HerdServer(settings) as herd:
        c = aclient(herd)
        sim_reset(sim.url, ttft_ms=1500)  # no first byte in time
        with pytest.raises(openai.APIStatusError) as slow:
            await collect_stream(c, "slow start")
        assert slow.value.status_code == 504 and slow.value.body["code"] == "upstream_timeout"
        # A non-stream flight makes a non-stream call: its first byte is the whole answer, so
        # only the total timeout bounds it.
        one_piece = await c.chat.completions.create(model="m", messages=user("slow but whole"))
        assert one_piece.choices[0].finish_reason == "stop"
        sim_reset(sim.url, ttft_ms=2500)
        with pytest.raises(openai.APIStatusError) as too_slow:
            await c.chat.completions.create(model="m", messages=user("over the total"))
        assert too_slow.value.status_code == 504 and too_slow.value.body["code"] == "upstream_timeout"
        sim_reset(sim.url, ttft_ms=0, tokens_per_s=20, reply_tokens=10)  # 50 ms between chunks: fine
        ok = await c.chat.completions.create(model="m", messages=user("steady stream"), stream=True)
        assert [chunk async for chunk in ok][-1].choices[0].finish_reason == "stop"
        sim_faults(sim.url, {"kind": "stall", "after_chunks": 3, "stall_s": 5, "match": "goes quiet"})
        with pytest.raises(openai.APIError) as quiet:
            await collect_stream(c, "goes quiet")
        assert "did not answer in time" in str(quiet.value.message) or "upstream_timeout" in str(quiet.value.body)
        assert herd.flights == 0


async def test_a_steady_stream_still_ends_at_the_total_timeout(sim):
    """Chunks that keep coming within the idle timeout never carry a call past its total
    timeout: the flight ends with the same upstream timeout, not before its time."""
    limits = {"first_byte_timeout_s": 0.5, "idle_timeout_s": 0.5, "total_timeout_s": 1.5}
    settings = herd_settings(sim.url, upstreams={"sim": limits})
    with HerdServer(settings) as herd:
        c = aclient(herd)
        sim_reset(sim.url, ttft_ms=0, tokens_per_s=10, reply_tokens=60)  # 6 s of chunks, 100 ms apart
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(openai.APIError) as cut:
            await collect_stream(c, "steady but long")
        assert loop.time() - started >= 1.4
        assert "did not answer in time" in str(cut.value.message) or "upstream_timeout" in str(cut.value.body)
        started = loop.time()
        with pytest.raises(openai.APIStatusError) as whole:  # a non-stream flight: one piece, too late
            await c.chat.completions.create(model="m", messages=user("steady but long, whole"))
        assert loop.time() - started >= 1.4
        assert whole.value.status_code == 504 and whole.value.body["code"] == "upstream_timeout"
        assert herd.flights == 0


def test_a_non_json_upstream_error_becomes_an_openai_error_body(herd, sim):
    sim_faults(sim.url, {"kind": "status", "status": 502, "body": "<html>bad gateway</html>",
                         "headers": {"Content-Type": "text/html"}})
    r = httpx.post(herd.url + "/v1/chat/completions", json={"model": "m", "messages": user("html error")})
    assert r.status_code == 502
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["message"]
