"""POST /v1/messages (Anthropic's Messages API) through herd: the anthropic SDK -> herd -> the
simulator, as an Anthropic upstream (the body goes as it came) and as an OpenAI one (translated)."""

from __future__ import annotations

import asyncio
import os

import anthropic
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.simulator import ThreadedSimulator
from proxy.apis.messages import parse_messages
from proxy.errors import InvalidRequest
from proxy.upstream.anthropic import chat_request_of
from tests.harness import HerdServer, herd_settings, sim_faults, sim_reset, sim_stats

CLAUDE = "claude-3-5-haiku-latest"  # routed to the Anthropic upstream
GPT = "gpt-4o-mini"  # routed to the OpenAI upstream
UPSTREAM_PATH = {CLAUDE: "/v1/messages", GPT: "/v1/chat/completions"}


def herd_config(sim_url: str, **sections):
    return herd_settings(
        sim_url, upstreams={"claude": {"kind": "anthropic", "base_url": sim_url, "retries": 0}},
        routes=[{"model": "claude-*", "upstream": "claude"}, {"model": "*", "upstream": "sim"}],
        server={"request_timeout_s": 20}, **sections)


def calls(sim_url: str, model: str) -> int:
    return int(sim_stats(sim_url, log=False)["by_path"].get(UPSTREAM_PATH[model], 0))


@pytest.fixture(scope="module")
def sim():
    with ThreadedSimulator() as s:
        yield s


@pytest.fixture(scope="module")
def herd(sim):
    with HerdServer(herd_config(sim.url)) as h:
        yield h


def client(herd, key: str = "sk-ant-test", **kw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=herd.url, api_key=key, max_retries=0, timeout=30, **kw)


SAMPLING = ("temperature", "top_p", "top_k")  # not typed by this SDK version: sent as extra body fields


def ask(model: str, text: str = "tell me something", **kw) -> dict:
    sampling = {k: kw.pop(k) for k in SAMPLING if k in kw}
    request = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}], **kw}
    if sampling:
        request["extra_body"] = {**request.get("extra_body", {}), **sampling}
    return request


async def streamed(c: anthropic.AsyncAnthropic, **request) -> tuple[list, anthropic.types.Message]:
    async with c.messages.stream(**request) as stream:
        events = [event async for event in stream]
        return events, await stream.get_final_message()


def check_events(events: list, text: str) -> None:
    """A whole stream, in order: message_start, blocks, message_delta, message_stop."""
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
    assert kinds.index("content_block_start") < kinds.index("content_block_stop") < kinds.index("message_delta")
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert "".join(deltas) == text


@pytest.mark.parametrize("model", [CLAUDE, GPT])
async def test_100_identical_requests_half_streamed_make_one_call(herd, sim, model):
    sim_reset(sim.url, ttft_ms=400, tokens_per_s=200, reply_tokens=8)
    c = client(herd)
    request = ask(model, "what is coalescing", temperature=0)
    results = await asyncio.gather(*[c.messages.create(**request) if i % 2 == 0 else streamed(c, **request)
                                     for i in range(100)])
    assert calls(sim.url, model) == 1
    whole = [r for r in results if not isinstance(r, tuple)]
    text = whole[0].content[0].text
    assert text.startswith("echo: what is coalescing")
    for message in whole:
        assert message.content[0].text == text and message.stop_reason == "end_turn"
        assert message.usage.output_tokens == 8 and message.role == "assistant"
    for events, final in (r for r in results if isinstance(r, tuple)):
        check_events(events, text)
        assert final.content[0].text == text and final.stop_reason == "end_turn" and final.usage.output_tokens == 8


async def test_late_joiners_get_the_whole_stream(herd, sim):
    sim_reset(sim.url, ttft_ms=50, tokens_per_s=20, reply_tokens=12)
    c = client(herd)
    request = ask(CLAUDE, "join me late", temperature=0)
    first = asyncio.create_task(streamed(c, **request))
    await asyncio.sleep(0.4)  # the answer is streaming by now
    late = await asyncio.gather(streamed(c, **request), c.messages.create(**request))
    _, final = await first
    assert calls(sim.url, CLAUDE) == 1
    text = final.content[0].text
    check_events(late[0][0], text)
    assert late[1].content[0].text == text


