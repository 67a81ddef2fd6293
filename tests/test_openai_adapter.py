"""The OpenAI adapter against servers that answer in the other shape than asked."""

from __future__ import annotations

import aiohttp.web
import orjson
import pytest

from proxy.chunks import assemble
from proxy.config import UpstreamConfig
from proxy.errors import UpstreamUnavailable
from proxy.upstream import CallOptions
from proxy.upstream.openai import OpenAIUpstream
from tests.harness import free_port

COMPLETION = {
    "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "one two"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


def sse(*objects: dict, done: bool = True) -> bytes:
    body = b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in objects)
    return body + (b"data: [DONE]\n\n" if done else b"")


def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


STREAM = [chunk({"role": "assistant", "content": "one"}), chunk({"content": " two"}, "stop"),
          {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
           "usage": COMPLETION["usage"]}]


@pytest.fixture
async def server():
    replies: list[tuple[bytes, str]] = []

    async def chat(request: aiohttp.web.Request) -> aiohttp.web.Response:
        body, content_type = replies[0]
        return aiohttp.web.Response(body=body, content_type=content_type)

    app = aiohttp.web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", port).start()
    upstream = OpenAIUpstream(UpstreamConfig(name="odd", base_url=f"http://127.0.0.1:{port}/v1"))
    await upstream.start()
    try:
        yield upstream, replies
    finally:
        await upstream.aclose()
        await runner.cleanup()


async def answer(upstream: OpenAIUpstream, stream: bool) -> list:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return [c async for batch in upstream.chat(body, CallOptions(), stream) for c in batch]


@pytest.mark.parametrize("stream", [True, False], ids=["stream call", "non-stream call"])
async def test_a_json_body_or_a_whole_sse_stream_is_the_same_answer(server, stream):
    upstream, replies = server
    replies[:] = [(orjson.dumps(COMPLETION), "application/json")]
    from_json = await answer(upstream, stream)
    assert from_json[0].whole == orjson.dumps(COMPLETION)  # the upstream's own body, kept
    replies[:] = [(sse(*STREAM), "text/event-stream")]
    from_sse = await answer(upstream, stream)
    for chunks in (from_json, from_sse):
        done = assemble(chunks)
        assert done["choices"][0]["message"]["content"] == "one two"
        assert done["choices"][0]["finish_reason"] == "stop" and done["usage"] == COMPLETION["usage"]


async def test_a_whole_sse_stream_that_stops_short_is_refused(server):
    upstream, replies = server
    replies[:] = [(sse(STREAM[0], done=False), "text/event-stream")]
    with pytest.raises(UpstreamUnavailable):
        await answer(upstream, stream=False)
