"""`python -m benchmarks.abuse`: clients that misbehave on purpose, and what they cost herd.

Every scenario asks herd for one long streamed answer (`--tokens`, 20,000 by default: a few
MB of SSE) over raw loopback sockets, while herd's resident memory is sampled:

  non-readers, cached   sockets that request an answer herd has in its cache and never read
  non-readers, fresh    the same on fresh flights (the upstream is streaming it right now)
  slow readers          sockets that read, slowly but fast enough to finish before the deadline

Each scenario also runs a few well-behaved readers on the same answer, which must get the
whole of it whatever the others do. A non-reader's socket has a small receive buffer, as an
attacker's would, so the answer stays in herd rather than in the kernel; it is "cut" when
herd resets or closes it (its TCP state leaves ESTABLISHED), and "cut at deadline" counts the
ones cut within a few seconds of herd's `request_timeout_s`.

Columns: scenario, sockets, peak RSS (herd's, while the sockets are open), RSS after close
(all sockets closed, two seconds later), cut at deadline (within CUT_SLACK_S of the deadline,
counted from herd's first byte to the socket; the range shows the earliest and latest), answered (readers that got the
whole answer / readers). The table is printed and the JSON written to
benchmarks/results/abuse/ (`--label` names the file).

The scenarios are plain functions that take a running herd (`Target`) and return a dict, so
other benchmarks can run them against a herd they started: see `non_readers` and `slow_readers`.

    python -m benchmarks.abuse                      # 1,000 sockets on a 20,000-token answer
    python -m benchmarks.abuse --sockets 100 --label before
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson

from benchmarks import report
from benchmarks.harness import RssSampler, Stack, results_dir, rss_bytes

RESULTS = results_dir("results", "abuse")
MB = 1024 * 1024
TCP_ESTABLISHED = 1
#: a non-reader's receive buffer: small, so that the answer stays on herd's side
NON_READER_RCVBUF = 4096
#: a socket counts as cut at its deadline when cut at most this long after it
CUT_SLACK_S = 3.0


@dataclass
class Target:
    """A running herd: where it listens, its process (for RSS), its per-request deadline."""

    host: str
    port: int
    pid: int
    deadline_s: float
    model: str = "sim"


def chat_request(target: Target, prompt: str, stream: bool = True) -> bytes:
    body = orjson.dumps({"model": target.model, "messages": [{"role": "user", "content": prompt}], "stream": stream})
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {target.host}:{target.port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def complete(response: bytes) -> bool:
    """A whole streamed answer: 200, and the stream ends with [DONE] (no error event)."""
    return response.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in response and b'"error"' not in response


async def read_answer(target: Target, prompt: str, rate_bps: float = 0.0, timeout: float = 120.0) -> bytes:
    """One request read to the end; at most `rate_bps` bytes a second when given (a slow reader)."""
    reader, writer = await asyncio.open_connection(target.host, target.port, limit=64 * 1024)
    parts: list[bytes] = []
    try:
        writer.write(chat_request(target, prompt))
        started = time.monotonic()
        got = 0
        async with asyncio.timeout(timeout):
            while part := await reader.read(16 * 1024):
                parts.append(part)
                got += len(part)
                if rate_bps:
                    ahead = got / rate_bps - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        return b"".join(parts)
    except (OSError, TimeoutError):
        return b"".join(parts)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def open_non_reader(target: Target, payload: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NON_READER_RCVBUF)
    sock.connect((target.host, target.port))
    sock.sendall(payload)
    return sock


def tcp_state(sock: socket.socket) -> int:
    try:
        return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]
    except OSError:
        return 0


async def _wait_cut(socks: list[socket.socket], until: float) -> list[float | None]:
    """Seconds from herd's first byte on each socket (its answer started: the deadline runs from
    just before) to when herd cut it; None: not cut by `until`."""
    first: list[float | None] = [None] * len(socks)
    cut: list[float | None] = [None] * len(socks)
    while time.monotonic() < until:
        now = time.monotonic()
        for i, sock in enumerate(socks):
            if first[i] is None:
                with contextlib.suppress(OSError):
                    if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                        first[i] = now
            if cut[i] is None and tcp_state(sock) != TCP_ESTABLISHED:
                cut[i] = now - (first[i] or now)
        if all(c is not None for c in cut):
            break
        await asyncio.sleep(0.1)
    return cut


def _summary(name: str, target: Target, opened: int, wanted: int, base: int, sampler: RssSampler,
             after: int, cut: list[float | None], answered: int, readers: int, capped: bool) -> dict[str, Any]:
    times = sorted(c for c in cut if c is not None)
    on_time = sum(1 for c in times if c <= target.deadline_s + CUT_SLACK_S)
    return {
        "scenario": name,
        "sockets": opened,
        "sockets_wanted": wanted,
        "rss_before_mb": round(base / MB, 1),
        "peak_rss_mb": round(sampler.peak / MB, 1),
        "rss_after_close_mb": round(after / MB, 1),
        "cut": len(times),
        "cut_at_deadline": on_time,
        "cut_s_min": round(times[0], 2) if times else None,
        "cut_s_max": round(times[-1], 2) if times else None,
        "deadline_s": target.deadline_s,
        "answered": answered,
        "readers": readers,
        "capped": capped,
    }


def non_readers(target: Target, *, sockets: int = 1000, readers: int = 10, cached: bool = True, flights: int = 10,
                rss_cap_mb: float = 4000.0, tag: str = "") -> dict[str, Any]:
    """`sockets` clients that request a long answer and never read it, with `readers` normal
    clients on the same answer(s). cached: the answer is in herd's cache (one request reads it
    first); else the sockets are spread over `flights` fresh prompts. Stops opening sockets,
    and closes them early, once herd's RSS passes `rss_cap_mb` (capped: true)."""
    tag = tag or f"{os.getpid()}-{time.time_ns()}"
    prompts = [f"abuse {tag} {'cached' if cached else 'fresh'} {i}" for i in range(1 if cached else flights)]
    return asyncio.run(_non_readers(target, sockets, readers, cached, prompts, rss_cap_mb))


