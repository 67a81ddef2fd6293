"""`herd bench chaos`: fault scenarios against a real herd process, on loopback only.

herd runs as a process in front of two upstreams: herd's simulator (model "*") and a small
misbehaving upstream (benchmarks/faulty.py, model "faulty"). Each scenario sets a fault
schedule (or misbehaves as a client), sends bounded bursts, and sorts every client's ending:

    answered   the right answer, whole (stream: every chunk, then [DONE])
    error      a proper OpenAI-format error: a 4xx/5xx JSON error body, or a stream that
               ends with an error event after a correct prefix; for misbehaving clients,
               herd cutting them off (their deadline, a slow reader dropped)
    hung       nothing decided by the client's own deadline (herd's request_timeout_s + 5 s)
    corrupted  anything else: a wrong or mixed answer, a plain-text error, a stream cut with
               no error, a key in a body, a connection herd dropped

It prints a table (scenario, requests, answered, proper errors, hung, corrupted, upstream
calls, peak RSS of herd) and writes results.json under --out (default
benchmarks/results/chaos/). `--quick` is a small size for CI (tests/test_chaos.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks import report
from benchmarks.faulty import answer_text
from benchmarks.harness import (
    HOST,
    Herd,
    Proc,
    RssSampler,
    Stack,
    chat_calls,
    herd_config,
    http_json,
    results_dir,
    sim_faults,
    sim_reset,
    sim_settings,
)
from benchmarks.simulator import expected_text

PROVIDER_KEY = "sk-chaos-provider-key-0123456789"  # herd's key for the faulty upstream: never in a body
HEADERS = ["scenario", "requests", "answered", "proper errors", "hung", "corrupted", "upstream calls",
           "peak RSS MB"]


@dataclass
class Size:
    burst: int = 400  # requests in a burst (a quarter as many distinct prompts)
    rate: float = 20.0  # requests a second in the blip scenario
    blip_run_s: float = 8.0  # how long that scenario sends
    misbehaving: int = 100  # non-readers, slow readers, drip-fed bodies, disconnecting clients
    request_timeout_s: float = 8.0  # herd's per-request deadline

    @classmethod
    def quick(cls) -> Size:
        return cls(burst=40, blip_run_s=3.5, misbehaving=12, request_timeout_s=3.0)


@dataclass
class Tally:
    requests: int = 0
    answered: int = 0
    errors: int = 0
    hung: int = 0
    corrupted: int = 0
    misbehaving: int = 0  # clients that misbehaved on purpose and are not counted above
    upstream_calls: int = 0
    peak_rss_mb: float = 0.0
    notes: list[str] = field(default_factory=list)  # the first few corrupted or hung endings
    error_kinds: dict[str, int] = field(default_factory=dict)  # proper errors by status and code
    failed_after_blip: int = 0  # the blip scenarios: failures that started after blip + probe interval

    def add(self, outcome: str, detail: str = "") -> None:
        self.requests += 1
        column = {"answered": "answered", "error": "errors", "hung": "hung"}.get(outcome, "corrupted")
        setattr(self, column, getattr(self, column) + 1)
        if outcome == "error":
            self.error_kinds[detail] = self.error_kinds.get(detail, 0) + 1
        if outcome in ("hung", "corrupted") and len(self.notes) < 5:
            self.notes.append(f"{outcome}: {detail}"[:300])


# --------------------------------------------------------------------------- judging one ending


def judge(status: int, content_type: str, raw: bytes, stream: bool, expected: str,
          complete: bool = True) -> tuple[str, str]:
    """(outcome, why) for one response; `complete`: the body ended (not cut by our own bound)."""
    if PROVIDER_KEY.encode() in raw:
        return "corrupted", "the provider key is in the body"
    if status >= 400:
        try:
            error = orjson.loads(raw).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            error = None
        if content_type.startswith("application/json") and isinstance(error, dict) and error.get("message"):
            return "error", f"HTTP {status} {error.get('code') or error.get('type')}"
        return "corrupted", f"HTTP {status} with a body that is not an OpenAI error: {raw[:120]!r}"
    if status != 200:
        return "corrupted", f"HTTP {status}"
    if not stream:
        try:
            content = orjson.loads(raw)["choices"][0]["message"]["content"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            return "corrupted", f"a 200 that is not a chat completion: {raw[:120]!r}"
        return ("answered", "") if content == expected else ("corrupted", f"wrong answer {content[:60]!r}")
    text, done, error = [], False, None
    for event in raw.split(b"\n\n"):
        if not event.strip():
            continue
        if done:
            return "corrupted", "an event after [DONE]"
        if not event.startswith(b"data: "):
            return "corrupted", f"not an SSE data event: {event[:80]!r}"
        data = event[6:]
        if data == b"[DONE]":
            done = True
            continue
        if error is not None:
            return "corrupted", "an event after the error (other than [DONE])"
        try:
            chunk = orjson.loads(data)
            if "error" in chunk:
                error = chunk["error"]
                continue
            text += [c["delta"].get("content") or "" for c in chunk.get("choices") or () if "delta" in c]
        except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError):
            return "corrupted", f"an event that is not a chat chunk: {data[:80]!r}"
    content = "".join(text)
    if not expected.startswith(content):
        return "corrupted", f"a stream that is not the answer: {content[:60]!r}"
    if error is not None:
        if isinstance(error, dict) and error.get("message"):
            return "error", f"stream error event {error.get('code') or error.get('type')}"
        return "corrupted", "an error event that is not an OpenAI error"
    if done and content == expected:
        return "answered", ""
    if complete:
        return "corrupted", "a stream cut with no error and no [DONE]"
    return "error", "cut off"  # by herd, while the client misbehaved


# --------------------------------------------------------------------------- the environment


class Env:
    def __init__(self, herd: Herd, sim: Proc, faulty: Proc, size: Size) -> None:
        self.herd, self.sim, self.faulty, self.size = herd, sim, faulty, size
        self.url = herd.url + "/v1/chat/completions"
        self.deadline_s = size.request_timeout_s + 5.0
        self.run = f"{time.time_ns():x}"
        self.session: aiohttp.ClientSession | None = None
        self.sim_settings: dict[str, Any] = {}
        self.scenario = ""  # the one running: part of every prompt, so no two scenarios share one

    def expected(self, model: str, text: str) -> str:
        body = {"messages": [{"role": "user", "content": text}]}
        return answer_text(body) if model.startswith("faulty") else expected_text(body, self.sim_settings)

    async def ask(self, model: str, text: str, stream: bool) -> tuple[str, str]:
        """One well-behaved client: (outcome, why)."""
        body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}], "stream": stream})
        try:
            async with asyncio.timeout(self.deadline_s):
                async with self.session.post(self.url, data=body, headers={"content-type": "application/json"}) as r:
                    raw = await r.read()
                    return judge(r.status, r.content_type, raw, stream, self.expected(model, text))
        except TimeoutError:
            return "hung", f"no end within {self.deadline_s:g}s"
        except aiohttp.ClientError as e:
            return "corrupted", f"connection: {type(e).__name__}"

    async def burst(self, tally: Tally, model: str, n: int, distinct: int | None = None) -> list[str]:
        """n requests at once (half streaming) over `distinct` prompts (default n/4); their texts."""
        distinct = distinct or max(1, n // 4)
        texts = [f"{self.run} {self.scenario} {i % distinct}" for i in range(n)]
        outcomes = await asyncio.gather(*[self.ask(model, t, i % 2 == 0) for i, t in enumerate(texts)])
        for outcome, why in outcomes:
            tally.add(outcome, why)
        return texts

    # the upstreams' controls (blocking, small)
    def faulty_fault(self, mode: str, **options: Any) -> None:
        http_json("POST", self.faulty.url + "/_faulty/fault", {"mode": mode, **options})

    def reset_upstreams(self, sim: dict[str, Any] | None = None, faulty_ttft_ms: float = 0.0) -> None:
        self.sim_settings = dict(sim or {})
        sim_reset(self.sim.url)
        if sim:
            sim_settings(self.sim.url, **sim)
        http_json("POST", self.faulty.url + "/_faulty/reset")
        http_json("POST", self.faulty.url + "/_faulty/settings", {"ttft_ms": faulty_ttft_ms})

    def upstream_calls(self) -> int:
        return chat_calls(self.sim.url) + int(http_json("GET", self.faulty.url + "/_faulty/stats")["calls"])

    async def settle(self) -> None:
        """Until both routes answer again (a circuit a scenario opened has closed)."""
        for model in ("sim", "faulty"):
            for i in range(80):
                if (await self.ask(model, f"{self.run} settle {model} {i} {time.monotonic()}", False))[0] == "answered":
                    break
                await asyncio.sleep(0.5)


# --------------------------------------------------------------------------- raw-socket clients


def _request_bytes(text: str, stream: bool, length: int | None = None) -> tuple[bytes, bytes]:
    body = orjson.dumps({"model": "sim", "messages": [{"role": "user", "content": text}], "stream": stream})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\n"
            f"content-length: {length if length is not None else len(body)}\r\n\r\n").encode()
    return head, body


def _parse_response(raw: bytes) -> tuple[int, str, bytes, bool] | None:
    """(status, content type, body, whole) of a raw HTTP/1.1 response (chunked or sized), or None."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body, whole = bytearray(), False
        while True:
            size_line, sep, rest = rest.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                whole = True
                break
            body += rest[:size]
            rest = rest[size + 2:]
        return status, headers.get("content-type", ""), bytes(body), whole
    length = int(headers.get("content-length", "0"))
    return status, headers.get("content-type", ""), rest[:length], len(rest) >= length


