"""`herd bench` (or `python -m benchmarks`): load-test herd side by side with its floors.

Scenarios (subcommands; `herd bench` alone runs `compare`):

  compare  one workload at a fixed concurrency (or rate) against every target in turn, in
           interleaved rounds: the simulator directly, a bare passthrough (the physical
           floor of this stack), herd in each coalescing mode, and any other proxy URL.
           Then the same at half of the slowest proxy's throughput (latency added at half load).
           wrk (C) drives the throughput phase when it is installed (the unique workload,
           nothing streamed: benchmarks/wrk.py); the Python generator drives the rest.
  burst    N identical requests at once: upstream calls, and how long after the leader's
           answer the last follower gets its own (herd, and the floor: a bare single-flight
           coalescing proxy, benchmarks/fanout_floor.py, the least this stack can cost).
  fanout   N stream subscribers of one flight: the gaps between chunks that herd adds (and
           that the floor adds).
  responses  N Responses API clients of one prompt, a share streaming: upstream calls, every
           stream checked whole and in order, time to first event, gaps between events.
  messages  N anthropic SDK clients of one prompt (messages.create and messages.stream), on
           an Anthropic route (passed as sent) and an OpenAI one (translated): upstream calls,
           every stream whole and in order (benchmarks/api_traffic.py).
  embeddings  a RAG ingest re-embedding repeated chunks: upstream calls, inputs embedded
           upstream against inputs sent, every vector checked (benchmarks/api_traffic.py).
  soak     herd's resident memory sampled across many requests after a warm-up.
  chaos    upstream faults and misbehaving clients: answered, errors, hung, corrupted
           (benchmarks/chaos.py; its own options: `herd bench chaos --help`).
  fuzz     property-based fuzzing of request validation, canonical keys and tenant
           isolation (benchmarks/fuzz.py; `herd bench fuzz --cases 5000`).
  workers  herd with 1, 2, 8 worker processes ([server] workers) and Redis-shared: req/s and
           CPU per request under wrk, upstream calls per burst of 1,000 identical
           (benchmarks/workers.py; `herd bench workers --help`).
  list     the workloads.

Every run starts its own simulator, passthrough and herd processes on free loopback ports
(or uses the URLs you give), prints progress on stderr and a table on stdout, and writes
results.json, summary.txt and PNG plots to --out (default benchmarks/out/<timestamp>/).

This module is the command line; each scenario is a module of its own (compare.py,
burst.py, fanout.py, soak.py) built on measure.py (targets, one measured run, pooling).
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import report, workloads
from benchmarks.api_traffic import run_embeddings, run_messages
from benchmarks.burst import run_burst
from benchmarks.compare import run_compare
from benchmarks.fanout import run_fanout
from benchmarks.harness import ProcError, Stack, checkout_root, results_dir
from benchmarks.measure import BUILTIN_TARGETS, Bench, say
from benchmarks.responses_fanout import run_responses
from benchmarks.soak import run_soak
from benchmarks.wrk import WrkError

SCHEMA = "herd-bench/1"
DESCRIPTION = """Load-test herd side by side with its floors: the upstream simulator directly, a bare
passthrough (the physical floor of this stack), a bare single-flight coalescing proxy
("floor": the floor of this stack for coalescing), herd in each coalescing mode, and any
other OpenAI-compatible proxy you name.

