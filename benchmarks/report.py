"""Numbers, tables, JSON and PNG plots of a benchmark run.

Metric definitions (as in vLLM's benchmark_serving):

* latency: from sending a request to its last byte, per request (successful ones only);
* TTFT: from sending a stream request to its first body bytes;
* ITL (inter-chunk latency): the gaps between consecutive reads of a stream that carried
  data, over all streams (several SSE events may arrive in one read);
* percentiles p50/p90/p95/p99 by linear interpolation (numpy's default);
* req/s: successful requests over the measured window (all rounds pooled);
* upstream calls: requests the upstream received (the simulator's own count);
* coalesce ratio: 1 - upstream calls / requests (the share of requests that cost no call).
"""

from __future__ import annotations

import math
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks.loadgen import ROLES, Records

PCTS = (50, 90, 95, 99)
PNG_SIZE = (8.0, 5.0)  # inches at 100 dpi: 800x500
PNG_DPI = 100


# --------------------------------------------------------------------------- statistics


def dist_ms(values: Iterable[float] | np.ndarray) -> dict[str, float] | None:
    """mean, p50, p90, p95, p99, max of `values` (seconds), in milliseconds; None if empty."""
    a = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=float)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return None
    q = np.percentile(a, PCTS) * 1000.0
    out = {"n": int(a.size), "mean": float(a.mean() * 1000.0)}
    out.update({f"p{p}": float(v) for p, v in zip(PCTS, q)})
    out["max"] = float(a.max() * 1000.0)
    out["min"] = float(a.min() * 1000.0)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


def arrays(rec: Records) -> dict[str, np.ndarray]:
    return {
        "start": np.frombuffer(rec.start, dtype=float) if len(rec.start) else np.zeros(0),
        "latency": np.frombuffer(rec.latency, dtype=float) if len(rec.latency) else np.zeros(0),
        "ttft": np.frombuffer(rec.ttft, dtype=float) if len(rec.ttft) else np.zeros(0),
        "status": np.asarray(rec.status, dtype=np.int16),
        "role": np.asarray(rec.role, dtype=np.int8),
        "prompt": np.asarray(rec.prompt, dtype=np.int64),
        "stream": np.asarray(rec.stream, dtype=bool),
        "itl": np.frombuffer(rec.itl, dtype=float) if len(rec.itl) else np.zeros(0),
    }


def summarize(rec: Records) -> dict[str, Any]:
    """The client-side numbers of one target's records (all rounds pooled)."""
    a = arrays(rec)
    ok = a["status"] == 200
    n = int(a["latency"].size)
    roles = {name: int((a["role"] == i).sum()) for i, name in enumerate(ROLES)}
    elapsed = rec.elapsed
    out: dict[str, Any] = {
        "requests": n,
        "ok": int(ok.sum()),
        "errors": n - int(ok.sum()),
        "error_kinds": dict(sorted(rec.errors.items())),
        "streams": int(a["stream"].sum()),
        "duration_s": round(elapsed, 3),
        "req_per_s": round(int(ok.sum()) / elapsed, 1) if elapsed > 0 else None,
        "roles": {k: v for k, v in roles.items() if v},
        "cache_hits": roles["cache"],
        "latency_ms": dist_ms(a["latency"][ok]),
        "ttft_ms": dist_ms(a["ttft"][ok & a["stream"]]) if (ok & a["stream"]).any() else None,
        "itl_ms": dist_ms(a["itl"]) if a["itl"].size else None,
        "loadgen_cpu_ms_per_req": round(rec.cpu_s / n * 1000.0, 4) if n else None,
    }
    if rec.dropped:
        out["dropped_arrivals"] = rec.dropped
    if rec.max_lag:
        out["max_arrival_lag_ms"] = round(rec.max_lag * 1000.0, 2)
    return out


