from __future__ import annotations

import pytest

from benchmarks.simulator import ThreadedSimulator
from tests.harness import HerdServer, herd_settings, sim_reset


@pytest.fixture(scope="module")
def sim():
    with ThreadedSimulator() as s:
        yield s


@pytest.fixture(scope="module")
def herd(sim):
    with HerdServer(herd_settings(sim.url, server={"request_timeout_s": 5})) as h:
        yield h


@pytest.fixture(autouse=True)
def _fresh_sim(request):
    # Every test starts from a simulator with no faults, no delay and zero counters.
    if "sim" in request.fixturenames:
        sim_reset(request.getfixturevalue("sim").url)
