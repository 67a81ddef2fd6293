"""OpenAI-Organization and OpenAI-Project: sent upstream with every call, and part of the
scope, so calls bill where the client asked and different projects never share answers."""

from __future__ import annotations

import asyncio
import threading

import openai
import pytest

from tests.harness import HerdServer, herd_settings
from tests.raw_http import COMPLETION, RawUpstream, Received, answer_json, default_respond


class Gate:
    """An upstream that holds each chat call until `expected` calls have arrived (or 10 s
    went by): requests that may share a flight are all in flight together."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self.event: asyncio.Event | None = None
        self.lock = threading.Lock()

    async def respond(self, request: Received, writer: asyncio.StreamWriter) -> None:
        if request.target.endswith("/chat/completions"):
            if self.event is None:
                self.event = asyncio.Event()
            self.arrived += 1
            if self.arrived >= self.expected:
                self.event.set()
            try:
                await asyncio.wait_for(self.event.wait(), 10)
            except TimeoutError:
                pass
            await answer_json(writer, COMPLETION)
        else:
            await answer_json(writer, {"object": "list", "data": []})


def sdk(herd, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key="sk-client", max_retries=0, **kw)


async def ask(client: openai.AsyncOpenAI, text: str = "hello") -> str:
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": text}]
    )
    return raw.headers["x-herd"]


@pytest.mark.parametrize("stream", [False, True])
def test_organization_and_project_reach_the_upstream_on_chat_and_forwarded_calls(stream):
    with RawUpstream() as up, HerdServer(herd_settings(up.url)) as herd:
        client = openai.OpenAI(
            base_url=herd.url + "/v1", api_key="sk-client", organization="org-a", project="proj-a", max_retries=0
        )
        if stream:
            up.respond = _stream_respond
            list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
        else:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        chat = up.received[-1]
        assert chat.target == "/v1/chat/completions"
        assert chat.headers["openai-organization"] == "org-a"
        assert chat.headers["openai-project"] == "proj-a"
        client.files.list()
        forwarded = up.received[-1]
        assert forwarded.target.startswith("/v1/files")
        assert forwarded.headers["openai-organization"] == "org-a"
        assert forwarded.headers["openai-project"] == "proj-a"


async def _stream_respond(request: Received, writer: asyncio.StreamWriter) -> None:
    if not request.target.endswith("/chat/completions"):
        return await default_respond(request, writer)
    chunk = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(chunk))
    writer.write(chunk)
    await writer.drain()


@pytest.mark.parametrize(
    "accounts",
    [
        [{"organization": "org-a"}, {"organization": "org-b"}],
        [{"project": "proj-a"}, {"project": "proj-b"}],
        [{}, {"project": "proj-a"}],
        [{"organization": "org-a", "project": "p"}, {"organization": "org-a", "project": "q"}],
    ],
)
async def test_a_different_organization_or_project_never_shares_a_flight(accounts):
    gate = Gate(expected=len(accounts))
    with RawUpstream(gate.respond) as up, HerdServer(herd_settings(up.url)) as herd:
        roles = await asyncio.gather(*(ask(sdk(herd, **account)) for account in accounts))
        calls = [r for r in up.received if r.target.endswith("/chat/completions")]
        assert len(calls) == len(accounts)
        assert roles == ["leader"] * len(accounts)


async def test_the_same_organization_and_project_do_share():
    gate = Gate(expected=2)
    with RawUpstream(gate.respond) as up, HerdServer(herd_settings(up.url)) as herd:
        account = {"organization": "org-a", "project": "proj-a"}
        roles = await asyncio.gather(*(ask(sdk(herd, **account)) for _ in range(3)))
        assert sorted(roles) == ["follower", "follower", "leader"]
        assert len([r for r in up.received if r.target.endswith("/chat/completions")]) == 1


async def test_a_different_organization_or_project_never_gets_a_cached_answer():
    with RawUpstream() as up, HerdServer(herd_settings(up.url, cache={"enabled": True})) as herd:
        assert await ask(sdk(herd, organization="org-a")) == "leader"
        assert await ask(sdk(herd, organization="org-a")) == "cache"
        assert await ask(sdk(herd, organization="org-b")) == "leader"
        assert await ask(sdk(herd, organization="org-a", project="proj-a")) == "leader"
        assert await ask(sdk(herd)) == "leader"
        assert len([r for r in up.received if r.target.endswith("/chat/completions")]) == 4
