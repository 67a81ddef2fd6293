"""Structured JSON logs on stderr, one object per line."""

from __future__ import annotations

import atexit
import collections
import logging
import sys
import threading
import time

import orjson

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"color_message"}  # uvicorn's ANSI copy of msg


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def _timestamp(t: float) -> str:
    """ISO 8601 in UTC, to the millisecond; the date and time of day made once a second
    (strftime is most of a line's formatting cost)."""
    global _second
    second = int(t)
    if _second[0] != second:
        _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_second[1]}.{int(t * 1000) % 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class _BatchWriter(logging.Handler):
    """Hands records to a writer thread without waking it, and never blocks the event loop.

    The thread wakes every `interval_s`, formats whatever queued meanwhile and writes it in
    one go: a busy server pays for one write a batch, not one write (and one thread wake-up)
    a line. If stderr is so slow that `limit` records wait, later ones are dropped (and
    counted) rather than stalling herd.
    """

    def __init__(self, stream, interval_s: float = 0.05, limit: int = 10_000) -> None:
        super().__init__()
        self.stream = stream
        self.interval_s = interval_s
        self.limit = limit
        self.dropped = 0
        self._records: collections.deque[logging.LogRecord | dict] = collections.deque()
        self._drain_lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="herd-log-writer", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord | dict) -> bool:
        """Queue a record, or a ready entry (a dict, see `log_access`)."""
        if len(self._records) >= self.limit:
            self.dropped += 1
            return False
        self._records.append(record)  # atomic: no lock, no wake-up
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self.drain()
        self.drain()

    def drain(self) -> None:
        """Format and write every waiting record (from any thread)."""
        with self._drain_lock:
            lines: list[bytes] = []
            while self._records:
                record = self._records.popleft()
                try:
                    if isinstance(record, dict):
                        record["ts"] = _timestamp(record["ts"])
                        lines.append(orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE))
                    else:
                        lines.append(self.format(record).encode() + b"\n")
                except Exception:
                    if isinstance(record, logging.LogRecord):
                        self.handleError(record)
            if lines:
                try:
                    self.stream.write(b"".join(lines).decode())
                    self.stream.flush()
                except (OSError, ValueError):  # stderr closed: nothing else to tell
                    pass

    def close(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self.drain()
        super().close()


_writer: _BatchWriter | None = None


def setup_logging(level: str = "info", queue_size: int = 10_000) -> None:
    """JSON lines on stderr, written by a thread of their own."""
    global _writer
    if _writer is not None:
        _writer.close()
    # Records skip what herd's lines never show: cheaper to make, on the event loop.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    _writer = _BatchWriter(sys.stderr, limit=queue_size)
    _writer.setFormatter(JsonFormatter())
    atexit.register(_writer.close)  # write what is queued when the process ends
    root = logging.getLogger()
    root.handlers[:] = [_writer]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


_access = logging.getLogger("herd.access")


def log_access(msg: str, fields: dict) -> None:
    """One access line (logger herd.access, level info) with `fields`, the same JSON as any
    other line. Per request, so it skips the logging machinery: no LogRecord, no caller
    lookup, no handler chain; the entry goes straight to the writer thread."""
    if not _access.isEnabledFor(logging.INFO):
        return
    if _writer is None or _access.handlers or not _access.propagate or logging.root.handlers != [_writer]:
        # logging set up some other way, or another handler beside ours (a test's capture, an
        # embedding app's): go through it, so that every handler gets the line
        _access.info(msg, extra=fields)
        return
    _writer.handle({"ts": time.time(), "level": "info", "logger": "herd.access", "msg": msg, **fields})


def flush_logs() -> None:
    """Write every queued record now."""
    if _writer is not None:
        _writer.drain()
