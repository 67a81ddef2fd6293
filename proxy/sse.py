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


async def read_events(lines: AsyncIterable[bytes]) -> AsyncIterator[Event]:
    """Parse SSE from an iterable of lines (each ending in a newline, or not)."""
    data: list[bytes] = []
    event: str | None = None
    async for line in lines:
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield Event(b"\n".join(data), event)
            data, event = [], None
            continue
        if line.startswith(b":"):
            continue  # comment / keep-alive
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    if data:
        yield Event(b"\n".join(data), event)


def encode(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
