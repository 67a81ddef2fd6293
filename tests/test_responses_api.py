"""POST /v1/responses through herd: the official openai SDK -> herd -> the simulator.

One flight per identical request, stream and non-stream together; the typed events replayed
in order to every stream waiter (late joiners from the first); the final response object to
every non-stream waiter; never shared across tenants, organizations, projects, models or
output-affecting fields; background and conversation calls never shared; errors in
OpenAI's shape."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from benchmarks.simulator import ThreadedSimulator
from tests.harness import HerdServer, herd_settings, sim_faults, sim_reset, sim_stats

PATH = "/v1/responses"


def calls(sim_url: str, path: str = PATH) -> int:
    return int(sim_stats(sim_url, log=False)["by_path"].get(path, 0))


def client(herd, key: str = "sk-test", **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key=key, max_retries=0, timeout=30, **kw)


@pytest.fixture(scope="module")
def sim():
    with ThreadedSimulator() as s:
        yield s


@pytest.fixture(scope="module")
def herd(sim):
    with HerdServer(herd_settings(sim.url, server={"request_timeout_s": 20})) as h:
        yield h


async def collect(stream) -> list:
    return [event async for event in stream]


def assert_whole_stream(events: list, text: str) -> None:
    """Every event once, in the upstream's order, from response.created to response.completed."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == text
    assert events[-1].response.output_text == text


async def test_100_identical_calls_half_streamed_make_one_upstream_call(herd, sim):
    sim_reset(sim.url, ttft_ms=400, tokens_per_s=200, reply_tokens=12)
    c = client(herd)
    ask = {"model": "gpt-4o-mini", "input": "one flight for a hundred", "instructions": "answer briefly"}

    async def streamed():
        return await collect(await c.responses.create(**ask, stream=True))

    results = await asyncio.gather(*[streamed() if i % 2 else c.responses.create(**ask) for i in range(100)])
    assert calls(sim.url) == 1
    whole = [r for r in results if not isinstance(r, list)]
    streams = [r for r in results if isinstance(r, list)]
    assert len(whole) == len(streams) == 50
    text = whole[0].output_text
    assert text.startswith("echo: one flight for a hundred")
    assert {r.id for r in whole} == {whole[0].id}  # one stored response, shared
    assert {r.output_text for r in whole} == {text}
    for events in streams:
        assert_whole_stream(events, text)
        assert events[-1].response.id == whole[0].id
    assert whole[0].usage.output_tokens == 12


async def test_a_late_stream_joiner_gets_every_event_from_the_first(herd, sim):
    sim_reset(sim.url, tokens_per_s=20, reply_tokens=20)  # about a second of stream
    c = client(herd)
    ask = {"model": "gpt-4o-mini", "input": "join me late", "stream": True}
    first = await c.responses.create(**ask)
    early = [await anext(aiter(first)) for _ in range(5)]  # the flight is well under way
    assert early[-1].type == "response.output_text.delta"
    late = await asyncio.gather(*[collect(await c.responses.create(**ask)) for _ in range(5)])
    rest = await collect(first)
    assert calls(sim.url) == 1
    text = rest[-1].response.output_text
    assert_whole_stream(early + rest, text)
    for events in late:
        assert_whole_stream(events, text)
        assert [e.model_dump() for e in events] == [e.model_dump() for e in early + rest]


async def test_a_stream_led_flight_gives_non_stream_joiners_the_final_response(herd, sim):
    sim_reset(sim.url, tokens_per_s=50, reply_tokens=10)
    c = client(herd)
    ask = {"model": "gpt-4o-mini", "input": "stream first, then json"}
    stream = await c.responses.create(**ask, stream=True)
    head = await anext(aiter(stream))
    assert head.type == "response.created"
    whole = await c.responses.create(**ask)
    events = [head, *await collect(stream)]
    assert calls(sim.url) == 1
    assert whole.id == events[-1].response.id and whole.output_text == events[-1].response.output_text
    assert whole.status == "completed" and whole.usage.total_tokens > 0


