"""Clients that do not read (invariant 10): each is cut at its deadline with what herd held for
it dropped, never buffered whole; whoever else waits on the same answer gets all of it; a
slow client that does read gets everything within its deadline.

Real sockets against herd on loopback, with a small kernel send buffer (`send_buffer_bytes`)
so that an answer of a few thousand tokens cannot hide in the kernel, and non-readers with a
small receive buffer, as an attacker's would be.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import openai
import orjson
import pytest

from benchmarks.simulator import expected_text
from proxy.responses import WRITE_PIECE
from tests.harness import HerdServer, herd_settings, sim_reset

TOKENS = 3000  # about 450 KB of SSE
DEADLINE_S = 8.0  # generous: the well-behaved readers share it on a loaded machine
#: what herd may hold unsent for one client: the transport's high-water mark (64 KiB), one piece,
#: and the chunked-encoding framing around it
BOUND = 64 * 1024 + WRITE_PIECE + 64


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def strict_herd(sim):
    settings = herd_settings(sim.url, server={"request_timeout_s": DEADLINE_S, "send_buffer_bytes": 8192},
                             cache={"enabled": True})
    with HerdServer(settings) as h:
        yield h


def request_bytes(herd: HerdServer, text: str, stream: bool = True) -> bytes:
    body = orjson.dumps({"model": "m", "messages": user(text), "stream": stream})
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {herd.url[7:]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nauthorization: Bearer sk-a\r\nconnection: close\r\n\r\n").encode() + body


def dechunk(body: bytes) -> bytes:
    out, i = [], 0
    while True:
        j = body.index(b"\r\n", i)
        size = int(body[i:j], 16)
        if not size:
            return b"".join(out)
        out.append(body[j + 2 : j + 2 + size])
        i = j + 2 + size + 2


def non_reader(herd: HerdServer, text: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(herd.url.rsplit(":", 1)[1])))
    sock.sendall(request_bytes(herd, text))
    return sock


def established(sock: socket.socket) -> bool:
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0] == 1


def wait_until(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def unsent(herd: HerdServer) -> list[int]:
    """The bytes herd holds unsent for each of its client connections."""
    return herd.call(lambda: [p.transport.get_write_buffer_size() for p in herd.server.server_state.connections
                              if p.transport is not None and not p.transport.is_closing()])


def cut_count(herd: HerdServer) -> float:
    return herd.call(lambda: herd.gateway.metrics.clients_cut._value.get())


async def read_stream(herd: HerdServer, text: str) -> tuple[str, str]:
    client = openai.AsyncOpenAI(base_url=herd.url + "/v1", api_key="sk-a", max_retries=0)
    async with client:
        response = await client.chat.completions.with_raw_response.create(model="m", messages=user(text), stream=True)
        parts = [c.choices[0].delta.content or "" async for c in response.parse() if c.choices]
    return response.headers["x-herd"], "".join(parts)


async def readers(herd: HerdServer, text: str, n: int) -> list[tuple[str, str]]:
    return await asyncio.gather(*(read_stream(herd, text) for _ in range(n)))


def test_a_non_reader_of_a_cached_answer_holds_a_bounded_buffer_and_is_cut_at_its_deadline(strict_herd, sim):
    sim_reset(sim.url, reply_tokens=TOKENS)
    text = "a long cached answer"
    want = expected_text({"messages": user(text)}, {"reply_tokens": TOKENS})
    assert asyncio.run(read_stream(strict_herd, text)) == ("leader", want)
    cut_before = cut_count(strict_herd)

    sock = non_reader(strict_herd, text)
    try:
        # herd has written what the kernel takes and holds at most BOUND more: never the whole answer
        assert wait_until(lambda: max(unsent(strict_herd), default=0) > 0, 10)
        assert max(unsent(strict_herd)) <= BOUND
        # the others reading the same answer meanwhile get all of it
        assert asyncio.run(readers(strict_herd, text, 3)) == [("cache", want)] * 3
        assert max(unsent(strict_herd), default=0) <= BOUND
        # cut at its deadline (plus the grace for its error), and what herd held for it dropped
        assert wait_until(lambda: not established(sock), DEADLINE_S + 30)
        assert wait_until(lambda: max(unsent(strict_herd), default=0) == 0, 10)
        assert cut_count(strict_herd) == cut_before + 1
    finally:
        sock.close()


def test_a_non_reader_on_a_live_flight_does_not_harm_the_others_on_it(strict_herd, sim):
    # the upstream streams for about 5 s: the flight is live while the others join and read it
    sim_reset(sim.url, reply_tokens=TOKENS, ttft_ms=200, tokens_per_s=600)
    text = "a long fresh answer"
    want = expected_text({"messages": user(text)}, {"reply_tokens": TOKENS})
    socks = [non_reader(strict_herd, text) for _ in range(3)]
    try:
        assert wait_until(lambda: strict_herd.call(lambda: strict_herd.gateway.group.waiters) == 3, 10)
        got = asyncio.run(readers(strict_herd, text, 4))
        assert [g[1] for g in got] == [want] * 4 and {g[0] for g in got} == {"follower"}
        assert max(unsent(strict_herd), default=0) <= BOUND
        assert wait_until(lambda: not any(map(established, socks)), DEADLINE_S + 30)
        assert wait_until(lambda: max(unsent(strict_herd), default=0) == 0, 10)
        assert strict_herd.call(lambda: strict_herd.gateway.group.waiters) == 0
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("stream", [True, False])
def test_a_slow_reader_gets_the_whole_answer_within_its_deadline(sim, stream):
    sim_reset(sim.url, reply_tokens=TOKENS)
    settings = herd_settings(sim.url, server={"request_timeout_s": 60, "send_buffer_bytes": 8192})
    text = f"a slowly read answer {stream}"
    want = expected_text({"messages": user(text)}, {"reply_tokens": TOKENS})
    with HerdServer(settings) as herd:

        async def slow() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", int(herd.url.rsplit(":", 1)[1]))
            writer.write(request_bytes(herd, text, stream))
            got = []
            while part := await reader.read(8192):  # to the end: herd closes (connection: close)
                got.append(part)
                await asyncio.sleep(0.005)  # at most about 1.5 MB/s: the answer takes a while
            writer.close()
            return b"".join(got)

        raw = asyncio.run(slow())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if stream:
        events = dechunk(body).split(b"\n\n")
        assert events[-2:] == [b"data: [DONE]", b""]
        chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == want
    else:
        assert orjson.loads(body)["choices"][0]["message"]["content"] == want
