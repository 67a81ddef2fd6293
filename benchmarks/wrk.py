"""wrk (a C load generator) as the closed-loop driver of `herd bench compare`.

A Python load generator saturates before the proxy it measures does: at a few thousand
requests/s it spends more CPU per request than the proxy, so the proxy's own cost hides
behind it. wrk does not, so `compare` drives its throughput phase (a fixed number of
connections, nothing streamed) with wrk when it is installed; the Python generator still
drives streams (inter-chunk gaps) and the fixed-rate half-load phase.

Every request carries a body of the unique workload's shape (model, system and user
messages, max_tokens when set) whose user message ends in a per-run nonce and a counter, so
no request repeats one of the same run or of any earlier run (nothing can be answered from a
cache or merged). The body is built in a Lua script written to the run's temp folder; wrk
sends the same headers the Python generator sends.

    run = Run(url, load, headers, model=..., nonce=nonce_for("herd-exact", 1))
    result = run_wrk(run, workdir)    # WrkResult: req/s, latency percentiles, errors, CPU
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from benchmarks.loadgen import chat_url
from benchmarks.workloads import SYSTEM_PROMPT, _prompt_text

PROMPTS = 64  # distinct task texts the script cycles through (the nonce and counter make each body unique)
MAX_BAD_SHARE = 0.001  # more non-2xx answers or socket errors than this share of requests fails the run
_MARK = "\x00counter\x00"


def find_wrk() -> str | None:
    """The wrk executable on PATH, or None (Debian/Ubuntu: apt-get install wrk)."""
    return shutil.which("wrk")


def wrk_version(exe: str) -> str:
    """'wrk 4.1.0' (here 'wrk debian/4.1.0-3+b2'): `wrk --version`'s first words."""
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10, check=False)
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0].split(" [")[0] if text else exe


def nonce_for(target: str, round_no: int) -> str:
    """A nonce no other run shares: random bits, the time, the target and the round."""
    name = re.sub(r"[^A-Za-z0-9]", "", target) or "t"
    return f"{secrets.token_hex(4)}{int(time.time() * 1000):x}-{name}-r{round_no}"


@dataclass(frozen=True)
class Run:
    """One wrk run: where, how hard, and what to send."""

    url: str  # the target's base URL (with or without /v1)
    connections: int
    duration_s: float
    headers: dict[str, str]  # sent with every request (the Python generator's headers)
    model: str
    nonce: str
    max_tokens: int | None = None
    threads: int = 1
    timeout_s: float = 10.0  # wrk counts a request slower than this as a timeout error


# --------------------------------------------------------------------------- the Lua script


def body_parts(model: str, nonce: str, max_tokens: int | None = None, prompts: int = PROMPTS,
               seed: int = 0) -> tuple[list[str], str]:
    """JSON bodies of the unique workload's shape, cut where the counter goes: (`prompts`
    prefixes, one suffix). prefix + counter + suffix is one complete body."""
    rng = random.Random(f"wrk:{seed}")
    prefixes: list[str] = []
    suffix = ""
    for _ in range(prompts):
        obj: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": f"{_prompt_text(rng)} (run {nonce} req {_MARK})"}],
        }
        if max_tokens is not None:
            obj["max_tokens"] = max_tokens
        text = orjson.dumps(obj).decode()
        marker = orjson.dumps(_MARK).decode()[1:-1]  # as JSON writes it inside a string
        prefix, suffix = text.split(marker)
        prefixes.append(prefix)
    return prefixes, suffix


def lua_string(s: str) -> str:
    """`s` as a Lua string literal (printable ASCII kept, everything else as \\ddd bytes)."""
    out = []
    for b in s.encode():
        c = chr(b)
        if c in '\\"':
            out.append("\\" + c)
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\{b:03d}")
    return '"' + "".join(out) + '"'


def lua_script(run: Run, seed: int = 0) -> str:
    """The wrk script: POST to the chat path with `run.headers`; each request a fresh body
    (prefix k, then '<thread>-<counter>', then the suffix)."""
    prefixes, suffix = body_parts(run.model, run.nonce, run.max_tokens, seed=seed)
    path = "/" + chat_url(run.url).split("://", 1)[1].split("/", 1)[1]
    lines = [
        "-- written by herd bench (benchmarks/wrk.py): a unique chat body per request",
        'wrk.method = "POST"',
        *(f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in run.headers.items()),
        f"local path = {lua_string(path)}",
        "local prefixes = {",
        *(f"  {lua_string(p)}," for p in prefixes),
        "}",
        f"local suffix = {lua_string(suffix)}",
        "local threads = 0",
        "thread_id = 0  -- a global: setup() sets it in each thread's own Lua state",
        "local n = 0",
        "",
        "function setup(thread)",
        "  threads = threads + 1",
        "  thread:set('thread_id', threads)",
        "end",
        "",
        "function request()",
        "  n = n + 1",
        "  local body = prefixes[n % #prefixes + 1] .. thread_id .. '-' .. n .. suffix",
        "  return wrk.format(nil, path, nil, body)",
        "end",
        "",
    ]
    return "\n".join(lines)


