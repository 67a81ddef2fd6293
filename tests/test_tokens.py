"""Pre-flight token counting: offline tiktoken, context windows, refusals before any call."""

from __future__ import annotations

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import ConfigError, TokensConfig, parse_settings
from proxy.errors import InvalidRequest
from proxy.tokens import TokenCounter, _gather, _quick_bound
from tests.harness import HerdServer, chat_calls


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


GREETING = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hello, world!"},
]


def test_count_uses_the_models_own_encoding_when_it_is_local():
    counter = TokenCounter(TokensConfig())
    count = counter.count({"messages": GREETING}, "gpt-4")
    # OpenAI's chat accounting: 3 per message + role + content, 3 to prime the reply
    assert count.tokens == 3 + (3 + 1 + 4) + (3 + 1 + 4)
    assert count.encoding == "cl100k_base" and not count.estimate
    assert counter.count({"messages": GREETING, "model": "x"}, "gpt-3.5-turbo").estimate is False


@pytest.mark.parametrize(
    "model",
    ["gpt-4o", "gpt-4o-mini", "claude-3-5-haiku-latest", "meta-llama/Llama-3.1-8B"],
)
def test_other_models_get_an_estimate_that_says_so(model):
    count = TokenCounter(TokensConfig()).count({"messages": GREETING}, model)
    assert count.estimate and count.encoding == "cl100k_base" and count.tokens == 19
    assert "estimate" in count.describe()


def test_images_and_tools_make_a_count_an_estimate():
    counter = TokenCounter(TokensConfig())
    image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,AAAA"},
                },
            ],
        }
    ]
    with_image = counter.count({"messages": image}, "gpt-4")
    assert with_image.estimate and with_image.tokens > 765
    tools = [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object"}},
        }
    ]
    with_tools = counter.count({"messages": GREETING, "tools": tools}, "gpt-4")
    assert with_tools.estimate and with_tools.tokens > 19


def test_context_windows_longest_pattern_wins_and_config_adds():
    counter = TokenCounter(TokensConfig(context_windows={"tiny-*": 50, "gpt-4o-mini*": 0}, default_context_window=0))
    assert counter.context_window("gpt-4o") == 128_000
    assert counter.context_window("gpt-4") == 8_192
    assert counter.context_window("gpt-4-32k-0613") == 32_768
    assert counter.context_window("claude-3-5-haiku-latest") == 200_000
    assert counter.context_window("tiny-model") == 50
    assert counter.context_window("gpt-4o-mini") == 0  # turned off by config
    assert counter.context_window("my-own-model") == 0
    assert TokenCounter(TokensConfig(default_context_window=4096)).context_window("my-own-model") == 4096


def test_over_the_window_is_context_length_exceeded():
    counter = TokenCounter(TokensConfig(context_windows={"tiny-*": 50}))
    body = {"messages": user("word " * 60)}
    assert counter.may_exceed(body, 50)
    assert not counter.may_exceed({"messages": user("short")}, 50)  # surely fits, without encoding
    with pytest.raises(InvalidRequest) as info:
        counter.check(counter.count(body, "tiny-model"), "tiny-model")
    error = info.value
    assert error.status == 400 and error.code == "context_length_exceeded" and error.param == "messages"
    assert "maximum context length is 50 tokens" in error.message and "estimate" in error.message
    assert error.headers["x-herd-token-count"] == "estimate" and int(error.headers["x-herd-prompt-tokens"]) > 50


def test_an_encoding_that_is_not_offline_is_a_config_error():
    with pytest.raises(ConfigError, match="not available offline"):
        TokenCounter(TokensConfig(encoding="o200k_base"))
    with pytest.raises(ConfigError, match="context_windows"):
        parse_settings(
            {
                "upstreams": {"u": {"base_url": "http://x/v1"}},
                "tokens": {"context_windows": {"a*": -1}},
            },
            env={},
        )


async def test_an_over_long_prompt_is_refused_before_any_upstream_call(sim):
    settings = parse_settings(
        {
            "cache": {"enabled": False},
            "tokens": {"context_windows": {"small-*": 1000}},
            "upstreams": {
                "sim": {"kind": "openai", "base_url": sim.url + "/v1"},
                "big": {"kind": "openai", "base_url": sim.url + "/v1"},
            },
            "routes": [
                {
                    "model": "small-*",
                    "upstream": "sim",
                    "fallbacks": ["big"],
                    "fallback_models": {"big": "gpt-4.1"},
                },
                {"model": "*", "upstream": "sim"},
            ],
        },
        env={},
    )
    with HerdServer(settings) as herd:
        c = openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key="sk-x", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(model="small-model", messages=user("word " * 2000))
        with pytest.raises(openai.BadRequestError) as exact:
            await c.chat.completions.create(model="gpt-4", messages=user("word " * 9000))
        ok = await c.chat.completions.create(model="gpt-4", messages=user("word " * 8000))
        stream = await c.chat.completions.create(model="small-model", messages=user("word " * 900), stream=True)
        assert "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    body = info.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
    assert body["type"] == "invalid_request_error" and "1000 tokens" in body["message"]
    assert info.value.response.headers["x-herd-token-count"] == "estimate"
    assert exact.value.response.headers["x-herd-token-count"] == "exact"
    # "word " * 9000 is 9001 tokens in cl100k_base; 3 + 1 for the message and its role, 3 for the reply
    assert exact.value.response.headers["x-herd-prompt-tokens"] == str(9001 + 3 + 1 + 3)
    assert ok.choices[0].message.content.startswith("echo: word")
    assert chat_calls(sim.url) == 2  # only the two that fit were sent


_text = st.text(max_size=40)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": _text})}),
    st.dictionaries(_text, _json, max_size=3),
    _json,
)
_message = st.one_of(
    st.fixed_dictionaries({"role": _text, "content": _text}, optional={"name": _text}),
    st.fixed_dictionaries({"role": _text, "content": st.lists(_part, max_size=4)}),
    st.dictionaries(_text, _json, max_size=4),
    _json,
)
_body = st.fixed_dictionaries(
    {"messages": st.lists(_message, max_size=5)},  # an array: the API checks that first
    optional={key: _json | st.lists(_json, max_size=3)
              for key in ("instructions", "input", "prompt", "tools", "functions", "response_format", "text")},
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_body, window=st.integers(0, 400))
def test_the_quick_bound_never_lets_through_a_prompt_the_full_count_refuses(body, window):
    """may_exceed's shortcut (one serialization of the body) bounds the gathered texts'
    bytes, so it says "fits" only where the byte bound, and so the count, says so too."""
    counter = TokenCounter(TokensConfig())
    bound = _quick_bound(body)
    full = _gather(body).max_tokens
    assert bound is None or bound >= full
    if not counter.may_exceed(body, window):
        assert full <= window
        assert counter.count(body, "gpt-4").tokens <= window  # cl100k: every token is at least one byte
    assert counter.may_exceed(body, window) == (full > window)
