"""Two `herd bench` workloads for the APIs beside chat.

`herd bench messages`: Anthropic-SDK traffic. N `anthropic.AsyncAnthropic` clients ask one
question at once (a share with `messages.stream`, the rest `messages.create`), on a model
routed to an Anthropic upstream (the body goes as it came) and on one routed to an
OpenAI-compatible upstream (translated). Every stream is checked whole and in order
(message_start ... message_stop, its text deltas adding up to the final message), every
answer the same text; reported: upstream calls, time to first event, completion times.

`herd bench embeddings`: a RAG ingest that re-embeds the same chunks. W workers each send
B batches of K chunks drawn (Zipf) from D distinct chunks, all at once and again; the
upstream's calls and the inputs it embedded are counted, and every vector is checked
against the simulator's (a deterministic function of the text). Through herd with its
cache on, against the simulator directly.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from benchmarks import report
from benchmarks.harness import Stack, sim_reset, sim_stats
from benchmarks.measure import rotation, say, setup, sim_settings_for
from benchmarks.simulator import expected_embedding

CLAUDE = "claude-3-5-haiku-latest"  # herd routes claude-* to its Anthropic upstream
GPT = "gpt-4o-mini"  # and the rest to its OpenAI upstream (both the simulator)
UPSTREAM_PATH = {CLAUDE: "/v1/messages", GPT: "/v1/chat/completions"}


# -- messages --------------------------------------------------------------------------------


async def _messages_client(c: Any, request: dict, stream: bool, t0: float) -> dict[str, Any]:
    import anthropic

    out: dict[str, Any] = {"stream": stream, "ok": False, "text": None, "why": ""}
    try:
        if not stream:
            message = await c.messages.create(**request)
            out["first"] = out["done"] = time.perf_counter() - t0
            out["text"] = message.content[0].text
            out["ok"] = message.stop_reason == "end_turn"
            return out
        kinds, deltas = [], []
        async with c.messages.stream(**request) as s:
            async for event in s:
                if not kinds:
                    out["first"] = time.perf_counter() - t0
                kinds.append(event.type)
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    deltas.append(event.delta.text)
            final = await s.get_final_message()
        out["done"] = time.perf_counter() - t0
        text = final.content[0].text
        if kinds[0] != "message_start" or kinds[-1] != "message_stop" or "message_delta" not in kinds:
            out["why"] = f"stream from {kinds[0]} to {kinds[-1]}"
        elif "".join(deltas) != text:
            out["why"] = "deltas do not add up to the final text"
        else:
            out["text"], out["ok"] = text, True
    except (anthropic.APIError, IndexError, AttributeError) as e:
        out["why"] = type(e).__name__
    return out


async def _messages_burst(url: str, model: str, n: int, share: float, prompt: str, timeout: float) -> list[dict]:
    import anthropic
    import httpx2 as httpx  # this anthropic SDK ships its own httpx

    request = {"model": model, "max_tokens": 256, "system": "answer in one line",
               "messages": [{"role": "user", "content": prompt}], "extra_body": {"temperature": 0}}
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        c = anthropic.AsyncAnthropic(base_url=url, api_key="sk-ant-bench", max_retries=0, http_client=http)
        streams = round(n * share)
        t0 = time.perf_counter()
        return await asyncio.gather(*[_messages_client(c, request, i < streams, t0) for i in range(n)])


def run_messages(args: argparse.Namespace, stack: Stack, out: Path) -> dict[str, Any]:
    n = args.clients
    share = args.stream_share if args.stream_share is not None else 0.5
    settings = sim_settings_for(args, {"ttft_ms": 200.0, "tokens_per_s": 20.0, "reply_tokens": 40})
    bench = setup(args, stack, settings, anthropic=True)
    say(f"\n== messages: {n:,} Anthropic SDK clients of one prompt ({share:.0%} streaming), {args.rounds} round(s)")
    per: dict[tuple[str, str], dict[str, list]] = {}
    for r in range(args.rounds):
        for t in rotation(bench.targets, r):
            for model in (CLAUDE, GPT):
                if t.kind == "direct" and model == GPT:
                    continue  # the simulator's /v1/messages is the Anthropic upstream: one row suffices
                prompt = f"messages fan-out round {r + 1} seed {args.seed} for {t.name} {model}"
                sim_reset(bench.sim_url)
                clients = asyncio.run(_messages_burst(t.url, model, n, share, prompt, args.timeout))
                calls = int(sim_stats(bench.sim_url, log=False)["by_path"].get(UPSTREAM_PATH[model], 0))
                texts = {c["text"] for c in clients if c["ok"]}
                if len(texts) > 1:  # every client must get the one answer
                    for c in clients:
                        c["ok"], c["why"] = False, "answers differ"
                data = per.setdefault((t.name, model), {"calls": [], "clients": []})
                data["calls"].append(calls)
                data["clients"].extend(clients)
                bad = sum(not c["ok"] for c in clients)
                say(f"  {t.name} {model} r{r + 1}: {calls} upstream call(s), {bad} wrong or missing")
    rows, targets, checks = [], {}, []
    for (name, model), data in per.items():
        clients = data["clients"]
        streams = [c for c in clients if c["stream"] and c["ok"]]
        whole = [c for c in clients if not c["stream"] and c["ok"]]
        s = {"clients": len(clients), "upstream_calls_per_round": data["calls"],
             "wrong_or_missing": sum(not c["ok"] for c in clients),
             "reasons": sorted({c["why"] for c in clients if c["why"]}),
             "stream_first_event_ms": report.dist_ms([c["first"] for c in streams]),
             "stream_done_ms": report.dist_ms([c["done"] for c in streams]),
             "json_done_ms": report.dist_ms([c["done"] for c in whole])}
        targets[f"{name} {model}"] = s
        first, done, js = s["stream_first_event_ms"] or {}, s["stream_done_ms"] or {}, s["json_done_ms"] or {}
        route = "anthropic (native)" if model == CLAUDE else "openai (translated)"
        rows.append([name, route, s["clients"], ", ".join(map(str, data["calls"])), s["wrong_or_missing"],
                     first.get("p50"), first.get("p99"), done.get("p99"), js.get("p50"), js.get("p99")])
        if name.startswith("herd"):
            checks.append({"name": f"{name}, {route}: {n:,} Anthropic SDK clients, {share:.0%} streaming",
                           "goal": "1 upstream call per round, every client whole and in order",
                           "measured": f"{', '.join(map(str, data['calls']))} call(s); {s['wrong_or_missing']} "
                                       "wrong/missing",
                           "value": max(data["calls"]), "met": max(data["calls"]) == 1 and not s["wrong_or_missing"]})
    text = report.table(
        ["target", "route", "clients", "upstream calls", "wrong/missing", "1st event p50", "1st event p99",
         "stream done p99", "JSON done p50", "JSON done p99"], rows,
        f"messages: {n:,} anthropic SDK clients of one prompt per round ({share:.0%} messages.stream, the rest "
        f"messages.create), {args.rounds} round(s)")
    text += "\ntimes in ms from the burst's start; direct = the simulator's own /v1/messages"
    phase = {"name": "messages", "clients": n, "stream_share": share, "targets": targets}
    return {"phases": [phase], "checks": checks, "plots": [], "bench": bench, "text": text}


# -- embeddings ------------------------------------------------------------------------------


def _vectors(raw: bytes, fmt: str, dim: int) -> list[list[float]]:
    data = orjson.loads(raw)["data"]
    if fmt == "base64":
        return [list(struct.unpack(f"<{dim}f", base64.b64decode(d["embedding"]))) for d in data]
    return [d["embedding"] for d in data]


async def _ingest(url: str, batches: list[list[str]], workers: int, fmt: str, dim: int,
                  timeout: float) -> dict[str, Any]:
    """Every batch once, `workers` at a time; latencies, and how many answers were wrong."""
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    latencies: list[float] = []
    wrong = failed = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal wrong, failed
        while not queue.empty():
            batch = queue.get_nowait()
            t = time.perf_counter()
            try:
                async with session.post(url + "/v1/embeddings", json={"model": "text-embedding-3-small",
                                                                        "input": batch, "encoding_format": fmt}) as r:
                    raw = await r.read()
                    if r.status != 200:
                        failed += 1
                        continue
            except (aiohttp.ClientError, TimeoutError):
                failed += 1
                continue
            latencies.append(time.perf_counter() - t)
            got = _vectors(raw, fmt, dim)
            if len(got) != len(batch) or any(v != expected_embedding(s, dim) for v, s in zip(got, batch, strict=False)):
                wrong += 1

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout),
                                     connector=aiohttp.TCPConnector(limit=0),
                                     headers={"authorization": "Bearer sk-bench"}) as session:
        await asyncio.gather(*[worker(session) for _ in range(workers)])
    return {"seconds": time.perf_counter() - t0, "latencies": latencies, "wrong": wrong, "failed": failed}


def run_embeddings(args: argparse.Namespace, stack: Stack, out: Path) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    dim = args.dim
    settings = {**sim_settings_for(args, {"ttft_ms": 50.0}), "embedding_dim": dim}
    bench = setup(args, stack, settings, cache=True)
    distinct, k = args.chunks, args.batch
    say(f"\n== embeddings: {args.workers} workers, {args.batches} batches of {k} chunks drawn (zipf {args.zipf_s}) "
        f"from {distinct:,} distinct, {args.rounds} round(s)")
    rows, targets, checks = [], {}, []
    for r in range(args.rounds):
        corpus = [f"round {r + 1} seed {args.seed} chunk {i}: " + " ".join(["passage"] * (8 + i % 24))
                  for i in range(distinct)]
        ranks = np.minimum(rng.zipf(args.zipf_s, size=(args.batches, k)) - 1, distinct - 1)
        batches = [[corpus[int(i)] for i in row] for row in ranks]
        sent = args.batches * k
        unique = len({s for b in batches for s in b})
        for t in rotation(bench.targets, r):
            sim_reset(bench.sim_url)
            for fmt in ("float", "base64"):
                result = asyncio.run(_ingest(t.url, batches, args.workers, fmt, dim, args.timeout))
                stats = sim_stats(bench.sim_url, log=False)
                calls = int(stats["by_path"].get("/v1/embeddings", 0))
                embedded = int(stats["embedded_inputs"])
                sim_reset(bench.sim_url)
                lat = report.dist_ms(result["latencies"]) or {}
                name = f"{t.name} {fmt} r{r + 1}"
                targets[name] = {"inputs_sent": sent, "distinct_inputs": unique, "upstream_calls": calls,
                                 "inputs_embedded": embedded, "wrong": result["wrong"], "failed": result["failed"],
                                 "seconds": result["seconds"], "latency_ms": lat}
                rows.append([t.name, fmt, r + 1, len(batches), sent, unique, calls, embedded,
                             f"{embedded / sent:.1%}", result["wrong"] + result["failed"], lat.get("p50"),
                             lat.get("p99"), round(sent / result["seconds"])])
                say(f"  {name}: {calls} calls, {embedded:,} of {sent:,} inputs embedded upstream "
                    f"({unique:,} distinct), {result['wrong'] + result['failed']} wrong/failed")
                if t.kind == "herd":
                    checks.append({"name": f"{t.name}, {fmt}, round {r + 1}: inputs embedded upstream",
                                   "goal": "each distinct chunk once, every vector the upstream's",
                                   "measured": f"{embedded:,} for {unique:,} distinct; {result['wrong']} wrong",
                                   "value": embedded, "met": embedded == unique and not result["wrong"]
                                   and not result["failed"]})
    text = report.table(
        ["target", "format", "round", "requests", "inputs sent", "distinct", "upstream calls", "inputs embedded",
         "embedded/sent", "wrong/failed", "request p50", "request p99", "inputs/s"], rows,
        f"embeddings ingest: {args.workers} workers, {args.batches} requests of {k} chunks drawn (zipf "
        f"{args.zipf_s}) from {distinct:,} distinct; a pass in float, then one in base64 (another scope); "
        "herd with its cache on")
    text += "\ntimes in ms; wrong = a vector not the simulator's for its text"
    phase = {"name": "embeddings", "workers": args.workers, "batches": args.batches, "batch": k,
             "distinct": distinct, "targets": targets}
    return {"phases": [phase], "checks": checks, "plots": [], "bench": bench, "text": text}
