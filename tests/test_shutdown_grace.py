"""Requests still running when the shutdown grace ends get a proper end: an OpenAI-format 503,
or (a stream that has started) an SSE error event and [DONE], logged with that status."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import orjson

from tests.harness import HerdServer, herd_settings
from tests.raw_http import RawUpstream, Received, _unchunk, read_answer

CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"first"},"finish_reason":null}]}\n\n'
)


async def stalls(request: Received, writer: asyncio.StreamWriter) -> None:
    """Never finishes: a stream call gets its first chunk, anything else nothing at all."""
    if b'"stream":true' in request.body:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n" + CHUNK)
        await writer.drain()
    await asyncio.sleep(60)


def post(port: int, path: str, body: dict) -> bytes:
    data = orjson.dumps(body)
    return (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    ).encode() + data


def test_requests_cut_by_the_end_of_the_shutdown_grace_get_a_proper_end(caplog):
    caplog.set_level(logging.INFO, logger="herd.access")
    settings = herd_settings(
        "http://unused",
        server={"request_timeout_s": 60},
        upstreams={"sim": {"first_byte_timeout_s": 60, "idle_timeout_s": 60}},
    )
    streaming = threading.Event()
    with RawUpstream(stalls) as up:
        settings.upstreams["sim"].base_url = up.url + "/v1"
        herd = HerdServer(settings).start()
        herd.server.config.timeout_graceful_shutdown = 0.5
        message = [{"role": "user", "content": "never answered"}]

        def plain(path: str, body: dict):
            with socket.create_connection(("127.0.0.1", herd.port), timeout=30) as sock:
                sock.sendall(post(herd.port, path, body))
                return read_answer(sock)

        def stream() -> tuple[bytes, bytes]:
            with socket.create_connection(("127.0.0.1", herd.port), timeout=30) as sock:
                body = {"model": "m", "messages": message + message, "stream": True}
                sock.sendall(post(herd.port, "/v1/chat/completions", body))
                raw = b""
                while b"first" not in raw:
                    raw += sock.recv(65536)
                streaming.set()
                while part := sock.recv(65536):
                    raw += part
                head, _, body = raw.partition(b"\r\n\r\n")
                return head, _unchunk(body)

        with ThreadPoolExecutor(3) as pool:
            non_stream = pool.submit(plain, "/v1/chat/completions", {"model": "m", "messages": message})
            streamed = pool.submit(stream)
            forwarded = pool.submit(plain, "/v1/embeddings", {"model": "e", "input": "x"})
            deadline = time.monotonic() + 30
            while len(up.received) < 3 or not streaming.is_set():
                assert time.monotonic() < deadline, "the requests did not all reach the upstream"
                time.sleep(0.02)
            herd.stop()
            answer, (head, body), embedding = non_stream.result(30), streamed.result(30), forwarded.result(30)

    for plain_answer in (answer, embedding):
        assert plain_answer.status == 503
        error = orjson.loads(plain_answer.body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "shutting_down"
    assert head.startswith(b"HTTP/1.1 200")
    events = body.split(b"\n\n")
    assert events[0] + b"\n\n" == CHUNK
    assert orjson.loads(events[1].removeprefix(b"data: "))["error"]["code"] == "shutting_down"
    assert events[2:] == [b"data: [DONE]", b""]
    statuses = sorted(r.status for r in caplog.records if r.name == "herd.access")
    assert statuses == [503, 503]