def timeline(rec: Records, bin_s: float = 0.5) -> dict[str, list[float]]:
    """Latency p50/p99 and throughput per time bin (request start time)."""
    a = arrays(rec)
    ok = a["status"] == 200
    t, lat = a["start"][ok], a["latency"][ok]
    if t.size == 0:
        return {"t": [], "p50_ms": [], "p99_ms": [], "req_per_s": []}
    bins = np.floor(t / bin_s).astype(int)
    out: dict[str, list[float]] = {"t": [], "p50_ms": [], "p99_ms": [], "req_per_s": []}
    uniq, counts = np.unique(bins, return_counts=True)
    floor = max(3, int(np.median(counts) * 0.02))  # a straggler or two at the edge is not a bin
    for b, c in zip(uniq, counts):
        if c < floor:
            continue
        sel = lat[bins == b]
        out["t"].append(round((b + 0.5) * bin_s, 3))
        out["p50_ms"].append(round(float(np.percentile(sel, 50)) * 1000, 3))
        out["p99_ms"].append(round(float(np.percentile(sel, 99)) * 1000, 3))
        out["req_per_s"].append(round(sel.size / bin_s, 1))
    return out


_BUCKET = re.compile(r'^(?P<name>[a-z_]+)_bucket\{(?P<labels>.*)\}$')
_LE = re.compile(r'le="([^"]+)"')


def histogram_quantiles(before: Mapping[str, float] | None, after: Mapping[str, float] | None,
                        name: str) -> dict[str, float] | None:
    """Approximate p50/p90/p95/p99 (ms) of a Prometheus histogram over an interval, by linear
    interpolation inside the buckets (as PromQL's histogram_quantile does); all labels summed."""
    if before is None or after is None:
        return None
    buckets: dict[float, float] = {}
    for key, value in after.items():
        m = _BUCKET.match(key)
        if not m or m.group("name") != name:
            continue
        le = _LE.search(m.group("labels"))
        if not le:
            continue
        bound = math.inf if le.group(1) == "+Inf" else float(le.group(1))
        buckets[bound] = buckets.get(bound, 0.0) + value - before.get(key, 0.0)
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    out = {"n": int(total)}
    for p in PCTS:
        rank = total * p / 100.0
        lo, prev = 0.0, 0.0
        value = bounds[-2] if len(bounds) > 1 else 0.0
        for b in bounds:
            c = buckets[b]
            if c >= rank:
                if math.isinf(b):
                    value = lo
                else:
                    value = lo + (b - lo) * ((rank - prev) / (c - prev) if c > prev else 1.0)
                break
            lo, prev = b, c
        out[f"p{p}"] = round(value * 1000.0, 2)
    return out


# --------------------------------------------------------------------------- environment


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": mem,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def git_revision(root: Path | None) -> dict[str, Any] | None:
    """The commit checked out at `root` and whether tracked files differ from it (`dirty`);
    None outside a git checkout (an installed wheel: `root` is None)."""
    if root is None:
        return None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=False).stdout.strip()
        if not rev:
            return None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=5, check=False).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": rev, "dirty": dirty}


def provenance(prog: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Where a result comes from, for its JSON: the command that produced it (`prog` and its
    arguments, `sys.argv[1:]` when `argv` is None) and the code's commit (`git_revision`)."""
    args = sys.argv[1:] if argv is None else list(argv)
    from benchmarks.harness import checkout_root

    return {"command": shlex.join([*prog.split(), *args]), "git": git_revision(checkout_root())}


def write_json(path: Path, results: Mapping[str, Any]) -> None:
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                                  | orjson.OPT_NON_STR_KEYS) + b"\n")


# --------------------------------------------------------------------------- tables


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


