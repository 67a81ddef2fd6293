"""Anthropic as an upstream: the translation, and OpenAI-SDK clients served through the real
`anthropic` SDK by the simulator's Messages API."""

from __future__ import annotations

import asyncio
import logging
import re

import openai
import pytest

from benchmarks.simulator import expected_text
from proxy.config import parse_settings
from proxy.errors import InvalidRequest
from proxy.upstream.anthropic import StreamTranslator, to_messages_request
from tests.harness import HerdServer, sim_faults, sim_reset, sim_stats

CLAUDE = "claude-3-5-haiku-latest"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a thing up",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string"}},
                "required": ["q"],
            },
        },
    }
]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- the translation, request side ------------------------------------------------------


def test_full_conversation_translates_to_messages():
    body = {
        "model": CLAUDE,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": "https://example.com/cat.jpg",
                            "detail": "auto",
                        },
                    },
                ],
            },
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"q": "cat"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"q": "dog"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "a dog"}],
            },
            {"role": "user", "content": "Thanks. Which one?"},
        ],
        "stop": "END",
        "temperature": 0.3,
        "top_p": 0.9,
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "user": "user-42",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = to_messages_request(body, default_max_tokens=1234)
    assert req["model"] == CLAUDE and req["max_tokens"] == 1234
    assert req["system"] == [
        {"type": "text", "text": "Be brief."},
        {"type": "text", "text": "Use tools."},
    ]
    assert req["stop_sequences"] == ["END"]
    assert req["extra_body"] == {"temperature": 0.3, "top_p": 0.9}
    assert req["tools"] == [
        {
            "name": "lookup",
            "description": "Look a thing up",
            "input_schema": {
                "type": "object",
                "properties": {"q": {"type": "string"}},
                "required": ["q"],
            },
        }
    ]
    assert req["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert req["metadata"] == {"user_id": "user-42"}
    first, assistant, results = req["messages"]
    assert first["role"] == "user" and first["content"] == [
        {"type": "text", "text": "What is in this picture?"},
        {
            "type": "image",
            "source": {
                "type": "base64",
                "media_type": "image/png",
                "data": "iVBORw0KGgo=",
            },
        },
        {
            "type": "image",
            "source": {"type": "url", "url": "https://example.com/cat.jpg"},
        },
    ]
    assert assistant == {
        "role": "assistant",
        "content": [
            {
                "type": "tool_use",
                "id": "call_1",
                "name": "lookup",
                "input": {"q": "cat"},
            },
            {
                "type": "tool_use",
                "id": "call_2",
                "name": "lookup",
                "input": {"q": "dog"},
            },
        ],
    }
    # both tool results and the next user text make one user turn, results first
    assert results == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"},
            {
                "type": "tool_result",
                "tool_use_id": "call_2",
                "content": [{"type": "text", "text": "a dog"}],
            },
            {"type": "text", "text": "Thanks. Which one?"},
        ],
    }


def test_limits_tool_choice_and_formats_map():
    base = {"model": CLAUDE, "messages": user("hi")}
    assert to_messages_request({**base, "max_completion_tokens": 7}, 4096)["max_tokens"] == 7
    assert to_messages_request({**base, "max_tokens": 9}, 4096)["max_tokens"] == 9
    assert to_messages_request({**base, "stop": ["a", "b"]}, 1)["stop_sequences"] == [
        "a",
        "b",
    ]
    assert to_messages_request({**base, "tools": TOOLS, "tool_choice": "auto"}, 1)["tool_choice"] == {"type": "auto"}
    assert to_messages_request({**base, "tools": TOOLS, "tool_choice": "none"}, 1)["tool_choice"] == {"type": "none"}
    named = {"type": "function", "function": {"name": "lookup"}}
    assert to_messages_request({**base, "tools": TOOLS, "tool_choice": named}, 1)["tool_choice"] == {
        "type": "tool",
        "name": "lookup",
    }
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": schema, "strict": True},
    }
    req = to_messages_request({**base, "response_format": fmt, "reasoning_effort": "low"}, 1)
    assert req["output_config"] == {
        "format": {"type": "json_schema", "schema": schema},
        "effort": "low",
    }
    # neutral values of unsupported parameters are fine
    neutral = {
        "n": 1,
        "logprobs": False,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
        "store": False,
        "parallel_tool_calls": True,
    }
    assert "extra_body" not in to_messages_request({**base, **neutral}, 1)


