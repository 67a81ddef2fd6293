"""The access log's fast path (proxy.logs.log_access) skips logging's handler chain only
while herd's own writer is the root logger's one handler."""

from __future__ import annotations

import logging

from proxy import logs


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_handler_added_beside_herds_writer_gets_every_access_line():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.setup_logging("info")
    keep = _Keep()
    try:
        root.addHandler(keep)  # as pytest's caplog, or an app embedding herd, adds its own
        logs.log_access("request", {"status": 503, "path": "/v1/chat/completions"})
        assert [(r.name, getattr(r, "status", None)) for r in keep.records] == [("herd.access", 503)]
    finally:
        root.removeHandler(keep)
        root.handlers[:], level = saved
        root.setLevel(level)