async def _drain(reader: asyncio.StreamReader, seconds: float) -> tuple[bytes, bool]:
    """What the socket holds within `seconds`; True if herd closed it."""
    data = bytearray()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(seconds):
            while part := await reader.read(65536):
                data += part
            return bytes(data), True
    return bytes(data), False


def _judge_raw(raw: bytes, closed: bool, stream: bool, expected: str) -> tuple[str, str]:
    parsed = _parse_response(raw)
    if parsed is None:
        return ("error", "cut off") if closed else ("hung", "no response and the connection still open")
    status, content_type, body, whole = parsed
    if not whole and not closed:
        return "hung", "a response neither finished nor cut"
    return judge(status, content_type, body, stream, expected, complete=whole)


async def _open(rcvbuf: int | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = HOST, int(_ENV_PORT[0])
    if rcvbuf is None:
        return await asyncio.open_connection(host, port)
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    return await asyncio.open_connection(sock=sock, limit=2**20)


_ENV_PORT: list[int] = [0]


# --------------------------------------------------------------------------- scenarios


Scenario = Callable[[Env, Tally], Awaitable[None]]


def _fault_burst(model: str, setup: Callable[[Env], None], second_pass: bool = False) -> Scenario:
    """A burst while `setup`'s fault is on; `second_pass`: the same prompts again once it is off
    (a broken answer must not have been cached)."""

    async def run(env: Env, tally: Tally) -> None:
        setup(env)
        texts = await env.burst(tally, model, env.size.burst)
        if second_pass:
            env.faulty_fault("ok")
            await env.settle()  # a circuit the fault opened has closed again
            outcomes = await asyncio.gather(*[env.ask(model, t, i % 2 == 1) for i, t in enumerate(texts)])
            for outcome, why in outcomes:
                tally.add(outcome, why)

    return run


def _sim(env: Env, *faults: dict[str, Any], **settings: Any) -> None:
    env.reset_upstreams(settings or None)
    sim_faults(env.sim.url, *faults)


def blip_at_rate(model: str) -> Scenario:
    """Steady requests at `rate`; the faulty upstream answers 500 for one second from 1 s in.
    `failed_after_blip`: the requests that failed although they started more than one probe
    interval (1.5 s) after the blip ended (the target: none)."""

    async def run(env: Env, tally: Tally) -> None:
        size, t0, tasks, ends = env.size, time.monotonic(), [], {}
        env.reset_upstreams()

        async def one(i: int) -> None:
            started = time.monotonic()
            outcome, why = await env.ask(model, f"{env.run} blip {i}", i % 2 == 0)
            tally.add(outcome, why)
            if outcome != "answered" and started > ends.get("blip", 1e18) + 1.5:
                tally.failed_after_blip += 1

        for i in range(int(size.rate * size.blip_run_s)):
            if i == int(size.rate):
                env.faulty_fault("status", status=500, for_s=1.0)
                ends["blip"] = time.monotonic() + 1.0
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(max(0.0, t0 + (i + 1) / size.rate - time.monotonic()))
        await asyncio.gather(*tasks)

    return run


async def non_readers(env: Env, tally: Tally) -> None:
    """Clients that ask for a long stream and never read, held past their deadline; meanwhile
    well-behaved clients must be served."""
    env.reset_upstreams({"reply_tokens": 4000})
    text = f"{env.run} never reads"
    sockets = []
    for _ in range(env.size.misbehaving):
        reader, writer = await _open(rcvbuf=4096)
        head, body = _request_bytes(text, True)
        writer.write(head + body)
        sockets.append((reader, writer))
    await env.burst(tally, "sim", 20, distinct=5)
    await asyncio.sleep(env.size.request_timeout_s + 2.0)
    expected = env.expected("sim", text)
    for reader, writer in sockets:
        raw, closed = await _drain(reader, 1.0)
        tally.add(*_judge_raw(raw, closed, True, expected))
        writer.close()


async def slow_readers(env: Env, tally: Tally) -> None:
    """Clients that read a long stream (about 160 KB) 2 KB every 50 ms. Each must end: the
    whole answer, or cut off by herd; only one still open with nothing arriving is hung."""
    env.reset_upstreams({"reply_tokens": 1000})
    text = f"{env.run} reads slowly"
    expected = env.expected("sim", text)

    async def one() -> None:
        reader, writer = await _open(rcvbuf=4096)
        head, body = _request_bytes(text, True)
        writer.write(head + body)
        data, closed = bytearray(), False
        bound = time.monotonic() + env.deadline_s + 10.0  # time enough to read it all at this pace
        with contextlib.suppress(ConnectionError):
            while time.monotonic() < bound:
                part = await reader.read(2048)
                if not part:
                    closed = True
                    break
                data += part
                parsed = _parse_response(bytes(data))
                if parsed is not None and parsed[3]:
                    break
                await asyncio.sleep(0.05)
        tally.add(*_judge_raw(bytes(data), closed, True, expected))
        writer.close()

    await asyncio.gather(*[one() for _ in range(env.size.misbehaving)], env.burst(tally, "sim", 20, 5))


async def drip_fed(env: Env, tally: Tally) -> None:
    """Bodies sent a few bytes at a time within the body deadline (answered), and bodies that
    declare a length and never send it all (a 408 at the deadline)."""
    env.reset_upstreams()

    async def one(i: int) -> None:
        text = f"{env.run} drip {i}"
        head, body = _request_bytes(text, False)
        reader, writer = await _open()
        writer.write(head)
        if i % 2 == 0:
            step = max(1, len(body) // 10)
            for k in range(0, len(body), step):
                writer.write(body[k:k + step])
                await asyncio.sleep(0.1)
        else:
            writer.write(body[: len(body) // 2])
        raw, closed = await _drain(reader, env.deadline_s)
        tally.add(*_judge_raw(raw, closed, False, env.expected("sim", text)))
        writer.close()

    await asyncio.gather(*[one(i) for i in range(env.size.misbehaving)])


async def disconnects(env: Env, tally: Tally) -> None:
    """Half the clients of a flight go away (before the answer, or after its first chunk);
    the others must get the whole answer."""
    env.reset_upstreams({"tokens_per_s": 50, "reply_tokens": 40})
    text = f"{env.run} some leave"
    body = orjson.dumps({"model": "sim", "messages": [{"role": "user", "content": text}], "stream": True})

    async def leaver(i: int) -> None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with asyncio.timeout(env.deadline_s):
                async with env.session.post(env.url, data=body, headers={"content-type": "application/json"}) as r:
                    if i % 2:
                        await r.content.readany()
        tally.misbehaving += 1

    async def stayer(i: int) -> None:
        tally.add(*await env.ask("sim", text, i % 2 == 0))

    n = env.size.misbehaving
    await asyncio.gather(*[leaver(i) for i in range(n)], *[stayer(i) for i in range(n)])


SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "5xx blip (burst)": ("faulty: HTTP 503 for 0.5 s under a burst", _fault_burst(
        "faulty", lambda env: (env.reset_upstreams(faulty_ttft_ms=100), env.faulty_fault("status", status=503,
                                                                                          for_s=0.5)))),
    "5xx x burst/8": ("simulator: the next burst/8 calls get HTTP 500", _fault_burst(
        "sim", lambda env: _sim(env, {"kind": "status", "status": 500, "times": max(1, env.size.burst // 8)},
                                ttft_ms=100))),
    "reset before first byte": ("simulator: burst/8 calls reset before any byte", _fault_burst(
        "sim", lambda env: _sim(env, {"kind": "reset", "times": max(1, env.size.burst // 8)}, ttft_ms=100))),
    "reset mid-stream": ("simulator: burst/8 calls reset after 3 chunks", _fault_burst(
        "sim", lambda env: _sim(env, {"kind": "reset", "after_chunks": 3, "times": max(1, env.size.burst // 8)},
                                ttft_ms=100, tokens_per_s=200, reply_tokens=20))),
    "stall mid-stream": ("simulator: burst/16 calls stall after 2 chunks (herd's idle timeout: 2 s)", _fault_burst(
        "sim", lambda env: _sim(env, {"kind": "stall", "after_chunks": 2, "stall_s": 30,
                                      "times": max(1, env.size.burst // 16)},
                                ttft_ms=100, tokens_per_s=200, reply_tokens=20))),
    "SSE keep-alives only": ("faulty: burst/8 streams turn to `: keep-alive` comments half way", _fault_burst(
        "faulty", lambda env: (env.reset_upstreams(faulty_ttft_ms=100),
                               env.faulty_fault("keepalive", stall_s=30, times=max(1, env.size.burst // 8))))),
    "upstream drips bytes": ("faulty: every call's stream written 7 bytes at a time", _fault_burst(
        "faulty", lambda env: (env.reset_upstreams(faulty_ttft_ms=100), env.faulty_fault("drip")))),
    "429 storm": ("simulator: burst/2 calls get 429 with Retry-After: 1", _fault_burst(
        "sim", lambda env: _sim(env, {"kind": "status", "status": 429, "headers": {"retry-after": "1"},
                                      "times": max(1, env.size.burst // 2)}, ttft_ms=100))),
    "malformed JSON": ("faulty: burst/2 truncated JSON bodies, then the same prompts again", _fault_burst(
        "faulty", lambda env: (env.reset_upstreams(faulty_ttft_ms=100),
                               env.faulty_fault("bad_json", times=max(1, env.size.burst // 2))), second_pass=True)),
    "malformed SSE": ("faulty: burst/2 SSE events that are not JSON, then again", _fault_burst(
        "faulty", lambda env: (env.reset_upstreams(faulty_ttft_ms=100),
                               env.faulty_fault("bad_sse", times=max(1, env.size.burst // 2))), second_pass=True)),
    "non-object JSON": ("faulty: burst/2 answers with JSON that is not an object, then again", _fault_burst(
        "faulty", lambda env: (env.reset_upstreams(faulty_ttft_ms=100),
                               env.faulty_fault("non_object", times=max(1, env.size.burst // 2))), second_pass=True)),
    "string delta": ("faulty: burst/2 answers with a string delta, then again", _fault_burst(
        "faulty", lambda env: (env.reset_upstreams(faulty_ttft_ms=100),
                               env.faulty_fault("string_delta", times=max(1, env.size.burst // 2))),
        second_pass=True)),
    "key echoed in error": ("faulty: every call a 500 whose body repeats the Authorization header", _fault_burst(
        "faulty", lambda env: (env.reset_upstreams(faulty_ttft_ms=100),
                               env.faulty_fault("echo_key", times=env.size.burst)))),
    "1 s blip at 20 req/s": ("faulty: HTTP 500 for 1 s under steady load", blip_at_rate("faulty")),
    "1 s blip (retries 0)": ("the same with retries = 0: the breaker alone", blip_at_rate("faulty-noretry")),
    "non-readers": ("clients that never read a long stream, held past their deadline", non_readers),
    "slow readers": ("clients that read a long stream 2 KB every 50 ms", slow_readers),
    "drip-fed bodies": ("bodies sent in slices; half never finished (body deadline 3 s)", drip_fed),
    "disconnects": ("half the clients of a flight leave; the rest must be answered", disconnects),
}


# --------------------------------------------------------------------------- running


def chaos_config(sim_url: str, faulty_url: str, size: Size) -> dict[str, Any]:
    data = herd_config(sim_url, "exact", cache=True, request_timeout_s=size.request_timeout_s,
                       log_level="warning", overrides=["server.access_log=false", "server.body_timeout_s=3"])
    timeouts = {"first_byte_timeout_s": 4, "idle_timeout_s": 2, "total_timeout_s": 15}
    data["upstreams"]["sim"].update(timeouts)
    data["upstreams"]["faulty"] = {"kind": "openai", "base_url": faulty_url + "/v1", "api_key": PROVIDER_KEY,
                                   "max_connections": 4096, **timeouts}
    data["upstreams"]["faulty_noretry"] = {**data["upstreams"]["faulty"], "retries": 0}
    data["routes"] = [{"model": "faulty", "upstream": "faulty"},
                      {"model": "faulty-noretry", "upstream": "faulty_noretry"}, {"model": "*", "upstream": "sim"}]
    return data


async def run_scenarios(stack: Stack, size: Size, names: list[str] | None = None,
                        say: Callable[[str], None] = lambda s: None) -> dict[str, Tally]:
    """Start the simulator, the faulty upstream and herd, run each scenario, return the tallies."""
    sim = stack.simulator()
    faulty = stack._proc("faulty", lambda port: [sys.executable, "-m", "benchmarks.faulty", "--port", str(port)],
                         ready_path="/health")
    config = chaos_config(sim.url, faulty.url, size)
    herd = stack.start(lambda port: Herd(config, stack.dir, "herd-chaos", port, stack.dir / "herd-chaos.log"))
    assert isinstance(herd, Herd)
    _ENV_PORT[0] = herd.port
    env = Env(herd, sim, faulty, size)
    results: dict[str, Tally] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        env.session = session
        for name in names or list(SCENARIOS):
            _, scenario = SCENARIOS[name]
            env.scenario = name.replace(" ", "-")
            env.reset_upstreams()
            await env.settle()
            env.reset_upstreams()
            tally = Tally()
            started = time.monotonic()
            with RssSampler(herd.pid) as rss:
                await scenario(env, tally)
            with contextlib.suppress(Exception):
                tally.upstream_calls = env.upstream_calls()
            tally.peak_rss_mb = round(rss.peak / 2**20, 1)
            results[name] = tally
            say(f"  {name}: {tally.requests} requests, {tally.answered} answered, {tally.errors} errors, "
                f"{tally.hung} hung, {tally.corrupted} corrupted ({time.monotonic() - started:.1f}s)")
        if not herd.alive():
            raise RuntimeError(f"herd died during the chaos run:\n{herd.log_tail()}")
    return results


def table(results: dict[str, Tally]) -> str:
    rows = [[name, t.requests, t.answered, t.errors, t.hung, t.corrupted, t.upstream_calls, t.peak_rss_mb]
            for name, t in results.items()]
    return report.table(HEADERS, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="herd bench chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small size for CI (well under a minute)")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated scenario names (default: all)")
    parser.add_argument("--out", metavar="DIR", help="where results.json goes (default benchmarks/results/chaos/)")
    parser.add_argument("--list", action="store_true", help="the scenarios")
    args = parser.parse_args(argv)
    if args.list:
        print(report.table(["scenario", "what"], [[n, what] for n, (what, _) in SCENARIOS.items()]))
        return 0
    names = [n.strip() for n in args.only.split(",")] if args.only else None
    unknown = set(names or ()) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {sorted(unknown)} (see --list)")
    size = Size.quick() if args.quick else Size()
    out = Path(args.out) if args.out else results_dir("results", "chaos")
    out.mkdir(parents=True, exist_ok=True)
    t0, started = time.monotonic(), datetime.now(UTC)
    source = report.provenance("herd bench chaos", argv)  # the command, and the commit the processes start from

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    say(f"herd bench chaos{' --quick' if args.quick else ''}: {len(names or SCENARIOS)} scenarios")
    with Stack() as stack:
        results = asyncio.run(run_scenarios(stack, size, names, say))
    text = table(results)
    report.write_json(out / "results.json", {
        "schema": "herd-bench-chaos/1",
        "command": source["command"],
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - t0, 1),
        "machine": report.machine(),
        "git": source["git"],
        "size": asdict(size),
        "scenarios": {name: {"what": SCENARIOS[name][0], **asdict(t)} for name, t in results.items()},
        "table": text,
    })
    (out / "summary.txt").write_text(f"{source['command']}\n\n{text}\n")
    print(text)
    print(f"\nwrote {out / 'results.json'} and summary.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