Each run starts its own simulator, passthrough and herd on free loopback ports (or uses
the URLs you give), shows progress on stderr, prints a table on stdout and writes
results.json, summary.txt and PNG plots to --out (default benchmarks/out/<timestamp>/)."""

SCENARIOS: dict[str, Callable[[argparse.Namespace, Stack, Path], dict[str, Any]]] = {
    "compare": run_compare, "burst": run_burst, "fanout": run_fanout, "soak": run_soak,
    "responses": run_responses, "messages": run_messages, "embeddings": run_embeddings,
}

# (normal, --quick) defaults per scenario; a flag given on the command line always wins
DEFAULTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "compare": ({"concurrency": 256, "duration": 8.0, "rounds": 3, "warmup": 1.0, "half_load": True,
                 "targets": "direct,passthrough,off,exact"},
                {"concurrency": 64, "duration": 1.5, "rounds": 1, "warmup": 0.3, "half_load": False}),
    "burst": ({"requests": 1000, "rounds": 3, "targets": "direct,passthrough,floor,exact"},
              {"requests": 200, "rounds": 1, "ttft_ms": 500.0}),
    "fanout": ({"subscribers": 500, "rounds": 3, "targets": "direct,passthrough,floor,exact"},
               {"subscribers": 100, "rounds": 1, "reply_tokens": 20}),
    "responses": ({"clients": 200, "rounds": 3, "targets": "direct,exact"},
                  {"clients": 50, "rounds": 1, "reply_tokens": 20}),
    "messages": ({"clients": 200, "rounds": 3, "targets": "direct,exact"},
                 {"clients": 50, "rounds": 1, "reply_tokens": 20}),
    "embeddings": ({"workers": 16, "batches": 400, "batch": 64, "chunks": 4000, "rounds": 2, "dim": 256,
                    "targets": "direct,exact"},
                   {"workers": 8, "batches": 40, "batch": 32, "chunks": 400, "rounds": 1}),
    "soak": ({"requests": 200_000, "warmup_requests": 20_000, "concurrency": 64, "targets": "exact"},
             {"requests": 20_000, "warmup_requests": 5_000}),
}


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="where results.json, summary.txt and the PNGs go "
                   "(default: benchmarks/out/<timestamp>/)")
    g.add_argument("--quick", action="store_true", help="a short run (about 10 s) to check that everything works")
    g.add_argument("--seed", type=int, default=1,
                   help="workload seed: the same seed sends the same requests (default 1)")
    g.add_argument("--procs", type=int, default=1, help="load generator processes (default 1)")
    g.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, s (default 120)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each measured run, wait up to S seconds for the CPUs to be idle (other jobs on a "
                        "shared machine skew results; each run records the CPU others used meanwhile)")
    g.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    g.add_argument("--profile", action="store_true", help="sample each herd/passthrough/floor process with py-spy "
                   "during measured runs (pip install py-spy); writes profile_*.txt (collapsed stacks) and a summary. "
                        "py-spy pauses the process for each sample: the numbers of a profiled run are a little worse")
    g.add_argument("--profile-seconds", type=float, default=4.0, metavar="S",
                   help="how long to sample a run bounded by a request count rather than a duration (default 4)")
    t = p.add_argument_group("targets")
    t.add_argument("--targets", help=f"comma-separated, from {', '.join(BUILTIN_TARGETS)} "
                   "(floor: a bare single-flight coalescing proxy; floor-raw: the same without ASGI/uvicorn, "
                   "not run by default; off/exact/semantic: herd in that coalescing mode)")
    t.add_argument("--url", action="append", metavar="NAME=URL",
                   help="also measure another OpenAI-compatible proxy (point its upstream at the simulator "
                        "URL printed at start, or use --sim-url); repeatable")
    t.add_argument("--sim-url", metavar="URL", help="use this upstream instead of starting the simulator "
                   "(upstream calls are read from its /_sim/stats if it is herd's simulator)")
    t.add_argument("--herd-url", metavar="URL", help="use a running herd instead of starting one per mode "
                   "(modes chosen with the x-herd-coalesce header)")
    t.add_argument("--herd-pid", type=int, help="soak with --herd-url: the pid whose memory to sample")
    t.add_argument("--herd-log-level", default="info", help="the herd processes' [server] log_level (default info, "
                   "herd's own default: one JSON access-log line per request)")
    t.add_argument("--herd-option", action="append", metavar="SECTION.KEY=VALUE",
                   help="set any key of the generated herd config, e.g. server.access_log=false or "
                        "coalesce.threshold=0.8; repeatable")
    s = p.add_argument_group("simulated upstream")
    s.add_argument("--ttft-ms", type=float, help="delay before the first chunk (or the JSON body)")
    s.add_argument("--tokens-per-s", type=float, help="chunks per second after the first (0: all at once)")
    s.add_argument("--reply-tokens", type=int, help="answer length in words (tokens)")
    w = p.add_argument_group("workload")
    w.add_argument("--model", default=workloads.DEFAULT_MODEL)
    w.add_argument("--pool", type=int, default=1000, help="prompts in the pool (zipf, stream, tenants; default 1000)")
    w.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent (default 1.1)")
    w.add_argument("--burst", type=int, default=50, help="identical requests per group (bursts; default 50)")
    w.add_argument("--tenants", type=int, default=8, help="tenants (tenants workload; default 8)")
    w.add_argument("--merge-share", type=float, default=0.68, help="trace68: share of duplicate requests (0.68)")
    w.add_argument("--stream-share", type=float, help="share of streaming requests (default: the workload's own)")
    w.add_argument("--max-tokens", type=int, help="max_tokens sent in every request (default: none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herd bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
        epilog="examples:\n"
               "  herd bench --quick                          # about 10 s: every target, tiny load\n"
               "  herd bench compare --workload unique --concurrency 256\n"
               "  herd bench compare --workload zipf --targets direct,passthrough,exact\n"
               "  herd bench compare --workload paraphrase --targets exact,semantic\n"
               "  herd bench burst -n 1000\n"
               "  herd bench fanout -n 500\n"
               "  herd bench responses -n 200                 # Responses API stream fan-out\n"
               "  herd bench soak --requests 200000\n"
               "  herd bench compare --url litellm=http://127.0.0.1:4000   # another proxy, same load\n"
               "  herd bench SCENARIO --help                  # every option of a scenario")
    sub = parser.add_subparsers(dest="scenario", metavar="SCENARIO")

    c = sub.add_parser("compare", help="one workload against every target, side by side (the default)",
                       description="Drive a workload at a fixed concurrency (or rate) against each target in "
                                   "interleaved rounds, then at half of the slowest proxy's throughput. Prints "
                                   "req/s, ratios to the passthrough and to direct, CPU per request and its ratio to "
                                   "the passthrough's, upstream calls, coalesce ratio, cache hits, errors and latency "
                                   "percentiles. The throughput phase of the unique workload is driven by wrk when "
                                   "it is installed (--loadgen).")
    c.add_argument("--workload", default="unique", choices=list(workloads.WORKLOADS),
                   help="what to send (see `herd bench list`; default unique)")
    c.add_argument("-c", "--concurrency", type=int, help="connections, closed loop (default 256; quick 64)")
    c.add_argument("--rate", type=float, help="requests per second, open loop (instead of --concurrency)")
    c.add_argument("-d", "--duration", type=float, help="seconds per target per round (default 8; quick 1.5)")
    c.add_argument("--requests", type=int, help="stop a run after this many requests (default: duration only)")
    c.add_argument("--rounds", type=int, help="interleaved rounds; the target order rotates (default 3; quick 1)")
    c.add_argument("--warmup", type=float, help="unmeasured seconds before each run (default 1; quick 0.3)")
    c.add_argument("--half-load", dest="half_load", action="store_true", default=None,
                   help="also run every target at half the passthrough's req/s (default on; off with --quick)")
    c.add_argument("--no-half-load", dest="half_load", action="store_false")
    c.add_argument("--half-of", metavar="TARGET", help="half load = half of this target's req/s in the throughput "
                   "phase (default: the slowest proxy, so that no target is past half of its capacity; "
                   "e.g. passthrough, herd-exact)")
    c.add_argument("--cache", action="store_true", default=None,
                   help="herd's answer cache on (default: on for the unique workload, as in proxy.toml, where no "
                        "prompt repeats; off for the others, where it would hide the coalescer)")
    c.add_argument("--no-cache", dest="cache", action="store_false")
    c.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                   help="who drives the throughput phase: wrk (C; the unique workload without streams) or the "
                        "Python generator (streams, every workload); auto: wrk when it is installed and can "
                        "(default). Fixed-rate phases (half load, --rate) always use the Python generator")
    c.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    _common(c)

    b = sub.add_parser("burst", help="N identical requests at once: upstream calls, follower lag",
                       description="Send N identical requests at the same moment over warm connections. herd should "
                                   "make 1 upstream call and answer the last follower right after the leader; "
                                   "the floor (a bare coalescing proxy) shows the least this stack can do.")
    b.add_argument("-n", "--requests", type=int, help="requests in a burst (default 1000; quick 200)")
    b.add_argument("--rounds", type=int, help="bursts per target, interleaved (default 3; quick 1)")
    _common(b)

    f = sub.add_parser("fanout", help="N stream subscribers of one flight: inter-chunk gaps",
                       description="N clients stream the same prompt at once; the simulator sends a chunk every "
                                   "1/tokens-per-s seconds (default 20/s, 40 words, 200 ms TTFT). Compares the "
                                   "gaps between chunks each client sees through herd, through the floor (a bare "
                                   "coalescing proxy) and directly.")
    f.add_argument("-n", "--subscribers", type=int, help="stream clients (default 500; quick 100)")
    f.add_argument("--rounds", type=int, help="runs per target, interleaved (default 3; quick 1)")
    _common(f)

    rs = sub.add_parser("responses", help="N Responses API clients of one prompt: calls, order, event gaps",
                        description="N clients send one POST /v1/responses at once (half of them streaming, "
                                    "--stream-share to change); the simulator sends an event every 1/tokens-per-s "
                                    "seconds (default 20/s, 40 words, 200 ms TTFT). Checks every stream is whole and "
                                    "in order and every JSON answer the final response; reports upstream calls, time "
                                    "to first event, gaps between events, completion times, through herd and direct.")
    rs.add_argument("-n", "--clients", type=int, help="clients per burst (default 200; quick 50)")
    rs.add_argument("--rounds", type=int, help="bursts per target, interleaved (default 3; quick 1)")
    _common(rs)

    ms = sub.add_parser("messages", help="N anthropic SDK clients of one prompt: calls, order, both route kinds",
                        description="N anthropic.AsyncAnthropic clients send one question at once (half with "
                                    "messages.stream, --stream-share to change) on a claude-* model (herd's Anthropic "
                                    "upstream: the body passes as sent) and on gpt-4o-mini (its OpenAI upstream: "
                                    "translated). Checks every stream whole and in order and every answer the same; "
                                    "reports upstream calls, time to first event, completion times.")
    ms.add_argument("-n", "--clients", type=int, help="clients per burst (default 200; quick 50)")
    ms.add_argument("--rounds", type=int, help="bursts per target and route, interleaved (default 3; quick 1)")
    _common(ms)

    em = sub.add_parser("embeddings", help="a RAG ingest of repeated chunks: inputs embedded upstream vs sent",
                        description="W workers send B POST /v1/embeddings of K chunks each, drawn (zipf) from D "
                                    "distinct chunks, once in float and once in base64; counts upstream calls and "
                                    "the inputs the upstream embedded, checks every vector, through herd (cache on) "
                                    "and directly.")
    em.add_argument("--workers", type=int, help="concurrent clients (default 16; quick 8)")
    em.add_argument("--batches", type=int, help="requests in all (default 400; quick 40)")
    em.add_argument("--batch", type=int, help="chunks per request (default 64; quick 32)")
    em.add_argument("--chunks", type=int, help="distinct chunks (default 4000; quick 400)")
    em.add_argument("--dim", type=int, help="embedding size (default 256)")
    em.add_argument("--rounds", type=int, help="rounds, each with a fresh corpus (default 2; quick 1)")
    _common(em)

    s = sub.add_parser("soak", help="herd's memory across many requests after a warm-up",
                       description="Warm herd up, then send many requests of a workload (default trace68, cache on) "
                                   "and sample herd's resident memory; flat means within --tolerance percent.")
    s.add_argument("--workload", default="trace68", choices=list(workloads.WORKLOADS))
    s.add_argument("--requests", type=int, help="measured requests (default 200000; quick 20000)")
    s.add_argument("--warmup-requests", type=int, help="requests before the baseline (default 20000; quick 5000)")
    s.add_argument("-c", "--concurrency", type=int, help="connections (default 64)")
    s.add_argument("--max-seconds", type=float, default=900.0, help="stop a phase after this long (default 900)")
    s.add_argument("--cache-entries", type=int, default=2000, help="herd's cache size (default 2000)")
    s.add_argument("--no-cache", action="store_true", help="turn herd's cache off")
    s.add_argument("--tolerance", type=float, default=10.0, help="allowed growth, %% (default 10)")
    _common(s)

    sub.add_parser("list", help="the workloads")
    return parser


def apply_defaults(args: argparse.Namespace) -> None:
    normal, quick = DEFAULTS[args.scenario]
    for key, value in {**normal, **(quick if args.quick else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.scenario == "soak":
        args.workload = args.workload or "trace68"


def skip_plots_without_matplotlib(args: argparse.Namespace) -> None:
    """An installed wheel has no extras: the run goes on without its PNG plots, and says how to get them."""
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        args.no_plots = True
        say("PNG plots skipped: matplotlib is not installed (pip install matplotlib; in a herd checkout: "
            "pip install -e '.[bench]'); the tables and results.json are written as usual")


def _default_out() -> Path:
    return results_dir("out", datetime.now().strftime("%Y%m%d-%H%M%S"))


def _list_workloads() -> str:
    rows = [[w.name, f"{w.default_stream_share:.0%}", w.summary] for w in workloads.WORKLOADS.values()]
    return report.table(["workload", "streams", "what"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["chaos"]:
        from benchmarks.chaos import main as chaos
        return chaos(argv[1:])
    if argv[:1] == ["fuzz"]:
        from benchmarks.fuzz import main as fuzz
        return fuzz(argv[1:])
    if argv[:1] == ["workers"]:
        from benchmarks.workers import main as workers
        return workers(argv[1:])
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["compare", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.scenario == "list":
        print(_list_workloads())
        return 0
    apply_defaults(args)
    skip_plots_without_matplotlib(args)
    out = Path(args.out) if args.out else _default_out()
    out.mkdir(parents=True, exist_ok=True)
    args.out_dir = out
    command = "herd bench " + " ".join(shlex.quote(a) for a in argv)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    revision = report.git_revision(checkout_root())  # the code the processes below are started from
    say(f"{command}\nresults -> {out}")
    try:
        with Stack() as stack:
            result = SCENARIOS[args.scenario](args, stack, out)
            bench: Bench = result.pop("bench")
            if bench.profiles:
                result["profiles"] = bench.profiles
                text_profiles = report.profiles_text(bench.profiles)
            sim_info = {"url": bench.sim_url, "started_here": bench.sim is not None, "settings": bench.sim_settings}
    except KeyboardInterrupt:
        say("\ninterrupted; every process this run started has been stopped")
        return 130
    except (ProcError, WrkError) as e:
        say(f"herd bench: {e}")
        return 1
    text = result.pop("text")
    if bench.profiles:
        text += "\n\n" + text_profiles
    checks = result.get("checks") or []
    if checks:
        text += "\n\n" + report.checks_table(checks)
    results = {
        "schema": SCHEMA,
        "scenario": args.scenario,
        "command": command,
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - t0, 1),
        "seed": args.seed,
        "machine": report.machine(),
        "git": revision,
        "settings": {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "out_dir")},
        "upstream": sim_info,
        "unavailable": bench.unavailable,
        **result,
        "table": text,
    }
    report.write_json(out / "results.json", results)
    (out / "summary.txt").write_text(command + "\n\n" + text + "\n")
    print()
    print(text)
    print(f"\nwrote {out / 'results.json'}, {out / 'summary.txt'}"
          + (", " + ", ".join(result.get("plots", [])) if result.get("plots") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