@pytest.mark.parametrize("model", [CLAUDE, GPT])
async def test_never_shared_across_tenants_models_versions_betas_or_fields(herd, sim, model):
    sim_reset(sim.url, ttft_ms=400)
    base = ask(model, "isolate me", temperature=0)
    cases = [
        ("sk-a", {}, base),
        ("sk-b", {}, base),
        ("sk-a", {"anthropic-version": "2023-01-01"}, base),
        ("sk-a", {"anthropic-beta": "feature-a"}, base),
        ("sk-a", {"anthropic-beta": "feature-a,feature-b"}, base),
        ("sk-a", {}, {**base, "max_tokens": 5}),
        ("sk-a", {}, {**base, "extra_body": {"temperature": 0.5, "top_k": 3}}),
        ("sk-a", {}, {**base, "system": "be brief"}),
        ("sk-a", {}, {**base, "stop_sequences": ["zzz"]}),
        ("sk-a", {}, {**base, "messages": [{"role": "user", "content": "isolate me!"}]}),
    ]
    if model == CLAUDE:
        cases.append(("sk-a", {}, {**base, "model": "claude-3-opus-latest"}))
    answers = await asyncio.gather(*[client(herd, key).messages.create(**body, extra_headers=headers)
                                     for key, headers, body in cases for _ in range(2)])
    assert calls(sim.url, model) == len(cases)
    ids = [a.id for a in answers]
    assert all(ids[2 * i] == ids[2 * i + 1] for i in range(len(cases))) and len(set(ids)) == len(cases)
    # beta flags are a set: the same flags in another order share
    sim_reset(sim.url, ttft_ms=300)
    c = client(herd, "sk-a")
    await asyncio.gather(c.messages.create(**base, extra_headers={"anthropic-beta": "b1,b2"}),
                         c.messages.create(**base, extra_headers={"anthropic-beta": "b2, b1"}))
    assert calls(sim.url, model) == 1


async def test_an_anthropic_upstream_gets_the_body_and_headers_as_sent(herd, sim):
    sim_reset(sim.url)
    body = {
        "model": CLAUDE, "max_tokens": 50, "temperature": 0,
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "the user greets", "signature": "sig=="},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "found"}]},
        ],
        "tools": [{"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "some_future_field": {"kept": True},
    }
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(herd.url + "/v1/messages", json=body, headers={
            "x-api-key": "sk-ant-own", "anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking"})
    assert r.status_code == 200 and r.json()["type"] == "message"
    entry = sim_stats(sim.url)["log"][-1]
    assert entry["path"] == "/v1/messages"
    assert {k: v for k, v in entry["body"].items() if k != "stream"} == body
    assert entry["headers"]["x-api-key"] == "sk-ant-own"
    assert entry["headers"]["anthropic-version"] == "2023-06-01"
    assert entry["headers"]["anthropic-beta"] == "interleaved-thinking"


async def test_an_openai_upstream_gets_the_request_translated(herd, sim):
    sim_reset(sim.url)
    c = client(herd)
    tools = [{"name": "lookup", "description": "find", "input_schema": {"type": "object", "properties": {}}}]
    message = await c.messages.create(**ask(GPT, "please call tool now", system="sys", tools=tools,
                                            stop_sequences=["END"], metadata={"user_id": "u1"}, temperature=0))
    sent = sim_stats(sim.url)["log"][-1]["body"]
    assert sent["messages"] == [{"role": "system", "content": "sys"},
                                {"role": "user", "content": "please call tool now"}]
    assert sent["stop"] == ["END"] and sent["user"] == "u1" and sent["max_tokens"] == 64
    assert sent["tools"][0]["function"]["name"] == "lookup"
    assert message.stop_reason == "tool_use" and message.content[0].type == "tool_use"
    assert message.content[0].name == "lookup" and message.content[0].input == {"q": "please call tool now"}
    # a field that cannot be said in chat is a 400 naming it, in Anthropic's shape
    with pytest.raises(anthropic.BadRequestError) as info:
        await c.messages.create(**ask(GPT, thinking={"type": "enabled", "budget_tokens": 1024}))
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "invalid_request_error"
    assert "thinking" in info.value.body["error"]["message"]


async def test_errors_take_anthropics_shape(herd, sim):
    sim_reset(sim.url)
    c = client(herd)
    with pytest.raises(anthropic.BadRequestError) as info:  # no max_tokens (the SDK insists on one)
        await c.messages.create(**ask(CLAUDE, extra_body={"max_tokens": None}))
    assert info.value.status_code == 400
    assert info.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                          "message": "max_tokens: Field required"}}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(herd.url + "/v1/messages", json=ask(CLAUDE), headers={"x-api-key": "k"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "anthropic-version: header is required"
        r = await http.post(herd.url + "/v1/messages", content=b"{not json",
                            headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})
        assert r.status_code == 400 and r.json()["type"] == "error"
    for model in (CLAUDE, GPT):
        sim_faults(sim.url, {"kind": "status", "path": UPSTREAM_PATH[model], "status": 429, "times": 1})
        with pytest.raises(anthropic.RateLimitError) as info:
            await c.messages.create(**ask(model, f"limited {model}"))
        assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "rate_limit_error"
    # cut mid-stream: an `error` event in Anthropic's shape, after the first events
    sim_faults(sim.url, {"kind": "reset", "path": "/v1/messages", "after_chunks": 3, "times": 1})
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(herd.url + "/v1/messages", json={**ask(CLAUDE, "cut me"), "stream": True, "temperature": 0},
                            headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})
    blocks = [b for b in r.text.split("\n\n") if b]
    assert blocks[0].startswith("event: message_start") and blocks[-1].startswith("event: error")
    assert '"type":"error","error":{"type":' in blocks[-1]


