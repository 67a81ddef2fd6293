"""`herd demo`: herd at work in a few seconds, offline, with no provider key.

Starts the bundled upstream simulator and herd (exact coalescing, the cache on) on free
loopback ports, sends bursts of chat requests, streamed and not, the way many clients of
one app would, and prints what herd saved: per burst, the answers and the upstream calls
(counted by the simulator), then herd's own counters from its /metrics.

    herd demo            # about 10 s; everything it started is stopped at the end
    herd demo --keep     # then leaves both running, until Ctrl-C, to try with your own SDK
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from benchmarks.harness import Herd, ProcError, Stack, chat_calls
from benchmarks.procs import prometheus

MODEL = "gpt-4o-mini"  # any name works with the simulator; this one has a price for the savings
PRICES = {"input": 0.15, "output": 0.60}  # USD per million tokens, what OpenAI lists for it


def herd_toml(sim_url: str) -> str:
    return f"""\
[server]
access_log = false

[auth]
mode = "open"                 # loopback only: this demo's clients send no key

[upstreams.simulator]
kind = "openai"
base_url = "{sim_url}/v1"

[coalesce]
mode = "exact"

[cache]
enabled = true

[metrics]
prices = {{ "{MODEL}*" = {{ input = {PRICES['input']}, output = {PRICES['output']} }} }}
"""


async def ask(http: aiohttp.ClientSession, url: str, question: str, stream: bool) -> tuple[str, str]:
    """One chat request as an app would send it: (x-herd, the answer's text)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"herd answered {resp.status}: {await resp.text()}")
        role = resp.headers.get("x-herd", "?")
        if not stream:
            data = await resp.json()
            return role, data["choices"][0]["message"]["content"]
        text = []
        async for line in resp.content:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                chunk = orjson.loads(line[6:])
                text += [c["delta"].get("content") or "" for c in chunk.get("choices", [])]
        return role, "".join(text)


async def burst(url: str, questions: Sequence[str], stream_share: float = 0.5) -> list[tuple[str, str]]:
    """All `questions` at once, every other one streamed."""
    every = max(1, round(1 / stream_share)) if stream_share else 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        return await asyncio.gather(*(ask(http, url, q, bool(every) and i % every == 0)
                                      for i, q in enumerate(questions)))


def _roles(answers: list[tuple[str, str]]) -> str:
    counts = collections.Counter(role for role, _ in answers)
    return ", ".join(f"{role} {n}" for role, n in sorted(counts.items()))


def _metric(metrics: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base in (name, name + "_total") and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def run(keep: bool = False, out=sys.stdout) -> dict[str, Any]:
    """The demo; returns what it printed, as data: each burst's row and herd's counters."""

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    with Stack() as stack:
        # answers take about half a second, as a small model's would: long enough to share
        sim = stack.simulator(ttft_ms=300, tokens_per_s=200, reply_tokens=40)
        herd = stack.start(lambda port: Herd(herd_toml(sim.url), stack.dir, "herd", port, stack.dir / "herd.log"))
        say(f"herd demo: the bundled upstream simulator at {sim.url}, herd at {herd.url}")
        say("           (exact coalescing, the answer cache on; nothing leaves this machine)")
        say()
        rows = []
        steps: list[tuple[str, list[str]]] = [
            ("20 clients ask the same question at once (10 streamed, 10 not)", ["What is herd?"] * 20),
            ("the same 20 again, a moment later", ["What is herd?"] * 20),
            ("5 different questions at once", [f"Question number {i}?" for i in range(1, 6)]),
        ]
        for what, questions in steps:
            before = chat_calls(sim.url)
            started = time.perf_counter()
            answers = asyncio.run(burst(herd.url, questions))
            ms = (time.perf_counter() - started) * 1000
            calls = chat_calls(sim.url) - before
            same = len({text for _, text in answers}) == len(set(questions))  # one answer per question
            rows.append((what, len(answers), calls, _roles(answers), ms, same))
        width = max(len(r[0]) for r in rows)
        say(f"{'burst':<{width}}  answers  upstream calls  served as (x-herd)               time")
        for what, n, calls, roles, ms, same in rows:
            check = "" if same else "  (answers differ!)"
            say(f"{what:<{width}}  {n:>7}  {calls:>14}  {roles:<32} {ms:>5.0f} ms{check}")
        metrics = prometheus(herd.url) or {}
        served = sum(r[1] for r in rows)
        calls = _metric(metrics, "herd_upstream_calls")
        saved_tokens = _metric(metrics, "herd_tokens", outcome="saved")
        spent_tokens = _metric(metrics, "herd_tokens", outcome="spent")
        saved_usd = _metric(metrics, "herd_dollars", outcome="saved")
        say()
        say(f"herd's /metrics ({herd.url}/metrics):")
        by_role = {role: _metric(metrics, "herd_requests", outcome=role)
                   for role in ("leader", "follower", "cache", "bypass", "error")}
        say(f"  requests answered      {served:>8.0f}   "
            + ", ".join(f"{role} {n:.0f}" for role, n in by_role.items() if n))
        say(f"  upstream calls         {calls:>8.0f}   (without herd: {served})")
        say(f"  coalesce ratio         {_metric(metrics, 'herd_coalesce_ratio'):>8.2f}   "
            "(share of requests that needed no upstream call of their own)")
        say(f"  tokens saved           {saved_tokens:>8.0f}   (spent: {spent_tokens:.0f})")
        say(f"  dollars saved         ${saved_usd:>8.6f}   (at {MODEL}'s list prices)")
        say()
        summary = {"bursts": [dict(zip(("what", "answers", "upstream_calls", "roles", "ms", "consistent"), r))
                              for r in rows],
                   "requests": by_role, "upstream_calls": calls, "tokens_saved": saved_tokens,
                   "dollars_saved": saved_usd}
        if not keep:
            say("Your own app: `herd serve` (or `make run`), then OpenAI(base_url=\"http://127.0.0.1:8080/v1\").")
            say("`herd demo --keep` leaves this demo's simulator and herd running to try them.")
            return summary
        say("Both keep running until Ctrl-C. Try them:")
        say(f"  curl -s {herd.url}/v1/chat/completions -H 'content-type: application/json' \\")
        say(f"       -d '{{\"model\": \"{MODEL}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}' -i")
        say(f"  OpenAI(base_url=\"{herd.url}/v1\", api_key=\"any\")   # the openai SDK")
        try:
            while herd.alive() and sim.alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        say("stopped")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="herd demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the simulator and herd running until Ctrl-C")
    args = parser.parse_args(argv)
    try:
        run(args.keep)
    except ProcError as e:
        print(f"herd demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
