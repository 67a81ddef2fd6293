from __future__ import annotations

import pytest

from proxy.sse import Event, EventParser


async def parse(*chunks: bytes) -> list[Event]:
    parser = EventParser()
    return [e for c in chunks for e in parser.feed(c)] + parser.close()


STREAM = (b'data: {"a": 1}\n\n: keep-alive\n\nevent: message_stop\ndata: {"b": 2}\n\n'
          b"data: line one\ndata: line two\n\ndata: [DONE]\n\n")
EXPECTED = [Event(b'{"a": 1}'), Event(b'{"b": 2}', "message_stop"), Event(b"line one\nline two"), Event(b"[DONE]")]


async def test_whole_stream_in_one_read():
    assert await parse(STREAM) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16])
async def test_any_split_of_the_bytes_gives_the_same_events(size):
    parts = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert await parse(*parts) == EXPECTED


@pytest.mark.parametrize("size", [1, 5, 1000])
async def test_crlf_line_endings(size):
    crlf = STREAM.replace(b"\n", b"\r\n")
    parts = [crlf[i : i + size] for i in range(0, len(crlf), size)]
    assert await parse(*parts) == EXPECTED


async def test_a_last_event_without_a_blank_line_still_counts():
    assert await parse(b"data: x\n\ndata: y") == [Event(b"x"), Event(b"y")]
