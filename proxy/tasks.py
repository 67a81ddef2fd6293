"""The task a coroutine runs in."""

from __future__ import annotations

import asyncio
from typing import Any


def this_task() -> asyncio.Task[Any]:
    """`asyncio.current_task()`, for code that always runs in a task (a coroutine awaited by one)."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("not running in an asyncio task")
    return task
