"""Clients that misbehave on the wire: bodies that never come, or come a byte at a time."""

from __future__ import annotations

import socket
import time

import orjson
import pytest

from tests.harness import HerdServer, chat_calls, herd_settings
from tests.raw_http import read_answer

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "drip"}]})


@pytest.fixture(scope="module")
def slow_herd(sim):
    with HerdServer(herd_settings(sim.url, server={"body_timeout_s": 1.0})) as h:
        yield h


def head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    ).encode()


def assert_408(answer) -> None:
    assert answer.status == 408
    error = orjson.loads(answer.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_a_declared_body_that_never_comes_gets_408_and_the_connection_is_closed(slow_herd, sim, path):
    with socket.create_connection(("127.0.0.1", slow_herd.port), timeout=30) as sock:
        sock.sendall(head(path, 100) + b'{"mo')
        assert_408(read_answer(sock))
        assert sock.recv(1) == b""  # herd closed it: the connection is not held either
    assert chat_calls(sim.url) == 0


def test_a_body_dripped_a_byte_at_a_time_is_cut_at_the_deadline(slow_herd, sim):
    with socket.create_connection(("127.0.0.1", slow_herd.port), timeout=30) as sock:
        sock.sendall(head("/v1/chat/completions", len(BODY)))
        sock.setblocking(False)
        sent = 0
        answered = False
        while sent < len(BODY):  # far slower than the deadline allows: ~0.1 s a byte
            try:
                sock.send(BODY[sent : sent + 1])
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    answered = True
                    break
            except BlockingIOError:
                pass
            time.sleep(0.1)
        assert answered and sent < len(BODY)
        sock.setblocking(True)
        assert_408(read_answer(sock))
    assert chat_calls(sim.url) == 0


def test_a_body_that_arrives_within_the_deadline_is_served(slow_herd, sim):
    with socket.create_connection(("127.0.0.1", slow_herd.port), timeout=30) as sock:
        sock.sendall(head("/v1/chat/completions", len(BODY)) + BODY[:10])
        time.sleep(0.2)
        sock.sendall(BODY[10:])
        answer = read_answer(sock)
    assert answer.status == 200
    assert orjson.loads(answer.body)["object"] == "chat.completion"


async def test_a_body_uvicorn_already_holds_is_read_without_a_timer_and_one_still_coming_is_not():
    """read_body skips its timer only when the server holds the whole body already
    (proxy.app.body_arrived, read from uvicorn's request cycle); a body that has not all
    come is read under the timer. Against a real uvicorn, so a uvicorn that stops saying so
    shows up here rather than as a silent cost."""
    import asyncio

    import uvicorn

    from proxy.app import body_arrived

    seen: list[tuple[bool, bytes]] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        arrived = body_arrived(receive)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append((arrived, body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http="httptools", lifespan="off", log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head("/x", len(BODY)) + BODY)  # all of it at once
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head("/x", len(BODY)) + BODY[:5])  # part of it, the rest later
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(BODY[5:])
        await reader.readuntil(b"\r\n\r\n")
        writer.close()
        assert seen == [(True, BODY), (False, BODY)]
    finally:
        server.should_exit = True
        await serving