async def test_sampled_policy_applies(herd, sim):
    sim_reset(sim.url, ttft_ms=300)
    c = client(herd, default_headers={"x-herd-sampled": "distinct"})
    await asyncio.gather(*[c.messages.create(**ask(CLAUDE, "sample me")) for _ in range(3)])
    assert calls(sim.url, CLAUDE) == 3  # no temperature: Anthropic's default is 1
    sim_reset(sim.url, ttft_ms=300)
    await asyncio.gather(*[c.messages.create(**ask(CLAUDE, "greedy me", temperature=0)) for _ in range(3)])
    assert calls(sim.url, CLAUDE) == 1


async def test_count_tokens_forwarded_or_estimated(herd, sim):
    sim_reset(sim.url)
    c = client(herd)
    counted = await c.messages.count_tokens(model=CLAUDE, messages=[{"role": "user", "content": "one two three"}])
    assert counted.input_tokens == 3  # the Anthropic upstream's own count
    assert sim_stats(sim.url, log=False)["by_path"]["/v1/messages/count_tokens"] == 1
    raw = await c.messages.with_raw_response.count_tokens(model=GPT,
                                                          messages=[{"role": "user", "content": "one two three"}])
    assert raw.headers["x-herd-token-count"] == "estimate" and (await raw.parse()).input_tokens > 3


async def test_semantic_mode_merges_a_paraphrased_final_user_message_only(sim):
    """As for chat: the final user message's text is the semantic message; the system
    prompt and everything else must be identical."""
    sim_reset(sim.url, ttft_ms=1500)
    with HerdServer(herd_config(sim.url, coalesce={"mode": "semantic"})) as herd:
        c = client(herd).messages.with_raw_response
        first = asyncio.create_task(c.create(**ask(CLAUDE, "How do I reset my password?", system="support desk",
                                                   temperature=0)))
        await asyncio.sleep(0.3)
        para = await c.create(**ask(CLAUDE, "how can I reset my password", system="support desk", temperature=0))
        other = await c.create(**ask(CLAUDE, "how can I reset my password", system="sales desk", temperature=0))
        lead = await first
        assert para.headers["x-herd"] == "follower" and float(para.headers["x-herd-similarity"]) > 0.5
        assert (await para.parse()).id == (await lead.parse()).id
        assert other.headers["x-herd"] == "leader"
        assert calls(sim.url, CLAUDE) == 2
        metrics = httpx.get(herd.url + "/metrics").text
        assert 'herd_api_requests_total{api="messages",outcome="follower"} 1.0' in metrics


async def test_cached_messages_replay_as_stream_and_json(sim):
    sim_reset(sim.url)
    with HerdServer(herd_config(sim.url, cache={"enabled": True})) as herd:
        c = client(herd)
        for model in (CLAUDE, GPT):
            request = ask(model, "cache me", temperature=0)
            first = await c.messages.create(**request)
            again = await c.messages.with_raw_response.create(**request)
            assert again.headers["x-herd"] == "cache" and (await again.parse()).content[0].text == first.content[0].text
            events, final = await streamed(c, **request)
            check_events(events, first.content[0].text)
            assert final.content[0].text == first.content[0].text
            assert calls(sim.url, model) == 1


