"""Server-sent events: reading an upstream's stream and writing one to a client."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import orjson

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Event:
    data: bytes
    event: str | None = None


async def read_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[Event]:
    """Parse SSE from byte chunks of any size (whole network reads, or lines).

    Events are split on blank lines; a read that holds several events costs one await.
    """
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        if b"\r" in buffer:
            # CRLF or CR line ends become LF; a CR at the very end may be half of a CRLF
            keep = b"\r" if buffer.endswith(b"\r") else b""
            buffer = _lf(buffer[: len(buffer) - len(keep)]) + keep
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            event = _parse(buffer[:end])
            buffer = buffer[end + 2 :]
            if event is not None:
                yield event
    buffer = _lf(buffer)
    if buffer.strip():
        event = _parse(buffer)
        if event is not None:
            yield event


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _parse(block: bytes) -> Event | None:
    """One event's lines: `data:` lines joined by newlines, `event:` names it, `:` comments."""
    data: list[bytes] = []
    event: str | None = None
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    return Event(b"\n".join(data), event) if data else None


def encode(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
