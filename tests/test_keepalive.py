"""An upstream that sends only keep-alives (SSE comments, Anthropic pings) does not hold
waiters: the first-byte and idle timeouts count events that carry the answer."""

from __future__ import annotations

import asyncio

import openai
import pytest

from proxy.config import parse_settings
from tests.harness import HerdServer, herd_settings
from tests.raw_http import RawUpstream, Received

CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"first"},"finish_reason":null}]}\n\n'
)
ANTHROPIC_START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
    b'"role":"assistant","model":"claude-x","content":[],"stop_reason":null,"stop_sequence":null,'
    b'"usage":{"input_tokens":1,"output_tokens":0}}}\n\n'
)
PING = b'event: ping\ndata: {"type": "ping"}\n\n'


def keepalives(first: bytes, beat: bytes):
    """An SSE answer that sends `first` and then only `beat`, every 50 ms, for up to 30 s."""

    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n" + first)
        for _ in range(600):
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(beat)

    return respond


TIMEOUTS = {"first_byte_timeout_s": 1.0, "idle_timeout_s": 1.0}


def openai_herd(up: RawUpstream) -> HerdServer:
    return HerdServer(herd_settings(up.url, upstreams={"sim": TIMEOUTS}, server={"request_timeout_s": 60}))


def client(herd) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key="sk-x", max_retries=0, timeout=20)


@pytest.mark.parametrize("first", [b"", CHUNK], ids=["comments-only", "a-chunk-then-comments"])
async def test_sse_comments_alone_do_not_hold_a_non_stream_waiter(first):
    with RawUpstream(keepalives(first, b": keep-alive\n\n")) as up, openai_herd(up) as herd:
        with pytest.raises(openai.APIStatusError) as caught:
            await client(herd).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 504


async def test_sse_comments_alone_end_a_started_stream_with_an_error_event():
    with RawUpstream(keepalives(CHUNK, b":\n\n")) as up, openai_herd(up) as herd:
        stream = await client(herd).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        got = []
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content)
        assert got == ["first"]
        assert "did not answer in time" in str(caught.value)


async def test_anthropic_pings_alone_do_not_hold_waiters():
    # The Anthropic SDK drops ping events, so herd's idle window never sees them (green before too).
    with RawUpstream(keepalives(ANTHROPIC_START, PING)) as up:
        upstream = {"kind": "anthropic", "base_url": up.url, "api_key": "sk-ant", "retries": 0, **TIMEOUTS}
        settings = parse_settings(
            {
                "auth": {"mode": "open"},
                "cache": {"enabled": False},
                "server": {"request_timeout_s": 60},
                "upstreams": {"claude": upstream},
                "routes": [{"model": "claude-*", "upstream": "claude"}],
            },
            env={},
        )
        with HerdServer(settings) as herd:
            with pytest.raises(openai.APIStatusError) as caught:
                await client(herd).chat.completions.create(
                    model="claude-x", messages=[{"role": "user", "content": "hi"}]
                )
            assert caught.value.status_code == 504
