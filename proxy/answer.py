"""An answer rendered once, as bytes: what every waiter of a flight writes and what the cache keeps.

A flight's chunks have two renderings, each made at most once per flight and shared by
every waiter (and by the cache, once the flight is done):

    Stream   the SSE events, rendered as the chunks arrive: one part per published batch,
             and each usage-only chunk a part of its own (only clients that asked for usage
             get it). A stream waiter writes the parts it has not written yet; a late joiner
             starts at the first.
    body     the non-stream `chat.completion` JSON: the upstream's own when it sent one,
             else assembled from the chunks (json_body).

`Answer` is a finished flight in those bytes: what the cache stores (the memory cache as the
object, Redis as `encode()`), and what a cache hit's waiters write without rendering
anything again. Nothing here knows HTTP beyond the SSE framing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import orjson

from proxy.chunks import Chunk, assemble
from proxy.coalescer import Flight
from proxy.sse import event, typed_event

_MAGIC = b"herd-answer/1\n"
_LENGTHS = struct.Struct("<III")
#: what a cached entry costs beyond its bytes (the objects, the LRU's links), for the byte bound
ENTRY_OVERHEAD = 400


class Answer:
    """A finished answer: its SSE events (`sse`, then `usage_sse` for clients that asked for
    usage) and its JSON body. Immutable; one object serves every cache hit."""

    __slots__ = ("_usage", "body", "sse", "usage_sse")

    def __init__(self, sse: bytes, usage_sse: bytes, body: bytes) -> None:
        self.sse = sse
        self.usage_sse = usage_sse
        self.body = body
        self._usage: dict[str, Any] | bool | None = False  # False: not read yet

    @property
    def nbytes(self) -> int:
        return len(self.sse) + len(self.usage_sse) + len(self.body) + ENTRY_OVERHEAD

    @property
    def usage(self) -> dict[str, Any] | None:
        """The usage the answer reports (read once, for accounting)."""
        if self._usage is False:
            usage = None
            if self.usage_sse:
                last = self.usage_sse.rstrip(b"\n").rsplit(b"\n\n", 1)[-1].removeprefix(b"data: ")
                usage = orjson.loads(last).get("usage")
            if usage is None:
                usage = orjson.loads(self.body).get("usage")
            self._usage = usage if isinstance(usage, dict) else None
        return self._usage  # type: ignore[return-value]

    def encode(self) -> bytes:
        """One bytes value (for Redis): a header, the three lengths, then the three parts."""
        return b"".join((_MAGIC, _LENGTHS.pack(len(self.sse), len(self.usage_sse), len(self.body)),
                         self.sse, self.usage_sse, self.body))

    @classmethod
    def decode(cls, raw: bytes) -> Answer | None:
        """The answer `encode` made, or None for anything else (an older format, a foreign value)."""
        start = len(_MAGIC) + _LENGTHS.size
        if not raw.startswith(_MAGIC) or len(raw) < start:
            return None
        sizes = _LENGTHS.unpack_from(raw, len(_MAGIC))
        if start + sum(sizes) != len(raw):
            return None
        a, b = start + sizes[0], start + sizes[0] + sizes[1]
        return cls(raw[start:a], raw[a:b], raw[b:])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Answer) and (self.sse, self.usage_sse, self.body) == (
            other.sse, other.usage_sse, other.body)

    __hash__ = None  # type: ignore[assignment]


class Stream:
    """A flight's SSE events, rendered once as its chunks arrive, for all its stream waiters.

    `parts` only grows; `usage` holds the indexes of the parts that are usage-only events.
    """

    __slots__ = ("parts", "rendered", "usage")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.usage: set[int] = set()
        self.rendered = 0  # chunks rendered so far

    @classmethod
    def of(cls, answer: Answer) -> Stream:
        stream = cls()
        stream.parts.append(answer.sse)
        if answer.usage_sse:
            stream.usage.add(1)
            stream.parts.append(answer.usage_sse)
        return stream

    def update(self, chunks: list[Chunk]) -> None:
        """Render the chunks published since the last update."""
        end = len(chunks)
        run: list[bytes] = []
        for i in range(self.rendered, end):
            chunk = chunks[i]
            if chunk.usage_only:
                if run:
                    self.parts.append(b"".join(run))
                    run = []
                self.usage.add(len(self.parts))
                self.parts.append(event(chunk.raw))
            elif chunk.kind is not None and chunk.kind.isprintable():
                run.append(typed_event(chunk.kind, chunk.raw))
            else:  # a chat chunk: no `type`, data alone
                run += (b"data: ", chunk.raw, b"\n\n")
        if run:
            self.parts.append(b"".join(run))
        self.rendered = end


def stream_of(flight: Flight) -> Stream:
    """The flight's shared SSE rendering, brought up to date with its chunks."""
    stream = flight.sse
    if stream is None:
        stream = flight.sse = Stream.of(flight.answer) if flight.answer is not None else Stream()
    stream.update(flight.chunks)
    return stream


def json_body(flight: Flight, build: Callable[[list[Chunk]], dict] = assemble) -> bytes:
    """The non-stream body of a finished flight: the upstream's own, when it sent one, else
    `build` from the chunks (its API's assembly: a chat completion by default); made once
    per flight."""
    if flight.body is None:
        if flight.answer is not None:
            flight.body = flight.answer.body
        else:
            whole = flight.chunks[0].whole if flight.chunks else None
            flight.body = whole if whole is not None else orjson.dumps(build(flight.chunks))
    return flight.body


def answer_of(flight: Flight, build: Callable[[list[Chunk]], dict] = assemble) -> Answer:
    """A cleanly finished flight as an Answer (made once per flight, from its renderings;
    `build`: as for json_body)."""
    if flight.answer is None:
        # kept as the flight's: its stream waiters render nothing again, and never from
        # `flight.answer` on top of the chunks
        stream = flight.sse = flight.sse or Stream()
        stream.update(flight.chunks)
        sse = b"".join(p for i, p in enumerate(stream.parts) if i not in stream.usage)
        usage = b"".join(stream.parts[i] for i in sorted(stream.usage))
        flight.answer = Answer(sse, usage, json_body(flight, build))
    return flight.answer

