"""Structured JSON logs on stderr, one object per line."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import time

import orjson

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"color_message"}  # uvicorn's ANSI copy of msg


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
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


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; never blocks the event loop.

    Formatting and the write to stderr happen in the writer thread. If stderr is so slow
    that the queue fills up, records are dropped (and counted) rather than stalling herd.
    """

    dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # formatted by the writer thread's handler

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            type(self).dropped += 1


_listener: logging.handlers.QueueListener | None = None


def setup_logging(level: str = "info", queue_size: int = 10_000) -> None:
    """JSON lines on stderr, written by a thread of their own."""
    global _listener
    if _listener is not None:
        _listener.stop()
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(JsonFormatter())
    records: queue.Queue = queue.Queue(queue_size)
    _listener = logging.handlers.QueueListener(records, writer, respect_handler_level=False)
    _listener.start()
    atexit.register(_listener.stop)  # flush what is queued when the process ends
    root = logging.getLogger()
    root.handlers[:] = [_DroppingQueueHandler(records)]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def flush_logs(timeout_s: float = 2.0) -> None:
    """Wait (briefly) until the writer thread has written every queued record."""
    if _listener is None:
        return
    records = _listener.queue
    deadline = time.monotonic() + timeout_s
    while records.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.005)
