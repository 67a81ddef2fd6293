"""`herd bench chaos --quick` as a test: every scenario's clients end with the answer or a
proper OpenAI-format error, none hangs and none gets a corrupted answer."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from benchmarks.chaos import SCENARIOS, Size, run_scenarios
from benchmarks.harness import Stack


@pytest.mark.timeout(900)
async def test_quick_chaos_has_no_hung_or_corrupted_client():
    with Stack() as stack:
        results = await run_scenarios(stack, Size.quick())
    assert list(results) == list(SCENARIOS)
    assert all(t.requests > 0 for t in results.values())
    bad = {name: asdict(t) for name, t in results.items() if t.hung or t.corrupted}
    assert not bad
    # the upstream faults were met: some flights failed, and every other client was answered
    assert results["stall mid-stream"].errors > 0 and results["reset mid-stream"].errors > 0
    assert results["key echoed in error"].errors == results["key echoed in error"].requests