@pytest.mark.parametrize(
    "patch, param",
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"seed": 7}, "seed"),
        ({"temperature": 1.5}, "temperature"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"reasoning_effort": "minimal"}, "reasoning_effort"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"some_future_param": 1}, "some_future_param"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
        (
            {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
            "messages[0].name",
        ),
        (
            {"messages": user("hi") + [{"role": "assistant", "content": "Sure"}]},
            "messages",
        ),
        (
            {"messages": user("hi") + [{"role": "system", "content": "late"}] + user("x")},
            "messages[1].role",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {}}],
                    }
                ]
            },
            "messages[0].content[0].type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {
                                    "url": "https://x/y.png",
                                    "detail": "high",
                                },
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url.detail",
        ),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    ],
)
def test_what_anthropic_cannot_express_is_refused_by_name(patch, param):
    with pytest.raises(InvalidRequest) as info:
        to_messages_request({"model": CLAUDE, "messages": user("hi"), **patch}, 4096)
    assert info.value.status == 400 and info.value.param == param


# -- the translation, answer side -------------------------------------------------------


def _events(stop_reason: str, blocks: list[tuple[str, list]]) -> list[dict]:
    out = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "model": CLAUDE,
                "usage": {
                    "input_tokens": 10,
                    "cache_read_input_tokens": 5,
                    "cache_creation_input_tokens": 1,
                    "output_tokens": 1,
                },
            },
        }
    ]
    for i, (kind, deltas) in enumerate(blocks):
        if kind == "text":
            out.append(
                {
                    "type": "content_block_start",
                    "index": i,
                    "content_block": {"type": "text", "text": ""},
                }
            )
            out += [
                {
                    "type": "content_block_delta",
                    "index": i,
                    "delta": {"type": "text_delta", "text": d},
                }
                for d in deltas
            ]
        else:
            out.append(
                {
                    "type": "content_block_start",
                    "index": i,
                    "content_block": {
                        "type": "tool_use",
                        "id": f"toolu_{i}",
                        "name": kind,
                        "input": {},
                    },
                }
            )
            out += [
                {
                    "type": "content_block_delta",
                    "index": i,
                    "delta": {"type": "input_json_delta", "partial_json": d},
                }
                for d in deltas
            ]
        out.append({"type": "content_block_stop", "index": i})
    out += [
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason},
            "usage": {"output_tokens": 7},
        },
        {"type": "message_stop"},
    ]
    return out


@pytest.mark.parametrize(
    "event",
    [
        {"type": "content_block_delta", "index": 0, "delta": "oops"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}},
        {"type": "content_block_start", "index": 0, "content_block": ["text"]},
        {"type": "message_delta", "delta": {}, "usage": {"output_tokens": "many"}},
    ],
)
def test_a_malformed_event_is_an_upstream_error_not_a_crash(event):
    from proxy.errors import UpstreamUnavailable

    t = StreamTranslator()
    t.feed(_events("end_turn", [("text", ["Hi"])])[0])  # message_start
    with pytest.raises(UpstreamUnavailable) as info:
        t.feed(event)
        t.feed({"type": "message_stop"})
    assert info.value.status == 502 and "malformed" in info.value.message
    assert not re.search(r"[A-Z][a-z]+(Error|Exception)\b", info.value.message)  # words, not a Python class


