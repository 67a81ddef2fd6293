"""herd's own cost, without the network: the ASGI app driven in-process, the upstream faked.

    python -m benchmarks.inprocess [--requests 20000] [--concurrency 256] [--burst 1000]
                                   [--subscribers 500] [--chunks 40] [--json PATH]

No sockets, no load generator, no simulator: what is left is herd's own work on its event
loop (routing, parsing, keys, the flight, rendering, metrics, the access log), so a change
to herd shows up here without the noise of the 2-core end-to-end runs. Three measurements:

1. requests: all-unique non-stream requests at a fixed concurrency; CPU per request, with
   the access log on (the default) and off.
2. burst: N identical non-stream requests wait on one flight; when the upstream answers,
   the time until the last of them has its answer handed to ASGI `send`.
3. fanout: N stream requests share one flight whose upstream sends a chunk every 20 ms;
   for each chunk, the time until the last subscriber has it handed to `send`.

The upstream adapter's `call` is replaced by one that answers at once (1) or when told
(2, 3). Everything else is herd as configured by `benchmarks.harness.herd_settings`, started and
stopped by its own lifespan. (1) also counts the full garbage collections and their pauses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import os
import statistics
import time
from pathlib import Path

import orjson
import uvloop

from benchmarks import report
from benchmarks.harness import herd_settings
from proxy.app import create_app
from proxy.chunks import Chunk, split
from proxy.logs import setup_logging

COMPLETION = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "echo: hello " * 8},
                 "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 16, "total_tokens": 26},
}
RAW = orjson.dumps(COMPLETION)


def scope_for(body: bytes) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {},
        "headers": [(b"host", b"herd"), (b"content-type", b"application/json"),
                    (b"authorization", b"Bearer sk-inprocess"), (b"content-length", str(len(body)).encode())],
    }


async def call(app, body: bytes, on_body=None) -> int:
    """One request through the ASGI app; its status."""
    sent = False
    never = asyncio.get_running_loop().create_future()
    status = 0

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await never  # the client never leaves

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif on_body is not None:
            on_body()

    await app(scope_for(body), receive, send)
    return status


@contextlib.asynccontextmanager
async def started_app(access_log: bool, chat):
    """herd's app, started and stopped by its own lifespan, with a faked upstream."""
    app = create_app(herd_settings("http://127.0.0.1:9", server={"access_log": access_log}))
    def call(wire, body, options, stream=True):  # what the dispatcher calls, for every API's wire
        return chat(body, options, stream)

    for upstream in app.state.gateway.upstreams.values():
        upstream.call = call
    async with app.app.router.lifespan_context(app.app):
        yield app


class Collections:
    """Full (generation 2) garbage collections while it is entered: how many, how long."""

    def __init__(self) -> None:
        self.pauses_ms: list[float] = []
        self._started = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses_ms.append((time.perf_counter() - self._started) * 1000)

    def __enter__(self) -> Collections:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)


async def requests_cpu(n: int, concurrency: int, access_log: bool) -> dict:
    async def chat(body, options, stream=True):
        await asyncio.sleep(0)
        yield split(orjson.loads(RAW), RAW)

    bodies = iter(orjson.dumps({"model": "m", "messages": [{"role": "user", "content": f"unique prompt {i}"}]})
                  for i in range(10**9))
    async with started_app(access_log, chat) as app:

        async def worker(count: int) -> None:
            for _ in range(count):
                assert await call(app, next(bodies)) == 200

        await asyncio.gather(*[worker(max(1, n // concurrency // 4)) for _ in range(concurrency)])  # warm-up
        per = max(1, n // concurrency)
        with Collections() as full:
            cpu, wall = time.process_time(), time.perf_counter()
            await asyncio.gather(*[worker(per) for _ in range(concurrency)])
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    done = per * concurrency
    pauses = sorted(full.pauses_ms)
    return {"requests": done, "cpu_us_per_request": cpu / done * 1e6, "req_per_s": done / wall,
            "full_collections": len(pauses), "full_collection_ms_max": pauses[-1] if pauses else 0.0,
            "full_collection_ms_p50": statistics.median(pauses) if pauses else 0.0}


def _stamp(times: list[float]) -> None:
    times.append(time.perf_counter())


async def burst(n: int) -> dict:
    gate = asyncio.Event()

    async def chat(body, options, stream=True):
        await gate.wait()
        yield split(orjson.loads(RAW), RAW)

    lags = []
    async with started_app(True, chat) as app:
        for rnd in range(3):
            gate.clear()
            answered: list[float] = []
            body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": f"the same question {rnd}"}]})
            stamp = functools.partial(_stamp, answered)
            tasks = [asyncio.create_task(call(app, body, stamp)) for _ in range(n)]
            await asyncio.sleep(0.2)  # every request is waiting on the flight
            start = time.perf_counter()
            gate.set()
            assert set(await asyncio.gather(*tasks)) == {200}
            lags.append((max(answered) - start) * 1000)
    return {"waiters": n, "last_answer_ms": lags}


async def fanout(n: int, chunks: int) -> dict:
    published: list[float] = []

    async def chat(body, options, stream=True):
        for i in range(chunks):
            await asyncio.sleep(0.02)
            data = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                    "choices": [{"index": 0, "delta": {"content": f"w{i} "},
                                 "finish_reason": "stop" if i == chunks - 1 else None}]}
            published.append(time.perf_counter())
            yield [Chunk(data, orjson.dumps(data))]

    last: dict[int, float] = {}

    def on_body() -> None:
        last[len(published)] = time.perf_counter()  # the latest write of the latest chunk

    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "stream it"}], "stream": True})
    async with started_app(True, chat) as app:
        cpu = time.process_time()
        assert set(await asyncio.gather(*[call(app, body, on_body) for _ in range(n)])) == {200}
        cpu = time.process_time() - cpu
    spans = sorted((last[i] - published[i - 1]) * 1000 for i in range(1, chunks) if i in last)
    return {"subscribers": n, "chunks": chunks, "fanout_ms_p50": statistics.median(spans),
            "fanout_ms_max": spans[-1], "cpu_us_per_subscriber_chunk": cpu / (n * chunks) * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--json", default="benchmarks/out/inprocess.json")
    args = parser.parse_args(argv)
    source = report.provenance("python -m benchmarks.inprocess", argv)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        setup_logging("info")  # the access log is written, to nowhere
        result = {
            **source,
            "requests": {log: uvloop.run(requests_cpu(args.requests, args.concurrency, log == "on"))
                         for log in ("on", "off")},
            "burst": uvloop.run(burst(args.burst)),
            "fanout": uvloop.run(fanout(args.subscribers, args.chunks)),
        }
    r, b, f = result["requests"], result["burst"], result["fanout"]
    print(f"all-unique requests, {args.concurrency} at a time: herd CPU per request "
          f"{r['on']['cpu_us_per_request']:.1f} us (access log on), {r['off']['cpu_us_per_request']:.1f} us (off); "
          f"{r['on']['full_collections']} full garbage collections, longest {r['on']['full_collection_ms_max']:.1f} ms")
    print(f"burst of {b['waiters']:,} on one flight: last answer handed to send after "
          + " / ".join(f"{v:.1f}" for v in b["last_answer_ms"]) + " ms")
    print(f"{f['subscribers']} stream subscribers: each chunk handed to the last of them after "
          f"p50 {f['fanout_ms_p50']:.2f} ms (max {f['fanout_ms_max']:.2f} ms); "
          f"{f['cpu_us_per_subscriber_chunk']:.1f} us CPU per subscriber and chunk")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