_NUMERIC = re.compile(r"^(-|[-+]?[\d,]*\.?\d+(x|%| ms)?)$")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain-text table (right-aligned numbers, left-aligned first column)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else _fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    # a column is left-aligned when it holds words rather than numbers
    left = [i == 0 or any(not _NUMERIC.match(r[i]) for r in cells[1:]) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(title)
    for k, r in enumerate(cells):
        parts = [c.ljust(w) if left[i] else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(d: Mapping[str, Any] | None, key: str) -> float | None:
    return None if not d else d.get(key)


def compare_tables(phase: Mapping[str, Any]) -> str:
    """Two tables for one phase of `compare`: counts and throughput, then latency."""
    targets = phase["targets"]
    rows1, rows2 = [], []
    any_stream = any(t.get("ttft_ms") for t in targets.values())
    for name, t in targets.items():
        vs = t.get("vs", {})
        calls = t.get("upstream_calls")
        rows1.append([
            name,
            t.get("req_per_s"),
            _ratio(vs.get("req_per_s_vs_passthrough")),
            _ratio(vs.get("req_per_s_vs_direct")),
            t["requests"],
            calls,
            _share(t.get("coalesce_ratio")),
            t.get("cache_hits"),
            t["errors"],
            _fmt(t.get("cpu_ms_per_req", {}).get("target"), 3),
            _ratio(vs.get("cpu_per_req_vs_passthrough")),
            _fmt(t.get("cpu_ms_per_req", {}).get("simulator"), 3),
        ])
        lat = t.get("latency_ms")
        row = [name] + [_pct(lat, f"p{p}") for p in PCTS] + [
            _signed(vs.get("p50_added_ms_vs_direct")),
            _signed(vs.get("p99_added_ms_vs_direct")),
            _signed(vs.get("p50_added_ms_vs_passthrough")),
        ]
        if any_stream:
            row += [_pct(t.get("ttft_ms"), "p50"), _pct(t.get("ttft_ms"), "p99"), _pct(t.get("itl_ms"), "p50"),
                    _pct(t.get("itl_ms"), "p99")]
        rows2.append(row)
    h1 = ["target", "req/s", "x pass", "x direct", "requests", "upstream", "merged", "cache", "errors",
          "cpu ms/req", "cpu x pass", "sim ms/req"]
    h2 = ["target", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "+p50 vs direct", "+p99 vs direct", "+p50 vs pass"]
    if any_stream:
        h2 += ["TTFT p50", "TTFT p99", "ITL p50", "ITL p99"]
    title = f"{phase['name']}: {phase['load_text']}" + (f", by {phase['loadgen_text']}"
                                                        if phase.get("loadgen_text") else "")
    return table(h1, rows1, title) + "\n\n" + table(h2, rows2) + rounds_note(targets) + background_note(targets)


def rounds_note(targets: Mapping[str, Mapping[str, Any]]) -> str:
    """Lines with each target's ratios to the passthrough round by round (a round runs every
    target back to back, so these pairs shared the machine's conditions)."""
    lines = []
    for name, t in targets.items():
        vs = t.get("vs", {})
        rps, cpu = vs.get("req_per_s_vs_passthrough_rounds"), vs.get("cpu_per_req_vs_passthrough_rounds")
        if name == "passthrough" or not rps or len(rps) < 2:
            continue
        line = f"  {name}: req/s " + " ".join(_ratio(v) for v in rps)
        if cpu:
            line += ", CPU per request " + " ".join(_ratio(v) for v in cpu)
        lines.append(line)
    return ("\nx pass by round:\n" + "\n".join(lines)) if lines else ""


def background_note(targets: Mapping[str, Mapping[str, Any]]) -> str:
    """A line on the CPU that processes outside the benchmark used while it measured."""
    values = [v for t in targets.values() for v in (t.get("background_cores_rounds") or []) if v is not None]
    if not values:
        return ""
    return (f"\nprocesses this run did not start used {min(values):.2f}-{max(values):.2f} cores "
            f"(mean {sum(values) / len(values):.2f}) while these runs were measured")


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def checks_table(checks: Sequence[Mapping[str, Any]]) -> str:
    rows = [[c["name"], c["goal"], c["measured"], "met" if c["met"] else ("n/a" if c["met"] is None else "NOT met")]
            for c in checks]
    return table(["target", "goal", "measured", "verdict"], rows)


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain(axis) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _log_y(ax) -> None:
    ax.set_yscale("log")
    _plain(ax.yaxis)


def _log_x(ax) -> None:
    ax.set_xscale("log")
    _plain(ax.xaxis)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=PNG_DPI)
    _plt().close(fig)
    return path.name


def plot_latency_over_time(series: Mapping[str, Records], path: Path, title: str, bin_s: float = 0.5) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=PNG_SIZE)
    for i, (name, rec) in enumerate(series.items()):
        tl = timeline(rec, bin_s)
        if not tl["t"]:
            continue
        color = f"C{i}"
        ax.plot(tl["t"], tl["p50_ms"], color=color, lw=1.6, label=f"{name} p50")
        ax.plot(tl["t"], tl["p99_ms"], color=color, lw=1.0, ls="--", label=f"{name} p99")
    ax.set_xlabel(f"time since the phase started, s (rounds overlaid, {bin_s:g} s bins)")
    ax.set_ylabel("latency, ms")
    _log_y(ax)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_cdf(series: Mapping[str, np.ndarray], path: Path, title: str, xlabel: str = "latency, ms",
             ylabel: str = "fraction of requests at or below") -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=PNG_SIZE)
    positive = [np.asarray(v, dtype=float) for v in series.values()]
    positive = np.concatenate([v[v > 0] for v in positive]) if positive else np.zeros(0)
    log = positive.size > 0 and np.percentile(positive, 99.9) / max(np.percentile(positive, 0.1), 1e-9) > 10
    for i, (name, values) in enumerate(series.items()):
        v = np.sort(np.asarray(values, dtype=float) * 1000.0)
        if v.size == 0:
            continue
        if v.size > 20000:  # keep the plot small: an even subsample of the sorted values
            v = v[np.linspace(0, v.size - 1, 20000).astype(int)]
        y = np.linspace(0, 1, v.size, endpoint=False) + 1.0 / v.size
        ax.plot(v, y, color=f"C{i}", lw=1.5, label=name)
    if log:
        _log_x(ax)
    ax.set_xlabel(xlabel + (" (log scale)" if log else ""))
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.001)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_upstream_calls(targets: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=PNG_SIZE)
    names = list(targets)
    x = np.arange(len(names))
    reqs = [targets[n]["requests"] for n in names]
    calls = [targets[n].get("upstream_calls") or 0 for n in names]
    ax.bar(x - 0.2, reqs, 0.4, label="client requests", color="C0")
    ax.bar(x + 0.2, calls, 0.4, label="upstream calls", color="C3")
    for i, n in enumerate(names):
        ratio = targets[n].get("coalesce_ratio")
        if ratio is not None:
            ax.annotate(f"{ratio * 100:.0f}% merged", (x[i] + 0.2, calls[i]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_burst(lags: Mapping[str, np.ndarray], path: Path, title: str) -> str:
    """Each request's completion after the first answer of its burst, sorted."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=PNG_SIZE)
    for i, (name, v) in enumerate(lags.items()):
        v = np.sort(np.asarray(v) * 1000.0)
        if v.size:
            ax.plot(np.arange(1, v.size + 1) / v.size * 100.0, v, color=f"C{i}", lw=1.5, label=name)
    ax.set_xlabel("requests answered, % of the burst (all rounds)")
    ax.set_ylabel("answered after the burst's first answer, ms")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_rss(samples: Sequence[Mapping[str, float]], warmup_requests: int, path: Path, title: str,
             tolerance: float) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=PNG_SIZE)
    x = [s["requests"] for s in samples]
    y = [s["rss_mib"] for s in samples]
    ax.plot(x, y, color="C0", lw=1.5, label="herd RSS")
    if warmup_requests:
        ax.axvspan(0, warmup_requests, color="0.85", label="warm-up")
    after = [s["rss_mib"] for s in samples if s["requests"] >= warmup_requests]
    if after:
        base = after[0]
        ax.axhline(base * (1 + tolerance), color="C3", ls="--", lw=1, label=f"baseline +{tolerance * 100:.0f}%")
        ax.axhline(base, color="C2", ls=":", lw=1, label="baseline (after warm-up)")
    ax.set_xlabel("requests answered")
    ax.set_ylabel("resident memory, MiB")
    ax.set_ylim(0, max(y + [1]) * 1.25)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


# --------------------------------------------------------------------------- profiles

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")
_AREAS = (("proxy/", "herd (proxy/)"), ("embeddings/", "herd (embeddings/)"), ("benchmarks/", "benchmarks/"),
          ("aiohttp/", "aiohttp"), ("uvicorn/", "uvicorn"), ("starlette/", "starlette"), ("asyncio/", "asyncio"),
          ("prometheus_client/", "prometheus_client"), ("httptools", "httptools"), ("uvloop", "uvloop"))


def _area(file: str) -> str:
    for needle, name in _AREAS:
        if needle in file:
            return name
    return "other"


def _function(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame)
    if not m:
        return frame, ""
    file = m.group("file")
    short = file.split("site-packages/")[-1]
    for root in ("/proxy/", "/embeddings/", "/benchmarks/"):
        if root in file:
            short = root[1:] + file.split(root, 1)[1]
    return f"{m.group('func')} ({short})", file


def profile_summary(path: Path, top: int = 15) -> dict[str, Any]:
    """Where the sampled process spent its time, from py-spy's collapsed stacks.

    self: the function on top of the stack (by function, lines merged); inclusive: herd's
    own functions with everything they call; areas: samples by the package of the
    function on top of the stack."""
    self_n: dict[str, int] = {}
    incl: dict[str, int] = {}
    areas: dict[str, int] = {}
    lines: dict[str, int] = {}
    total = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        leaf, leaf_file = _function(frames[-1])
        self_n[leaf] = self_n.get(leaf, 0) + n
        areas[_area(leaf_file)] = areas.get(_area(leaf_file), 0) + n
        lines[frames[-1]] = lines.get(frames[-1], 0) + n
        seen = set()
        for f in frames:
            name, file = _function(f)
            file = "/" + file.lstrip("/")
            if name in seen or ("/proxy/" not in file and "/embeddings/" not in file):
                continue
            seen.add(name)
            incl[name] = incl.get(name, 0) + n

    def pct(d: dict[str, int], k: int) -> list[list[Any]]:
        return [[name, round(v / total * 100, 1)] for name, v in sorted(d.items(), key=lambda x: -x[1])[:k]]

    if not total:
        return {"samples": 0}
    return {"samples": total, "areas_pct": dict(pct(areas, 20)), "self_pct": pct(self_n, top),
            "self_lines_pct": pct(lines, top), "herd_inclusive_pct": pct(incl, 25)}


def profiles_text(profiles: Mapping[str, Any], top: int = 12) -> str:
    parts = []
    for label, p in profiles.items():
        if not p or not p.get("samples"):
            parts.append(f"profile {label}: {p.get('error') if p else 'no samples'}")
            continue
        areas = ", ".join(f"{k} {v:.0f}%" for k, v in p["areas_pct"].items())
        parts.append(f"profile {label} ({p['samples']:,} samples, {p.get('file')}): on-CPU by package: {areas}")
        rows = [[name, f"{v:.1f}%"] for name, v in p["herd_inclusive_pct"][:top]]
        parts.append(table(["herd function (inclusive)", "samples"], rows))
        rows = [[name, f"{v:.1f}%"] for name, v in p["self_pct"][:top]]
        parts.append(table(["function on CPU (self)", "samples"], rows))
    return "\n\n".join(parts)