def test_event_stream_becomes_openai_chunks():
    from proxy.chunks import assemble

    t = StreamTranslator()
    chunks = [c for e in _events("end_turn", [("text", ["Hel", "lo"])]) for c in t.feed(e)]
    assert chunks[0].data["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c.data["object"] == "chat.completion.chunk" and c.data["id"] == "msg_1" for c in chunks)
    done = assemble(chunks)
    assert done["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert done["choices"][0]["finish_reason"] == "stop"
    assert done["usage"] == {
        "prompt_tokens": 16,
        "completion_tokens": 7,
        "total_tokens": 23,
        "prompt_tokens_details": {"cached_tokens": 5},
    }

    t = StreamTranslator()
    events = _events(
        "tool_use",
        [("text", ["Checking."]), ("lookup", ['{"q":', '"a"}']), ("other", ["{}"])],
    )
    done = assemble([c for e in events for c in t.feed(e)])
    message = done["choices"][0]["message"]
    assert message["content"] == "Checking." and done["choices"][0]["finish_reason"] == "tool_calls"
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("toolu_1", "lookup", '{"q":"a"}'),
        ("toolu_2", "other", "{}"),
    ]

    for reason, finish in [
        ("max_tokens", "length"),
        ("stop_sequence", "stop"),
        ("refusal", "content_filter"),
    ]:
        t = StreamTranslator()
        assert (
            assemble([c for e in _events(reason, [("text", ["x"])]) for c in t.feed(e)])["choices"][0]["finish_reason"]
            == finish
        )


# -- end to end: openai SDK -> herd -> anthropic SDK -> simulator ------------------------


def anthropic_settings(sim_url: str, api_key: str = "sk-ant-herd", **upstream) -> object:
    return parse_settings(
        {
            "auth": {"mode": "open"},
            "cache": {"enabled": False},
            "upstreams": {
                "claude": {
                    "kind": "anthropic",
                    "base_url": sim_url,
                    "api_key": api_key,
                    "retries": 1,
                    "backoff_base_s": 0.05,
                    **upstream,
                }
            },
            "routes": [{"model": "claude-*", "upstream": "claude"}],
        },
        env={},
    )


@pytest.fixture(scope="module")
def claude(sim):
    with HerdServer(anthropic_settings(sim.url)) as h:
        yield h


def aclient(herd, key: str = "sk-client-1") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key=key, max_retries=0, timeout=30)


def messages_log(sim) -> list[dict]:
    return [e for e in sim_stats(sim.url)["log"] if e["path"] == "/v1/messages"]


async def test_non_stream_and_stream_answers(claude, sim):
    c = aclient(claude)
    raw = await c.chat.completions.with_raw_response.create(model=CLAUDE, messages=user("hello from openai"))
    assert raw.headers["x-herd-upstream"] == "claude"
    completion = raw.parse()
    expected = expected_text({"messages": user("hello from openai")})
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == CLAUDE
    assert completion.usage.completion_tokens == len(expected.split())
    assert completion.usage.prompt_tokens == 3

    stream = await c.chat.completions.create(
        model=CLAUDE,
        messages=user("stream it please"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [ch async for ch in stream]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == expected_text({"messages": user("stream it please")})
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text.split())

    sent = messages_log(sim)
    assert len(sent) == 2 and all(e["stream"] for e in sent)  # herd always streams from the upstream
    assert sent[0]["body"]["max_tokens"] == 4096  # the configured default
    assert sent[0]["headers"]["authorization"] == "Bearer sk-ant-herd"  # herd's key, not the client's


async def test_tool_calls_non_stream_and_stream(claude, sim):
    c = aclient(claude)
    ask = user("please call tool now")
    completion = await c.chat.completions.create(model=CLAUDE, messages=ask, tools=TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "lookup" and call.id.startswith("toolu_")
    assert call.function.arguments == '{"q":"please call tool now"}'

    stream = await c.chat.completions.create(model=CLAUDE, messages=user("stream call tool"), tools=TOOLS, stream=True)
    chunks = [ch async for ch in stream]
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or ())]
    assert calls[0].function.name == "lookup" and calls[0].id.startswith("toolu_")
    assert "".join(tc.function.arguments or "" for tc in calls) == '{"q":"stream call tool"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the tool's result goes back in the next turn
    follow_up = ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "42"},
        {"role": "user", "content": "so what is it?"},
    ]
    answer = await c.chat.completions.create(
        model=CLAUDE,
        messages=[{"role": "system", "content": "Be brief."}] + follow_up,
        tools=TOOLS,
        temperature=0.5,
        stop=["zzz"],
        max_tokens=50,
    )
    assert answer.choices[0].message.content == "echo: so what is it?"
    body = messages_log(sim)[-1]["body"]
    assert body["system"] == [{"type": "text", "text": "Be brief."}]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == [
        {
            "type": "tool_use",
            "id": call.id,
            "name": "lookup",
            "input": {"q": "please call tool now"},
        }
    ]
    assert body["messages"][2]["content"][0] == {
        "type": "tool_result",
        "tool_use_id": call.id,
        "content": "42",
    }
    assert body["temperature"] == 0.5 and body["stop_sequences"] == ["zzz"] and body["max_tokens"] == 50
    assert body["tools"][0]["input_schema"]["required"] == ["q"]