async def _non_readers(target: Target, sockets: int, readers: int, cached: bool, prompts: list[str],
                       rss_cap_mb: float) -> dict[str, Any]:
    if cached and not complete(await read_answer(target, prompts[0])):
        raise RuntimeError("herd did not answer the warm-up request")
    await asyncio.sleep(0.5)
    base = rss_bytes(target.pid)
    over = threading.Event()
    socks: list[socket.socket] = []

    def check(rss: int) -> None:
        if rss > rss_cap_mb * MB:
            over.set()

    with RssSampler(target.pid, on_sample=check) as sampler:
        payloads = [chat_request(target, p) for p in prompts]
        reading = [asyncio.create_task(read_answer(target, prompts[i % len(prompts)])) for i in range(readers)]
        for i in range(sockets):
            if over.is_set():
                break
            socks.append(open_non_reader(target, payloads[i % len(payloads)]))
            if i % 50 == 49:
                await asyncio.sleep(0)  # let the readers run
        until = time.monotonic() + target.deadline_s + CUT_SLACK_S + 20
        cutting = asyncio.create_task(_wait_cut(socks, until))
        while not cutting.done() and not over.is_set():
            await asyncio.wait([cutting], timeout=0.2)
        cutting.cancel()
        cut = await cutting if not over.is_set() else [None] * len(socks)
        answers = await asyncio.gather(*reading)
    for sock in socks:
        sock.close()
    await asyncio.sleep(2.0)
    after = rss_bytes(target.pid)
    name = f"non-readers, {'cached' if cached else f'fresh ({len(prompts)} flights)'}"
    return _summary(name, target, len(socks), sockets, base, sampler, after, cut,
                    sum(map(complete, answers)), readers, over.is_set())


def slow_readers(target: Target, *, sockets: int = 100, rate_bps: float = 1 * MB, readers: int = 5,
                 tag: str = "") -> dict[str, Any]:
    """`sockets` clients that read a cached long answer at `rate_bps`, fast enough to finish before
    the deadline: every one must get the whole answer, and none be cut."""
    tag = tag or f"{os.getpid()}-{time.time_ns()}"
    return asyncio.run(_slow_readers(target, sockets, rate_bps, readers, f"abuse {tag} slow"))


