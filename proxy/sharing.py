"""What both ways of sharing a flight between processes have in common: across replicas
through Redis (proxy.redis.flights) and across one node's workers (proxy.node).

One process claims a flight's key and leads it; the others mirror its chunks into a local
flight through a Splice, and take the call over if the leader is lost before the end. The
leader's end (ok, or the error every follower answers with) travels as `end_fields`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from proxy.chunks import Chunk
from proxy.coalescer import Flight
from proxy.errors import HerdError, UpstreamError, UpstreamUnavailable, as_herd_error


class LeaderLost(UpstreamUnavailable):
    """The leading replica was lost mid-stream and the new answer differs from what was sent."""


@dataclass
class Claim:
    lead: bool
    holder: str  # the lease value: "<replica>:<flight id>"

    @property
    def flight_id(self) -> str:
        return self.holder.rpartition(":")[2]


def _content(data: dict[str, Any]) -> Any:
    """What the n-th chunks of two calls for one flight must share to be the same answer (ids
    and times aside): a chat chunk's choices; a typed event's (Responses) type and payload."""
    if "choices" in data or not isinstance(data.get("type"), str):
        return data.get("choices") or []
    return (data["type"], data.get("delta"), data.get("text"), data.get("arguments"), data.get("output_index"),
            data.get("content_index"))


class Splice:
    """Where a mirrored flight's chunks go: the local flight, through a prefix check.

    Each source (the leader's stream, a takeover's stream, our own takeover call) starts
    from its first chunk. While it repeats chunks the flight already has, they must match
    (their choices); the rest are published with the id and creation time of the flight's
    first chunk, so clients see one stream. A source that tells a different story (or a
    shorter one) rewinds the flight: waiters given none of the old answer get the new one;
    a stream given part of it ends with 502 leader_lost, never a splice of two answers.

    `whole`: the leader called the upstream non-stream (its answer came in one piece), so a
    takeover calls it the same way and, from a deterministic upstream, gets the same chunks.
    """

    def __init__(self, flight: Flight) -> None:
        self.flight = flight
        self.index = 0
        self.repeated: list[Chunk] = []  # this source's chunks that matched the flight's
        self.whole: bool | None = None  # how the leader called the upstream, once known

    @property
    def served_by(self) -> str | None:
        return self.flight.served_by

    @served_by.setter
    def served_by(self, name: str | None) -> None:
        self.flight.served_by = name

    def restart(self) -> None:
        self.index = 0
        self.repeated = []

    def publish(self, chunk: Chunk) -> None:
        chunks = self.flight.chunks
        if self.index < len(chunks):
            if _content(chunks[self.index].data) == _content(chunk.data):
                self.repeated.append(chunk)
                self.index += 1
                return
            self._rewind("the new answer differs from the part already sent")
            chunks = self.flight.chunks
        if chunks:
            head = chunks[0].data
            if chunk.data.get("id") != head.get("id") or chunk.data.get("created") != head.get("created"):
                chunk = Chunk({**chunk.data, "id": head.get("id"), "created": head.get("created")})
        self.flight.publish(chunk)
        self.index += 1

    def extend(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            self.publish(chunk)

    def complete(self) -> None:
        """The source ended cleanly: it must have covered everything already sent."""
        if self.index < len(self.flight.chunks):
            self._rewind("the new answer is shorter than the part already sent")

    def _rewind(self, why: str) -> None:
        self.flight.rewind(LeaderLost(f"the leading replica was lost mid-stream and {why}", code="leader_lost"))
        repeated, self.repeated = self.repeated, []
        self.index = 0
        for chunk in repeated:
            self.publish(chunk)


#: Runs the upstream call (stream or not), publishing into a sink.
Call = Callable[[Any, bool], Awaitable[None]]


def claim_id(holder: str) -> str:
    return holder.rpartition(":")[2]


def end_fields(error: BaseException | None, redact: tuple[str, ...]) -> dict[str, Any]:
    """The stream's last entry: ok, or the error every follower will answer with."""
    if error is None:
        return {"e": "ok"}
    herd = as_herd_error(error, "in a shared flight")
    body = herd.body_bytes()
    for secret in redact:
        if secret:
            body = body.replace(secret.encode(), b"[redacted]")
    fields: dict[str, Any] = {"e": "err", "st": str(herd.status), "b": body, "ct": herd.content_type}
    if herd.headers.get("retry-after"):
        fields["ra"] = herd.headers["retry-after"]
    return fields


def end_error(fields: dict[bytes, bytes]) -> HerdError:
    """The leader's error, as every follower answers it: its status and body."""
    try:
        status = int(fields.get(b"st", b"502"))
        headers = {"retry-after": fields[b"ra"].decode()} if b"ra" in fields else None
        content_type = fields.get(b"ct", b"application/json").decode()
    except (ValueError, UnicodeDecodeError):
        return UpstreamUnavailable("the leading replica failed", code="leader_failed")
    return UpstreamError(status, fields.get(b"b", b""), content_type=content_type, headers=headers)
