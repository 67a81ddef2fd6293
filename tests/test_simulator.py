"""The upstream simulator, driven by the official SDKs and raw HTTP."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import anthropic
import openai
import orjson
import pytest

from benchmarks.simulator import (
    SimulatorServer,
    ThreadedSimulator,
    expected_embedding,
    expected_text,
    main,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "look something up",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}},
]
A_TOOLS = [
    {"name": "search", "description": "search",
     "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}},
    {"name": "other", "input_schema": {"type": "object"}},
]


def oai(sim: SimulatorServer, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, **kw)


def ant(sim: SimulatorServer, **kw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=sim.url, api_key="x", max_retries=0, **kw)


def chat(text: str, **kw) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **kw}


async def wait_for(pred, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------- the reply rule


def test_expected_text_rule():
    body = {
        "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "image_url"},
                                         {"type": "text", "text": "big  world"}]},
        ]
    }
    assert expected_text(body) == "echo: hello big world"
    assert expected_text(body, {"reply_tokens": 6}) == "echo: hello big world lorem ipsum"
    assert expected_text(body, {"reply_tokens": 2}) == "echo: hello big world"
    assert expected_text({**body, "max_tokens": 2}) == "echo: hello "
    assert expected_text({**body, "max_completion_tokens": 1, "max_tokens": 9}) == "echo: "
    assert expected_text({**body, "stop": ["world", "big"]}) == "echo: hello "
    assert expected_text({**body, "stop_sequences": ["wor"]}) == "echo: hello big "
    # a tool call has no text; a request whose last message is a tool result gets text
    assert expected_text({**body, "messages": [{"role": "user", "content": "call tool"}], "tools": TOOLS}) == ""
    tool_turn = [{"role": "user", "content": "call tool"}, {"role": "tool", "content": "r"}]
    assert expected_text({"messages": tool_turn, "tools": TOOLS}) == "echo: call tool"
    assert expected_embedding("a", 4) == expected_embedding("a", 4) != expected_embedding("b", 4)
    assert abs(sum(v * v for v in expected_embedding("a", 16)) - 1) < 1e-5


# ----------------------------------------------------------------- OpenAI


async def test_openai_non_stream_and_n():
    async with SimulatorServer(reply_tokens=6) as sim:
        client = oai(sim)
        body = chat("what is up", n=3)
        r = await client.chat.completions.create(**body)
        want = expected_text(body, sim.settings)
        assert want == "echo: what is up lorem ipsum"
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert all(c.message.content == want and c.finish_reason == "stop" for c in r.choices)
        assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
        assert r.model == "gpt-4o-mini" and r.system_fingerprint
        assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 18
        assert r.usage.total_tokens == 21

        r = await client.chat.completions.create(**chat("one two three four"), max_completion_tokens=2)
        assert r.choices[0].message.content == "echo: one " and r.choices[0].finish_reason == "length"
        await client.close()


async def test_openai_stream_include_usage():
    async with SimulatorServer(reply_tokens=5) as sim:
        client = oai(sim)
        body = chat("stream me")
        chunks = [
            c
            async for c in await client.chat.completions.create(
                **body, stream=True, stream_options={"include_usage": True}
            )
        ]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected_text(body, sim.settings) == "echo: stream me lorem ipsum"
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.usage is None for c in chunks[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
        # one token per chunk
        contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert contents == ["echo: ", "stream ", "me ", "lorem ", "ipsum"]

        # without include_usage there is no usage chunk
        chunks = [c async for c in await client.chat.completions.create(**body, stream=True, n=2)]
        assert all(c.usage is None and c.choices for c in chunks)
        for i in (0, 1):
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
            assert got == "echo: stream me lorem ipsum"
        await client.close()


async def test_openai_tool_call_stream_and_non_stream():
    async with SimulatorServer() as sim:
        client = oai(sim)
        body = chat("please call tool for weather", tools=TOOLS)
        r = await client.chat.completions.create(**body)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
        assert msg.tool_calls[0].function.name == "lookup"
        assert orjson.loads(msg.tool_calls[0].function.arguments) == {"q": "please call tool for weather"}
        assert msg.tool_calls[0].id.startswith("call_")

        frags, names, finish = [], [], None
        async for c in await client.chat.completions.create(**body, stream=True):
            if not c.choices:
                continue
            for tc in c.choices[0].delta.tool_calls or []:
                if tc.function.name:
                    names.append(tc.function.name)
                if tc.function.arguments:
                    frags.append(tc.function.arguments)
            finish = c.choices[0].finish_reason or finish
        assert names == ["lookup"] and len(frags) > 1 and finish == "tool_calls"
        assert orjson.loads("".join(frags)) == {"q": "please call tool for weather"}

        # without "call tool" the same request answers text
        r = await client.chat.completions.create(**chat("no tools needed", tools=TOOLS))
        assert r.choices[0].message.content == "echo: no tools needed"
        await client.close()


async def test_openai_other_endpoints_and_errors():
    async with SimulatorServer(models=["m1", "m2"], embedding_dim=6) as sim:
        client = oai(sim)
        assert [m.id for m in (await client.models.list()).data] == ["m1", "m2"]
        e = await client.embeddings.create(model="emb", input=["a b", "c"])  # SDK asks for base64
        assert [d.index for d in e.data] == [0, 1]
        assert e.data[0].embedding == pytest.approx(expected_embedding("a b", 6))
        e = await client.embeddings.create(model="emb", input="c", encoding_format="float", dimensions=3)
        assert e.data[0].embedding == pytest.approx(expected_embedding("c", 3))
        c = await client.completions.create(model="m1", prompt="legacy prompt")
        assert c.choices[0].text == "echo: legacy prompt"
        stream = await client.completions.create(model="m1", prompt="p q", stream=True)
        got = "".join([x.choices[0].text async for x in stream if x.choices])
        assert got == "echo: p q"

        async with aiohttp.ClientSession() as http:
            async with http.post(sim.url + "/v1/nope", json={}) as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_url"
            async with http.post(sim.url + "/v1/chat/completions", data=b"{not json") as r:
                assert r.status == 400 and "message" in (await r.json())["error"]
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="x", messages=[])
        await client.close()


# ----------------------------------------------------------------- Anthropic


async def test_anthropic_non_stream_and_stream():
    async with SimulatorServer(reply_tokens=6) as sim:
        client = ant(sim)
        body = {
            "model": "claude-x",
            "max_tokens": 100,
            "system": [{"type": "text", "text": "sys prompt"}],
            "messages": [
                {"role": "user", "content": "earlier"},
                {"role": "assistant", "content": "sure"},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ignored"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
                        {"type": "text", "text": "now answer"},
                    ],
                },
            ],
        }
        want = expected_text(body, sim.settings)
        assert want == "echo: now answer lorem ipsum dolor"
        m = await client.messages.create(**body)
        assert m.id.startswith("msg_") and m.model == "claude-x" and m.role == "assistant"
        assert m.content[0].type == "text" and m.content[0].text == want
        assert m.stop_reason == "end_turn" and m.stop_sequence is None
        assert m.usage.input_tokens == 6 and m.usage.output_tokens == 6  # 2 system + 4 message words

        async with client.messages.stream(**body) as stream:
            pieces = [t async for t in stream.text_stream]
            final = await stream.get_final_message()
        assert len(pieces) == 6 and "".join(pieces) == want
        assert final.content[0].text == want and final.stop_reason == "end_turn"
        assert final.usage.output_tokens == 6 and final.usage.input_tokens == 6

        # raw event order
        async with aiohttp.ClientSession() as http:
            hdrs = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
            async with http.post(sim.url + "/v1/messages", json={**body, "stream": True}, headers=hdrs) as r:
                raw = (await r.read()).decode()
        names = [line[7:] for line in raw.splitlines() if line.startswith("event: ")]
        assert names[:3] == ["message_start", "content_block_start", "ping"]
        assert names[3:-3] == ["content_block_delta"] * 6
        assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]

        m = await client.messages.create(**{**body, "max_tokens": 2})
        assert m.content[0].text == "echo: now " and m.stop_reason == "max_tokens"
        m = await client.messages.create(**body, stop_sequences=["zzz", "ipsum"])
        assert m.content[0].text == "echo: now answer lorem " and m.stop_reason == "stop_sequence"
        assert m.stop_sequence == "ipsum"
        await client.close()


async def test_anthropic_tool_use():
    async with SimulatorServer() as sim:
        client = ant(sim)
        body = {
            "model": "claude-x",
            "max_tokens": 50,
            "tools": A_TOOLS,
            "messages": [{"role": "user", "content": "Call tool: find cats"}],
        }
        m = await client.messages.create(**body)
        assert m.stop_reason == "tool_use" and m.content[0].type == "tool_use"
        assert m.content[0].name == "search" and m.content[0].input == {"q": "Call tool: find cats"}
        assert m.content[0].id.startswith("toolu_")
        async with client.messages.stream(**body) as stream:
            final = await stream.get_final_message()
        assert final.stop_reason == "tool_use" and final.content[0].input == {"q": "Call tool: find cats"}
        # the tool result turn gets text back
        body["messages"] += [
            {"role": "assistant", "content": [m.content[0].model_dump()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": m.content[0].id, "content": "3 cats"}]},
        ]
        m = await client.messages.create(**body)
        assert m.stop_reason == "end_turn" and m.content[0].text == "echo:"
        await client.close()


async def test_anthropic_validation_and_auth():
    async with SimulatorServer() as sim:
        good = {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        hdrs = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
        async with aiohttp.ClientSession() as http:

            async def post(body, headers=hdrs):
                async with http.post(sim.url + "/v1/messages", json=body, headers=headers) as r:
                    return r.status, await r.json()

            status, err = await post({k: v for k, v in good.items() if k != "max_tokens"})
            assert status == 400 and err["type"] == "error"
            assert err["error"]["type"] == "invalid_request_error" and "max_tokens" in err["error"]["message"]
            for bad in (
                {**good, "max_tokens": "5"},
                {**good, "messages": []},
                {**good, "messages": [{"role": "system", "content": "x"}]},
                {**good, "system": 5},
                {**good, "model": None},
            ):
                assert (await post(bad))[0] == 400, bad
            status, err = await post(good, {"anthropic-version": "2023-06-01"})
            assert status == 401 and err["error"]["type"] == "authentication_error"
            status, err = await post(good, {"x-api-key": "k"})
            assert status == 400 and "anthropic-version" in err["error"]["message"]
            assert (await post(good))[0] == 200
        # the SDK maps them to its exceptions
        client = ant(sim)
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model="c", max_tokens=5, messages=[])
        await client.close()
        assert sim.stats()["calls"] == 10


# ----------------------------------------------------------------- faults


async def test_fault_status_with_retry_after_and_match():
    async with SimulatorServer() as sim:
        client = oai(sim)
        sim.add_faults([{"kind": "status", "status": 429, "headers": {"Retry-After": "2"}, "match": "boom",
                         "times": 2}])
        r = await client.chat.completions.create(**chat("fine"))  # does not match
        assert r.choices[0].message.content == "echo: fine"
        for _ in range(2):
            with pytest.raises(openai.RateLimitError) as ei:
                await client.chat.completions.create(**chat("boom now"), stream=True)
            assert ei.value.response.headers["retry-after"] == "2"
            assert ei.value.status_code == 429
        r = await client.chat.completions.create(**chat("boom now"))  # rule used up
        assert r.choices[0].message.content == "echo: boom now"

        sim.add_faults({"kind": "status", "status": 529, "path": "/v1/messages"})
        a = ant(sim)
        with pytest.raises(anthropic.APIStatusError) as ei:
            await a.messages.create(model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert ei.value.status_code == 529 and ei.value.body["error"]["type"] == "overloaded_error"
        stats = sim.stats()
        assert stats["calls"] == 5 and stats["faults_applied"] == 3 and stats["faults_pending"] == 0
        await client.close()
        await a.close()


async def test_fault_reset():
    async with SimulatorServer() as sim:
        client = oai(sim)
        sim.add_faults([{"kind": "reset", "after_chunks": 2}, {"kind": "reset"}])
        got = []
        with pytest.raises(openai.APIConnectionError):
            async for c in await client.chat.completions.create(**chat("a b c d"), stream=True):
                got.append(c.choices[0].delta.content)
        assert got == ["", "echo: "]  # the role chunk and one token, then the reset
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(**chat("x"))
        r = await client.chat.completions.create(**chat("x"))
        assert r.choices[0].message.content == "echo: x"
        stats = sim.stats()
        assert stats["calls"] == 3 and stats["disconnects"] == 0 and stats["active"] == 0
        await client.close()


async def test_fault_stall_client_timeout_counts_disconnect():
    async with SimulatorServer() as sim:
        client = oai(sim, timeout=0.3)
        sim.add_faults([{"kind": "stall", "after_chunks": 1, "stall_s": 30}])
        got = []
        t0 = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            async for c in await client.chat.completions.create(**chat("slow"), stream=True):
                got.append(c.choices[0].delta.content)
        assert got == [""] and time.monotonic() - t0 < 5
        await wait_for(lambda: sim.stats()["disconnects"] == 1)
        assert sim.stats()["active"] == 0

        # a short stall resumes the normal answer
        sim.add_faults([{"kind": "stall", "stall_s": 0.05}])
        client2 = oai(sim)
        r = await client2.chat.completions.create(**chat("later"))
        assert r.choices[0].message.content == "echo: later"
        await client.close()
        await client2.close()


# ----------------------------------------------------------------- stats, metrics, control


async def test_stats_log_and_disconnects():
    async with SimulatorServer(tokens_per_s=50, reply_tokens=100) as sim:
        client = oai(sim, default_headers={"X-Tenant": "t1"})
        stream = await client.chat.completions.create(**chat("cut me"), stream=True)
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:
                break
        await stream.close()
        await wait_for(lambda: sim.stats()["disconnects"] == 1)
        sim.update_settings(tokens_per_s=0)
        await client.chat.completions.create(**chat("whole"))
        stats = sim.stats()
        assert stats["calls"] == 2 and stats["by_path"] == {"/v1/chat/completions": 2}
        assert stats["disconnects"] == 1 and stats["active"] == 0 and stats["max_active"] >= 1
        first, second = stats["log"]
        assert first["stream"] is True and second["stream"] is False
        assert first["model"] == "gpt-4o-mini" and second["body"]["messages"][0]["content"] == "whole"
        assert first["headers"]["x-tenant"] == "t1" and first["headers"]["authorization"] == "Bearer x"
        assert first["t"] <= second["t"] <= time.monotonic()

        async with aiohttp.ClientSession() as http:
            async with http.get(sim.url + "/_sim/stats") as r:
                assert (await r.json())["calls"] == 2
            async with http.post(sim.url + "/_sim/settings", json={"ttft_ms": 7}) as r:
                assert (await r.json())["ttft_ms"] == 7
            async with http.post(sim.url + "/_sim/settings", json={"bogus": 1}) as r:
                assert r.status == 400
            async with http.post(sim.url + "/_sim/faults", json=[{"kind": "status"}]) as r:
                assert (await r.json())["pending"] == 1
            async with http.post(sim.url + "/_sim/reset") as r:
                assert r.status == 200
            async with http.get(sim.url + "/_sim/stats?log=0") as r:
                s = await r.json()
        assert s["calls"] == 0 and s["disconnects"] == 0 and s["faults_pending"] == 0 and "log" not in s
        assert sim.settings["ttft_ms"] == 0 and sim.settings["tokens_per_s"] == 50
        await client.close()


async def test_metrics_and_max_running_queue():
    async with SimulatorServer(kv_cache_usage=0.25, waiting=3, max_running=1, ttft_ms=150, models=["llama"]) as sim:
        client = oai(sim)

        async def metrics() -> dict[str, float]:
            async with aiohttp.ClientSession() as http, http.get(sim.url + "/metrics") as r:
                text = await r.text()
            out = {}
            for line in text.splitlines():
                if line and not line.startswith("#"):
                    name, value = line.rsplit(" ", 1)
                    out[name] = float(value)
            return out

        m = await metrics()
        assert m['vllm:kv_cache_usage_perc{model_name="llama"}'] == 0.25
        assert m['vllm:gpu_cache_usage_perc{model_name="llama"}'] == 0.25
        assert m['vllm:num_requests_waiting{model_name="llama"}'] == 3
        assert m['vllm:num_requests_running{model_name="llama"}'] == 0

        t0 = time.monotonic()
        tasks = [asyncio.create_task(client.chat.completions.create(**chat(f"q{i}"))) for i in range(3)]
        await wait_for(lambda: sim.stats()["active"] == 3)
        m = await metrics()
        assert m['vllm:num_requests_running{model_name="llama"}'] == 1
        assert m['vllm:num_requests_waiting{model_name="llama"}'] == 3 + 2
        results = await asyncio.gather(*tasks)
        assert sorted(r.choices[0].message.content for r in results) == ["echo: q0", "echo: q1", "echo: q2"]
        assert time.monotonic() - t0 >= 3 * 0.15  # served one after another
        assert sim.stats()["max_active"] == 3

        sim.update_settings(kv_cache_usage=0.9, max_running=0)
        assert (await metrics())['vllm:kv_cache_usage_perc{model_name="llama"}'] == 0.9
        await client.close()


async def test_latency_model():
    async with SimulatorServer(ttft_ms=100, tokens_per_s=100, reply_tokens=6) as sim:
        client = oai(sim)
        t0 = time.monotonic()
        await client.chat.completions.create(**chat("x"))
        assert time.monotonic() - t0 >= 0.1 + 5 / 100  # ttft + 5 gaps
        t0 = time.monotonic()
        stamps = []
        async for c in await client.chat.completions.create(**chat("x"), stream=True):
            if c.choices and c.choices[0].delta.content:
                stamps.append(time.monotonic() - t0)
        # lower bounds only: a loaded client may read the chunks late and all at once
        assert stamps[0] >= 0.1 and time.monotonic() - t0 >= 0.1 + 5 / 100
        await client.close()


def test_threaded_simulator_with_sync_client():
    with ThreadedSimulator(reply_tokens=3) as sim:
        assert sim.url == f"http://127.0.0.1:{sim.port}" and sim.port > 0
        client = openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(**chat("sync"))
        assert r.choices[0].message.content == "echo: sync lorem"
        sim.add_faults([{"kind": "status", "status": 503}])
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(**chat("sync"))
        assert sim.stats()["calls"] == 2
        sim.reset()
        assert sim.stats()["calls"] == 0
        client.close()
    assert sim._thread is None


def test_cli_parses_and_rejects_bad_settings():
    with pytest.raises(SystemExit):
        main(["--port", "not-a-number"])
    with pytest.raises(ValueError):
        SimulatorServer(bogus=1)
