"""`herd bench responses`: N clients of the Responses API ask one prompt at once, a share of
them streaming; upstream calls, answers checked, time to first event, gaps between events.

Every client is checked: a stream must carry every event once, in order (sequence numbers
0..k with no gap), from `response.created` to `response.completed`, its text deltas adding
up to the final text; a non-stream answer must be that final response. The simulator
sends an event every 1/tokens-per-s seconds (default 20/s, 40 words, 200 ms to the first).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from benchmarks import report
from benchmarks.harness import Stack, sim_reset, sim_stats
from benchmarks.measure import rotation, say, setup, sim_settings_for

PATH = "/v1/responses"


def check_stream(raw: bytes) -> tuple[str | None, str]:
    """(the final text, "") for a whole, ordered Responses stream, else (None, what is wrong)."""
    events = []
    for block in raw.split(b"\n\n"):
        data = next((line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")), None)
        if data is not None:
            events.append(orjson.loads(data))
    if not events:
        return None, "no events"
    if [e.get("sequence_number") for e in events] != list(range(len(events))):
        return None, "sequence numbers out of order or missing"
    if events[0].get("type") != "response.created" or events[-1].get("type") != "response.completed":
        return None, f"stream from {events[0].get('type')} to {events[-1].get('type')}"
    text = "".join(e.get("delta", "") for e in events if e.get("type") == "response.output_text.delta")
    final = events[-1]["response"]["output"][0]["content"][0]["text"]
    return (final, "") if text == final else (None, "deltas do not add up to the final text")


async def one_client(session: aiohttp.ClientSession, url: str, body: dict, stream: bool,
                     t0: float) -> dict[str, Any]:
    out: dict[str, Any] = {"stream": stream, "ok": False, "text": None, "why": ""}
    try:
        async with session.post(url + PATH, json={**body, "stream": stream}) as resp:
            if resp.status != 200:
                out["why"] = f"HTTP {resp.status}"
                return out
            if not stream:
                data = await resp.json()
                out["first"] = out["done"] = time.perf_counter() - t0
                out["text"] = data["output"][0]["content"][0]["text"]
                out["ok"] = data.get("status") == "completed"
                return out
            parts, reads = [], []
            async for chunk in resp.content.iter_any():
                reads.append(time.perf_counter() - t0)
                parts.append(chunk)
            out["first"], out["done"] = reads[0], reads[-1]
            out["gaps"] = np.diff(reads).tolist()
            out["text"], out["why"] = check_stream(b"".join(parts))
            out["ok"] = out["text"] is not None
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError) as e:
        out["why"] = type(e).__name__
    return out


async def one_burst(url: str, n: int, stream_share: float, prompt: str, timeout: float) -> list[dict[str, Any]]:
    body = {"model": "gpt-4o-mini", "input": prompt, "instructions": "answer in one line"}
    streams = round(n * stream_share)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout),
                                     headers={"authorization": "Bearer sk-bench"}) as session:
        t0 = time.perf_counter()
        return await asyncio.gather(*[one_client(session, url, body, i < streams, t0) for i in range(n)])


def run_responses(args: argparse.Namespace, stack: Stack, out: Path) -> dict[str, Any]:
    n = args.clients
    share = args.stream_share if args.stream_share is not None else 0.5
    settings = sim_settings_for(args, {"ttft_ms": 200.0, "tokens_per_s": 20.0, "reply_tokens": 40})
    bench = setup(args, stack, settings)
    say(f"\n== responses: {n:,} clients of one prompt ({share:.0%} streaming), {args.rounds} round(s)")
    per: dict[str, dict[str, list]] = {t.name: {"calls": [], "clients": []} for t in bench.targets}
    for r in range(args.rounds):
        for t in rotation(bench.targets, r):
            prompt = f"responses fan-out round {r + 1} seed {args.seed} for {t.name}"  # never an earlier answer
            sim_reset(bench.sim_url)
            clients = asyncio.run(one_burst(t.url, n, share, prompt, args.timeout))
            calls = int(sim_stats(bench.sim_url, log=False)["by_path"].get(PATH, 0))
            per[t.name]["calls"].append(calls)
            per[t.name]["clients"].extend(clients)
            bad = sum(not c["ok"] for c in clients)
            say(f"  {t.name} r{r + 1}: {calls} upstream call(s), {bad} client(s) with a wrong or missing answer")
    targets: dict[str, Any] = {}
    rows = []
    for name, data in per.items():
        clients = data["clients"]
        streams = [c for c in clients if c["stream"] and c["ok"]]
        whole = [c for c in clients if not c["stream"] and c["ok"]]
        gaps = [g for c in streams for g in c.get("gaps", [])]
        s = {
            "clients": len(clients),
            "upstream_calls_per_round": data["calls"],
            "wrong_or_missing": sum(not c["ok"] for c in clients),
            "reasons": sorted({c["why"] for c in clients if c["why"]}),
            "stream_first_event_ms": report.dist_ms([c["first"] for c in streams]),
            "stream_done_ms": report.dist_ms([c["done"] for c in streams]),
            "event_gap_ms": report.dist_ms(gaps),
            "json_done_ms": report.dist_ms([c["done"] for c in whole]),
        }
        targets[name] = s
        first, done, gap, js = (s["stream_first_event_ms"] or {}, s["stream_done_ms"] or {},
                                s["event_gap_ms"] or {}, s["json_done_ms"] or {})
        rows.append([name, s["clients"], ", ".join(f"{c:,}" for c in data["calls"]), s["wrong_or_missing"],
                     first.get("p50"), first.get("p99"), gap.get("p50"), gap.get("p99"), done.get("p99"),
                     js.get("p50"), js.get("p99")])
    nominal = 1000.0 / settings["tokens_per_s"] if settings["tokens_per_s"] else None
    text = report.table(
        ["target", "clients", "upstream calls", "wrong/missing", "1st event p50", "1st event p99", "event gap p50",
         "event gap p99", "stream done p99", "JSON done p50", "JSON done p99"], rows,
        f"responses: {n:,} clients of one prompt per round ({share:.0%} streaming), {args.rounds} round(s); "
        + (f"the simulator sends an event every {nominal:.0f} ms" if nominal else "events sent at once"))
    text += ("\ntimes in ms from the burst's start; event gap = between reads of one stream; wrong/missing = "
             "streams not whole and in order, or answers not the final response")
    checks = []
    herd = targets.get("herd-exact")
    if herd:
        calls = herd["upstream_calls_per_round"]
        checks.append({"name": f"{n:,} Responses clients, {share:.0%} streaming: upstream calls",
                       "goal": "1 per round, every client whole and in order",
                       "measured": f"{', '.join(map(str, calls))} call(s); {herd['wrong_or_missing']} wrong/missing",
                       "value": max(calls), "met": max(calls) == 1 and herd["wrong_or_missing"] == 0})
    phase = {"name": "responses", "clients": n, "stream_share": share, "targets": targets,
             "nominal_gap_ms": nominal}
    return {"phases": [phase], "checks": checks, "plots": [], "bench": bench, "text": text}