async def test_refused_request_is_a_400_and_never_sent(claude, sim):
    c = aclient(claude)
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(model=CLAUDE, messages=user("two please"), n=2)
    assert info.value.body["param"] == "n" and info.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(
            model=CLAUDE,
            messages=user("json please"),
            response_format={"type": "json_object"},
        )
    assert info.value.body["param"] == "response_format"
    assert messages_log(sim) == []


async def test_upstream_errors_arrive_in_openai_format(claude, sim):
    c = aclient(claude)
    sim_faults(sim.url, {"kind": "status", "status": 400, "match": "bad one"})
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(model=CLAUDE, messages=user("a bad one"))
    assert info.value.body["type"] == "invalid_request_error" and "simulated fault" in info.value.body["message"]
    assert len(messages_log(sim)) == 1  # a 400 is never retried

    # overloaded (529) is retried, then answered
    sim_faults(sim.url, {"kind": "status", "status": 529, "match": "busy"})
    completion = await c.chat.completions.create(model=CLAUDE, messages=user("busy now"))
    assert completion.choices[0].message.content == "echo: busy now"
    assert len(messages_log(sim)) == 3

    sim_faults(sim.url, {"kind": "status", "status": 529, "times": 2, "match": "swamped"})
    with pytest.raises(openai.APIStatusError) as info:
        await c.chat.completions.create(model=CLAUDE, messages=user("swamped"))
    assert info.value.status_code == 529 and info.value.body["type"] == "overloaded_error"


async def test_a_burst_shares_one_anthropic_call(claude, sim):
    sim_reset(sim.url, ttft_ms=600, tokens_per_s=100)
    c = aclient(claude)

    async def stream_text():
        s = await c.chat.completions.create(model=CLAUDE, messages=user("burst to claude"), stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

    results = await asyncio.gather(
        *[c.chat.completions.create(model=CLAUDE, messages=user("burst to claude")) for _ in range(10)],
        *[stream_text() for _ in range(10)],
    )
    expected = expected_text({"messages": user("burst to claude")})
    assert [r.choices[0].message.content for r in results[:10]] == [expected] * 10
    assert results[10:] == [expected] * 10
    assert len(messages_log(sim)) == 1


async def test_client_key_is_passed_through_and_never_logged(sim, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "sk-ant-client-secret-123"
    with HerdServer(anthropic_settings(sim.url, api_key="")) as herd:
        completion = await aclient(herd, secret).chat.completions.create(model=CLAUDE, messages=user("my own key"))
        assert completion.choices[0].message.content == "echo: my own key"
        sim_faults(sim.url, {"kind": "status", "status": 401, "match": "denied"})
        with pytest.raises(openai.AuthenticationError) as info:
            await aclient(herd, secret).chat.completions.create(model=CLAUDE, messages=user("denied"))
        assert secret not in info.value.response.text
    assert messages_log(sim)[0]["headers"]["authorization"] == f"Bearer {secret}"
    assert caplog.records  # the SDKs and herd did log, at debug level
    assert not [r for r in caplog.records if secret in r.getMessage() or secret in str(r.args)]
