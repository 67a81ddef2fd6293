"""Ids for flights and requests: unique across processes, cheap to make.

A random prefix per process, then a counter: no system call per id (a fresh random token
for every request showed up in profiles).
"""

from __future__ import annotations

import itertools
import secrets

_PREFIX = secrets.token_hex(4)
_COUNTER = itertools.count(1)


def unique_id() -> str:
    return f"{_PREFIX}{next(_COUNTER):08x}"