def body_for(prefixes: list[str], suffix: str, thread_id: int, n: int) -> str:
    """The body the script's request() builds for `thread_id`'s `n`-th request (1-based)."""
    return prefixes[n % len(prefixes)] + f"{thread_id}-{n}" + suffix


# --------------------------------------------------------------------------- wrk's output


@dataclass
class WrkResult:
    """What one wrk run reports (latencies in ms)."""

    requests: int  # answered requests (any status)
    duration_s: float
    req_per_s: float  # wrk's own: answered requests / duration
    latency_ms: dict[str, float]  # mean, max, p50, p75, p90, p99
    non_2xx: int = 0  # wrk counts status > 399 ("Non-2xx or 3xx responses")
    socket_errors: dict[str, int] = field(default_factory=dict)  # connect, read, write, timeout
    cpu_s: float = 0.0  # wrk's own user + system CPU time
    command: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def check(self, label: str, max_bad_share: float = MAX_BAD_SHARE) -> None:
        """Raise WrkError when more than a trivial share of the requests failed, or none was answered."""
        if self.requests == 0:
            raise WrkError(f"wrk against {label} got no answer at all:\n{self.output}")
        if self.errors > max_bad_share * self.requests:
            kinds = ", ".join(f"{k} {v:,}" for k, v in {"non-2xx": self.non_2xx, **self.socket_errors}.items() if v)
            raise WrkError(f"wrk against {label}: {self.errors:,} of {self.requests:,} requests failed ({kinds}); "
                           f"more than {max_bad_share:.1%} fails the run:\n{self.output}")


class WrkError(RuntimeError):
    """wrk failed, or too many of its requests did."""


_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


def _seconds(value: str, unit: str) -> float:
    return float(value) * _UNITS_S[unit]


def _count(text: str) -> float:
    """wrk's short counts: '2.10k' -> 2100."""
    m = re.fullmatch(r"([\d.]+)([kMG]?)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


def parse_output(text: str) -> WrkResult:
    """Parse `wrk --latency` output: totals, the Latency row, the Latency Distribution, errors."""
    m = re.search(r"^\s*(\d+) requests in " + _TIME, text, re.M)
    if not m:
        raise WrkError(f"could not read wrk's output:\n{text}")
    requests, duration = int(m.group(1)), _seconds(m.group(2), m.group(3))
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    latency: dict[str, float] = {}
    row = re.search(r"^\s*Latency\s+" + _TIME + r"\s+" + _TIME + r"\s+" + _TIME, text, re.M)
    if row:
        latency["mean"] = round(_seconds(row.group(1), row.group(2)) * 1000, 3)
        latency["max"] = round(_seconds(row.group(5), row.group(6)) * 1000, 3)
    for p, value, unit in re.findall(r"^\s*(\d+(?:\.\d+)?)%\s+" + _TIME + r"\s*$", text, re.M):
        latency[f"p{float(p):g}"] = round(_seconds(value, unit) * 1000, 3)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()))) if sock else {}
    return WrkResult(requests=requests, duration_s=duration,
                     req_per_s=float(rps.group(1)) if rps else (requests / duration if duration else 0.0),
                     latency_ms=latency, non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
                     socket_errors={k: v for k, v in errors.items() if v}, output=text)


# --------------------------------------------------------------------------- running it


def command(exe: str, run: Run, script: Path) -> list[str]:
    return [exe, f"-t{run.threads}", f"-c{run.connections}", f"-d{max(1, round(run.duration_s))}s",
            f"--timeout={max(1, round(run.timeout_s))}s", "--latency", "-s", str(script), chat_url(run.url)]


def run_wrk(run: Run, workdir: Path, exe: str | None = None, seed: int = 0) -> WrkResult:
    """Write the script for `run` into `workdir`, run wrk, parse what it printed. wrk's
    own CPU time is read from the kernel's accounting of the child."""
    exe = exe or find_wrk()
    if exe is None:
        raise WrkError("wrk is not installed (apt-get install wrk); use --loadgen python")
    script = workdir / f"wrk-{run.nonce}.lua"
    script.write_text(lua_script(run, seed))
    argv = command(exe, run, script)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise WrkError(f"{' '.join(argv)} exited with status {proc.returncode}:\n{out}")
    result = parse_output(out)
    result.cpu_s = usage.ru_utime + usage.ru_stime
    result.command = argv
    return result
