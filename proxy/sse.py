"""Server-sent events: writing them (the one place herd encodes an event), reading an
upstream's stream, and the marker that ends one."""

from __future__ import annotations

from dataclasses import dataclass

DONE = b"data: [DONE]\n\n"


def event(raw: bytes) -> bytes:
    """An unnamed event whose data is `raw` (chat and legacy completions chunks)."""
    return b"data: " + raw + b"\n\n"


def typed_event(kind: str, raw: bytes) -> bytes:
    """A typed event (a Responses or Anthropic stream event: its data carries its `type`),
    named by an `event:` line as those APIs send it."""
    return b"event: " + kind.encode() + b"\ndata: " + raw + b"\n\n"


@dataclass(frozen=True, slots=True)
class Event:
    data: bytes
    event: str | None = None


class EventParser:
    """Incremental SSE parsing: `feed` bytes of any size (whole network reads, or lines) and
    get back the events they complete; `close` returns whatever the last bytes held."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Event]:
        buffer = self._buffer + data
        if b"\r" in buffer:
            # CRLF or CR line ends become LF; a CR at the very end may be half of a CRLF
            keep = b"\r" if buffer.endswith(b"\r") else b""
            buffer = _lf(buffer[: len(buffer) - len(keep)]) + keep
        events = []
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            event = _parse(buffer[start:end])
            if event is not None:
                events.append(event)
            start = end + 2
        self._buffer = buffer[start:]
        return events

    def close(self) -> list[Event]:
        buffer, self._buffer = _lf(self._buffer), b""
        event = _parse(buffer) if buffer.strip() else None
        return [event] if event is not None else []


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