def variants() -> list[tuple[str, dict, dict]]:
    """(what differs, create() arguments, client options): each must get its own flight."""
    base = {"model": "gpt-4o-mini", "input": "isolate me"}
    fields = [
        ("another model", {"model": "gpt-4o"}),
        ("instructions", {"instructions": "be terse"}),
        ("temperature", {"temperature": 0.2}),
        ("top_p", {"top_p": 0.5}),
        ("max_output_tokens", {"max_output_tokens": 40}),
        ("text format", {"text": {"format": {"type": "json_object"}}}),
        ("reasoning", {"reasoning": {"effort": "low"}}),
        ("tools", {"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}),
        ("tool_choice", {"tool_choice": "none"}),
        ("parallel_tool_calls", {"parallel_tool_calls": False}),
        ("truncation", {"truncation": "auto"}),
        ("include", {"include": ["message.output_text.logprobs"]}),
        ("previous_response_id", {"previous_response_id": "resp_abc"}),
        ("store", {"store": False}),
        ("metadata", {"metadata": {"run": "7"}}),
        ("an unknown field", {"extra_body": {"herd_unknown": 1}}),
        ("another input", {"input": "isolate me, please"}),
        ("an earlier turn", {"input": [{"role": "user", "content": "before"},
                                       {"role": "user", "content": "isolate me"}]}),
    ]
    out = [("the base", base, {})]
    out += [(name, {**base, **change}, {}) for name, change in fields]
    out += [
        ("another tenant", base, {"key": "sk-other"}),
        ("another organization", base, {"organization": "org-b"}),
        ("another project", base, {"project": "proj-b"}),
    ]
    return out


async def test_isolation_per_tenant_org_project_model_and_every_output_affecting_field(herd, sim):
    sim_reset(sim.url, ttft_ms=600)
    cases = variants()

    async def ask(args: dict, options: dict, stream: bool):
        c = client(herd, **options)
        if stream:
            return (await collect(await c.responses.create(**args, stream=True)))[-1].response
        return await c.responses.create(**args)

    # each variant twice at once (one stream, one not): a pair shares, variants never do
    answers = await asyncio.gather(*[ask(args, options, stream) for _, args, options in cases
                                     for stream in (False, True)])
    assert calls(sim.url) == len(cases)
    ids = [a.id for a in answers]
    for i, (name, _, _) in enumerate(cases):
        assert ids[2 * i] == ids[2 * i + 1], name
    assert len(set(ids)) == len(cases)


async def test_equivalent_inputs_share_a_flight(herd, sim):
    """A string input is one user message; one input_text part is its text."""
    sim_reset(sim.url, ttft_ms=400)
    c = client(herd)
    forms = [
        "same question",
        [{"role": "user", "content": "same question"}],
        [{"type": "message", "role": "user", "content": "same question"}],
        [{"role": "user", "content": [{"type": "input_text", "text": "same question"}]}],
    ]
    answers = await asyncio.gather(*[c.responses.create(model="gpt-4o-mini", input=f) for f in forms])
    assert calls(sim.url) == 1 and len({a.id for a in answers}) == 1


@pytest.mark.parametrize("change", [{"background": True}, {"conversation": "conv_123"}])
async def test_background_and_conversation_calls_are_never_shared(herd, sim, change):
    sim_reset(sim.url, ttft_ms=300)
    c = client(herd)
    answers = await asyncio.gather(*[
        c.responses.with_raw_response.create(model="gpt-4o-mini", input="mutating", **change) for _ in range(4)
    ])
    assert calls(sim.url) == 4
    assert {a.headers["x-herd"] for a in answers} == {"bypass"}
    assert len({a.parse().id for a in answers}) == 4


async def test_sampled_policy_distinct_gives_each_its_own_draw(herd, sim):
    sim_reset(sim.url, ttft_ms=300)
    c = client(herd)
    hot = [c.responses.with_raw_response.create(model="gpt-4o-mini", input="draw", temperature=1,
                                                extra_headers={"x-herd-sampled": "distinct"}) for _ in range(5)]
    cold = [c.responses.create(model="gpt-4o-mini", input="draw", temperature=0,
                               extra_headers={"x-herd-sampled": "distinct"}) for _ in range(5)]
    answers = await asyncio.gather(*hot, *cold)
    assert calls(sim.url) == 5 + 1
    shared = await asyncio.gather(*[c.responses.with_raw_response.create(model="gpt-4o-mini", input="draw share")
                                    for _ in range(3)])
    assert calls(sim.url) == 5 + 1 + 1
    roles = sorted(a.headers["x-herd"] for a in shared)
    assert roles == ["follower", "follower", "leader"]
    assert [a.headers.get("x-herd-shared-sample") for a in shared if a.headers["x-herd"] == "follower"] == ["1", "1"]
    assert len({a.parse().id for a in answers[:5]}) == 5


async def test_bad_requests_are_openai_400s(herd, sim):
    c = client(herd)
    for args, param in [
        ({"model": "gpt-4o-mini", "input": 3}, "input"),
        ({"model": "gpt-4o-mini", "input": "x", "temperature": 3}, "temperature"),
        ({"model": "gpt-4o-mini", "input": "x", "max_output_tokens": "many"}, "max_output_tokens"),
        ({"model": "gpt-4o-mini", "input": ["x"]}, "input[0]"),
        ({"model": "gpt-4o-mini", "input": "x", "tools": {"a": 1}}, "tools"),
        ({"input": "x"}, "model"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            await c.responses.create(**args)
        assert info.value.body["param"] == param
        assert info.value.body["type"] == "invalid_request_error"
    async with httpx.AsyncClient() as http:
        r = await http.post(herd.url + PATH, content=b'{"model": "m", "input": ')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert calls(sim.url) == 0


async def test_upstream_errors_in_openai_shape_stream_and_not(herd, sim):
    c = client(herd)
    sim_faults(sim.url, {"kind": "status", "status": 400, "path": PATH, "times": 1,
                         "body": {"error": {"message": "bad tool", "type": "invalid_request_error",
                                            "param": "tools", "code": None}}})
    with pytest.raises(openai.BadRequestError) as info:
        await c.responses.create(model="gpt-4o-mini", input="upstream says no")
    assert info.value.body["message"] == "bad tool"
    # cut mid-stream: the stream ends with OpenAI's own `error` event, after what was sent
    sim_faults(sim.url, {"kind": "reset", "after_chunks": 4, "path": PATH, "times": 1})
    events = await collect(await c.responses.create(model="gpt-4o-mini", input="cut me", stream=True))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress",
                                            "response.output_item.added", "response.content_part.added"]
    assert events[-1].type == "error" and events[-1].message
    assert "response.completed" not in [e.type for e in events]


def test_an_anthropic_route_refuses_the_responses_api_with_a_clear_400(sim):
    settings = herd_settings(sim.url, upstreams={"claude": {"kind": "anthropic", "base_url": sim.url}},
                             routes=[{"model": "claude-*", "upstream": "claude"}, {"model": "*", "upstream": "sim"}])
    with HerdServer(settings) as herd:
        c = openai.OpenAI(base_url=herd.url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            c.responses.create(model="claude-3-5-haiku-latest", input="hello")
        assert info.value.body["code"] == "unsupported_api" and info.value.body["param"] == "model"
        assert "Responses API" in info.value.body["message"] and "anthropic" in info.value.body["message"]
        assert c.responses.create(model="gpt-4o-mini", input="hello").output_text == "echo: hello"
    assert calls(sim.url, "/v1/messages") == 0


async def test_cached_responses_replay_stream_and_json_and_count_in_metrics(sim):
    sim_reset(sim.url)
    with HerdServer(herd_settings(sim.url, cache={"enabled": True})) as herd:
        c = client(herd)
        ask = {"model": "gpt-4o-mini", "input": "cache this response"}
        first = await collect(await c.responses.create(**ask, stream=True))
        again = await c.responses.with_raw_response.create(**ask, stream=True)
        assert again.headers["x-herd"] == "cache"
        replay = await collect(again.parse())
        whole = await c.responses.with_raw_response.create(**ask)
        assert whole.headers["x-herd"] == "cache"
        assert calls(sim.url) == 1
        assert [e.model_dump() for e in replay] == [e.model_dump() for e in first]
        assert whole.parse().id == first[-1].response.id
        metrics = httpx.get(herd.url + "/metrics").text
        assert 'herd_api_requests_total{api="responses",outcome="leader"} 1.0' in metrics
        assert 'herd_api_requests_total{api="responses",outcome="cache"} 2.0' in metrics
        assert 'herd_upstream_calls_total{upstream="sim"} 1.0' in metrics
        # usage is accounted from the response's own usage (input/output tokens)
        assert 'herd_tokens_total{kind="completion",model="gpt-4o-mini",outcome="saved"}' in metrics


async def test_replicas_share_one_responses_flight_through_redis(sim):
    """Two replicas sharing flights through Redis: the second replica's stream and JSON
    clients mirror the first's flight (1 upstream call), events whole and in order."""
    from tests.redis_servers import RedisServer

    sim_reset(sim.url, ttft_ms=300, tokens_per_s=20, reply_tokens=20)  # a second of stream
    with RedisServer() as redis:
        def settings():
            return herd_settings(sim.url, auth={"hash_key": "responses-replicas"},
                                 redis={"url": redis.url, "timeout_s": 0.5})
        with HerdServer(settings()) as a, HerdServer(settings()) as b:
            ask = {"model": "gpt-4o-mini", "input": "across replicas"}
            mirrored = client(b).responses.with_raw_response  # made first: a client takes a while to make
            # a's flight has its first event, so it is claimed in Redis, before b's requests arrive
            first = asyncio.ensure_future(collect(await client(a).responses.create(**ask, stream=True)))
            streamed, whole = await asyncio.gather(mirrored.create(**ask, stream=True), mirrored.create(**ask))
            events = await collect(streamed.parse())
            leader = await first
            assert calls(sim.url) == 1
            assert streamed.headers["x-herd"] == whole.headers["x-herd"] == "follower"
            text = leader[-1].response.output_text
            assert_whole_stream(leader, text)
            assert_whole_stream(events, text)
            assert whole.parse().id == leader[-1].response.id


async def test_a_replica_taking_over_a_responses_stream_splices_only_an_identical_prefix():
    from proxy.chunks import Chunk
    from proxy.coalescer import Flight
    from proxy.sharing import LeaderLost, Splice

    def event(seq: int, delta: str, item: str = "msg_a") -> Chunk:
        return Chunk({"type": "response.output_text.delta", "sequence_number": seq, "item_id": item,
                      "output_index": 0, "content_index": 0, "delta": delta})

    flight = Flight(["k"])
    first = Splice(flight)
    for seq, word in enumerate(("a ", "b ")):
        first.publish(event(seq, word))
    streaming = aiter(flight.follow())
    assert len(await anext(streaming)) == 2  # a stream waiter was sent "a b"
    same = Splice(flight)  # another call's events: other ids, the same answer
    for seq, word in enumerate(("a ", "b ", "c ")):
        same.publish(event(seq, word, item="msg_b"))
    assert [c.data["delta"] for c in flight.chunks] == ["a ", "b ", "c "] and flight.rewinds == 0
    assert [c.data["delta"] for c in await anext(streaming)] == ["c "]
    different = Splice(flight)  # a different answer is never spliced onto what was sent
    different.extend([event(0, "a "), event(1, "x ")])
    assert flight.rewinds == 1 and [c.data["delta"] for c in flight.chunks] == ["a ", "x "]
    with pytest.raises(LeaderLost):
        await anext(streaming)


async def test_semantic_mode_merges_paraphrased_final_user_inputs_only(sim):
    """As for chat: the final user input is the semantic message; instructions and earlier
    input items must be identical."""
    sim_reset(sim.url, ttft_ms=1500)
    settings = herd_settings(sim.url, coalesce={"mode": "semantic"}, server={"request_timeout_s": 30})
    with HerdServer(settings) as herd:
        c = client(herd).responses.with_raw_response
        ask = {"model": "gpt-4o-mini", "instructions": "support desk"}
        first = asyncio.create_task(c.create(**ask, input="How do I reset my password?"))
        await asyncio.sleep(0.3)
        para = await c.create(**ask, input=[{"role": "user", "content": "how can I reset my password"}])
        other = await c.create(model="gpt-4o-mini", instructions="sales desk", input="how can I reset my password")
        lead = await first
        assert para.headers["x-herd"] == "follower" and float(para.headers["x-herd-similarity"]) > 0.5
        assert para.parse().id == lead.parse().id
        assert other.headers["x-herd"] == "leader"  # other instructions: never merged
        assert calls(sim.url) == 2


@pytest.mark.parametrize("leader_streams", [True, False])
async def test_a_response_cut_at_max_output_tokens_ends_with_response_incomplete(herd, sim, leader_streams):
    sim_reset(sim.url, ttft_ms=300, reply_tokens=10)
    c = client(herd)
    ask = {"model": "gpt-4o-mini", "input": f"cut short {leader_streams}", "max_output_tokens": 3}

    async def streamed():
        return await collect(await c.responses.create(**ask, stream=True))

    first = asyncio.create_task(streamed() if leader_streams else c.responses.create(**ask))
    await asyncio.sleep(0.1)
    events, whole = await asyncio.gather(streamed(), c.responses.create(**ask))
    await first
    assert calls(sim.url) == 1
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.output_text == events[-1].response.output_text == "echo: cut short "


def test_an_upstream_error_event_keeps_its_message_and_code():
    from proxy.apis.responses import RESPONSES, RESPONSES_WIRE
    from proxy.errors import UpstreamError
    from proxy.sse import EventParser

    raw = (b'event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{}}\n\n'
           b'event: error\ndata: {"type":"error","sequence_number":1,"code":"server_error",'
           b'"message":"The model failed","param":null}\n\n')
    with pytest.raises(UpstreamError) as info:
        RESPONSES_WIRE.events(EventParser().feed(raw), "sim")
    assert info.value.body()["error"]["message"] == "The model failed"
    assert info.value.body()["error"]["code"] == "server_error"
    # and waiters whose stream had started get OpenAI's own error event with it
    event = RESPONSES.stream_error(info.value)
    assert event.startswith(b"event: error\ndata: ")
    assert b'"message":"The model failed"' in event and b'"code":"server_error"' in event


async def test_a_function_call_answer_is_shared_by_stream_and_json_waiters(herd, sim):
    sim_reset(sim.url, ttft_ms=400)
    c = client(herd)
    ask = {"model": "gpt-4o-mini", "input": "please call tool lookup",
           "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]}
    whole = asyncio.create_task(c.responses.create(**ask))  # leads: the upstream answers in one piece
    await asyncio.sleep(0.1)
    events = await collect(await c.responses.create(**ask, stream=True))
    answer = await whole
    assert calls(sim.url) == 1
    call = answer.output[0]
    assert call.type == "function_call" and call.name == "lookup"
    assert call.arguments == '{"q":"please call tool lookup"}'
    assert [e.sequence_number for e in events] == list(range(len(events)))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == call.arguments
    assert events[-1].type == "response.completed" and events[-1].response.output[0].call_id == call.call_id