async def test_messages_flights_are_shared_across_replicas_through_redis(sim):
    """A replica that mirrors another's flight rebuilds Messages events as typed events
    (a message_delta carries usage but is no usage-only chat chunk)."""
    import tempfile
    from pathlib import Path

    from tests.redis_servers import RedisServer, start_replicas

    sim_reset(sim.url, ttft_ms=1500, tokens_per_s=40, reply_tokens=6)
    sections = {
        "server": {"host": "127.0.0.1", "request_timeout_s": 30.0, "log_level": "warning"},
        "auth": {"hash_key": "replicas-share-this-hash-key"},
        "upstreams": {"claude": {"kind": "anthropic", "base_url": sim.url}},
        "routes": [{"model": "*", "upstream": "claude"}],
        "cache": {"enabled": False},
        "redis": {"timeout_s": 0.5, "lease_s": 3.0, "retry_after_s": 0.5},
    }
    with RedisServer() as redis_server, tempfile.TemporaryDirectory(prefix="herd-replicas-") as d:
        sections["redis"]["url"] = redis_server.url
        replicas = start_replicas(2, sections, Path(d))
        try:
            request = ask(CLAUDE, "one question, two replicas", temperature=0)
            clients = [anthropic.AsyncAnthropic(base_url=r.url, api_key="sk-ant-shared", max_retries=0, timeout=30)
                       for r in replicas]
            results = await asyncio.gather(*[streamed(clients[i % 2], **request) for i in range(6)],
                                           *[clients[i % 2].messages.create(**request) for i in range(4)])
        finally:
            for r in replicas:
                r.stop()
    assert calls(sim.url, CLAUDE) == 1
    text = results[-1].content[0].text
    assert text.startswith("echo: one question, two replicas")
    for events, final in results[:6]:
        check_events(events, text)
        assert final.stop_reason == "end_turn" and final.usage.output_tokens == 6


# -- translation never fails with herd's own error ------------------------------------------

_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=3),
                  st.sampled_from(["text", "image", "tool_use", "tool_result", "url", "base64", "image/png", "auto",
                                   "any", "tool", "none", "disabled", "enabled", "custom"]))
_KEYS = st.sampled_from(["type", "text", "source", "url", "data", "media_type", "id", "name", "input", "tool_use_id",
                         "content", "is_error", "cache_control", "description", "input_schema",
                         "disable_parallel_tool_use", "user_id", "budget_tokens"])
_VALUE = st.recursive(_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(_KEYS, inner, max_size=4)), max_leaves=12)
_OBJECT = st.dictionaries(_KEYS, _VALUE, max_size=4)
_BLOCK = _OBJECT.map(lambda d: d if "type" in d else {"type": "text", **d})
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                  "content": st.one_of(st.text(max_size=3), st.lists(_BLOCK, max_size=3))})
_BODY = st.fixed_dictionaries(
    {"model": st.just("m"), "max_tokens": st.just(5), "messages": st.lists(_MESSAGE, min_size=1, max_size=3)},
    optional={"system": st.one_of(st.text(max_size=3), st.lists(_BLOCK, max_size=2)),
              "tools": st.lists(_OBJECT, max_size=2), "tool_choice": _OBJECT, "metadata": _OBJECT,
              "thinking": _OBJECT, "service_tier": _VALUE, "stop_sequences": st.lists(st.text(max_size=2), max_size=2)})


@settings(max_examples=int(os.environ.get("HERD_FUZZ_CASES", "300")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(_BODY)
def test_any_valid_messages_body_translates_or_is_a_400(body):
    """Shapes inside blocks, tools and options that herd does not validate (Anthropic does)
    are the client's error when herd translates them: a 400, never a 500. Before the fix,
    69 of 3,000 generated bodies raised TypeError or AttributeError (a 500)."""
    try:
        req = parse_messages(orjson.dumps(body))
    except InvalidRequest:
        return
    try:
        chat_request_of(req.body)
    except InvalidRequest:
        pass


@pytest.mark.parametrize("bad", [
    b'{"type":"content_block_delta","delta":{"type":"text_delta","text":"x"}}',  # no index
    b'{"type":"content_block_delta","index":0,"delta":"x"}',  # a delta that is a string
    b'{"type":"content_block_start","index":0,"content_block":[]}',
    b'{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":7}',
])
async def test_a_malformed_anthropic_event_is_a_502_never_a_500(bad):
    from aiohttp import web

    start = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","type":"message",'
             b'"role":"assistant","model":"c","content":[],"usage":{"input_tokens":1,"output_tokens":0}}}\n\n')

    async def messages(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        stop = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
        await resp.write(start + b"event: x\ndata: " + bad + b"\n\n" + stop)
        return resp

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        with HerdServer(herd_config(f"http://127.0.0.1:{port}")) as herd:
            with pytest.raises(anthropic.APIStatusError) as info:
                await client(herd).messages.create(**ask(CLAUDE, "malformed", temperature=0))
            assert info.value.status_code == 502
            assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "api_error"
    finally:
        await runner.cleanup()