async def _slow_readers(target: Target, sockets: int, rate_bps: float, readers: int, prompt: str) -> dict[str, Any]:
    if not complete(await read_answer(target, prompt)):
        raise RuntimeError("herd did not answer the warm-up request")
    await asyncio.sleep(0.5)
    base = rss_bytes(target.pid)
    with RssSampler(target.pid) as sampler:
        started = time.monotonic()
        slow = [read_answer(target, prompt, rate_bps, timeout=target.deadline_s + 30) for _ in range(sockets)]
        fast = [read_answer(target, prompt) for _ in range(readers)]
        answers = await asyncio.gather(*slow, *fast)
        took = time.monotonic() - started
    await asyncio.sleep(2.0)
    after = rss_bytes(target.pid)
    done = [complete(a) for a in answers[:sockets]]
    # a slow reader that did not get everything was cut (by its deadline or otherwise)
    cut = [None if ok else took for ok in done]
    out = _summary(f"slow readers ({rate_bps / MB:g} MB/s)", target, sockets, sockets, base, sampler, after, cut,
                   sum(done) + sum(map(complete, answers[sockets:])), sockets + readers, False)
    out["took_s"] = round(took, 1)
    return out


# --------------------------------------------------------------------------- the command


def start_herd(stack: Stack, tokens: int, deadline_s: float) -> Target:
    sim = stack.simulator(reply_tokens=tokens)
    herd = stack.herd(sim.url, "exact", cache=True, request_timeout_s=deadline_s, log_level="warning",
                      overrides=["server.access_log=false"])
    return Target("127.0.0.1", herd.port, herd.pid, deadline_s)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("scenario", "sockets", "peak RSS", "RSS after close", "cut at deadline", "answered")
    lines = [head]
    for r in rows:
        sockets = f"{r['sockets']}" + (f" of {r['sockets_wanted']} (RSS cap)" if r["capped"] else "")
        cut = f"{r['cut_at_deadline']}/{r['sockets']}"
        if r["cut_s_max"] is not None and not r["scenario"].startswith("slow"):
            cut += f" ({r['cut_s_min']:.1f}-{r['cut_s_max']:.1f} s)"
        lines.append((r["scenario"], sockets, f"{r['peak_rss_mb']:.0f} MB (from {r['rss_before_mb']:.0f})",
                      f"{r['rss_after_close_mb']:.0f} MB", cut, f"{r['answered']}/{r['readers']}"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.abuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=1000, help="non-reading sockets per scenario")
    parser.add_argument("--slow", type=int, default=100, help="slow readers")
    parser.add_argument("--slow-rate", type=float, default=1.0, help="a slow reader's rate, MB/s")
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens in the answer")
    parser.add_argument("--deadline", type=float, default=10.0, help="herd's request_timeout_s")
    parser.add_argument("--flights", type=int, default=10, help="fresh flights the fresh non-readers spread over")
    parser.add_argument("--rss-cap-mb", type=float, default=4000.0,
                        help="stop a scenario once herd's RSS passes this (protects the machine)")
    parser.add_argument("--scenarios", default="cached,fresh,slow", help="comma-separated: cached, fresh, slow")
    parser.add_argument("--label", default="", help="names the files (results-<label>.json, summary-<label>.txt)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (the path is shown)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    rows = []
    for scenario in chosen:  # a fresh herd each, so one scenario's leftovers do not count in the next
        with Stack(keep_dir=args.keep_logs) as stack:
            target = start_herd(stack, args.tokens, args.deadline)
            print(f"abuse: {scenario} ... (logs: {stack.dir})" if args.keep_logs else f"abuse: {scenario} ...",
                  file=sys.stderr, flush=True)
            if scenario == "slow":
                row = slow_readers(target, sockets=args.slow, rate_bps=args.slow_rate * MB)
            else:
                row = non_readers(target, sockets=args.sockets, cached=scenario == "cached", flights=args.flights,
                                  rss_cap_mb=args.rss_cap_mb)
            rows.append(row)
            print(table([row]).splitlines()[1], file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.label}" if args.label else ""
    meta = {"tokens": args.tokens, "deadline_s": args.deadline, **report.provenance("python -m benchmarks.abuse", argv)}
    report.write_json(RESULTS / f"results{suffix}.json", {"schema": "herd-abuse/1", **meta, "rows": rows})
    git = meta["git"] or {}
    source = f"{meta['command']}, at {git.get('commit', '?')}"
    source += " with uncommitted changes" if git.get("dirty") else ""
    (RESULTS / f"summary{suffix}.txt").write_text(f"{source}\n\n{text}\n")
    print(f"wrote {RESULTS / f'results{suffix}.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
