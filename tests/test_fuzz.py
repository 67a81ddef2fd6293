"""Property-based fuzzing of request handling (benchmarks/fuzz.py), a few hundred cases each;
HERD_FUZZ_CASES=5000 (or `herd bench fuzz --cases 5000`) for more.

validation: any body and headers through the real app: never a 5xx or an exception, every
error in OpenAI's shape. keys: rewrites the API reads the same keep a request's key, changes
it answers differently never do. isolation: such pairs sent at once through the real app
never share a flight or a cached answer.
"""

from __future__ import annotations

import os

import pytest

from benchmarks import fuzz

CASES = int(os.environ.get("HERD_FUZZ_CASES", "300"))


@pytest.fixture(scope="module")
def app(sim):
    app = fuzz.App(sim.url, cache=True)
    yield app
    app.close()


def test_no_generated_request_gets_a_server_error_or_a_malformed_error(app):
    tally = fuzz.Tally("validation")
    fuzz.validation(app, CASES, tally)
    assert tally.server_errors == tally.crashes == tally.bad_errors == 0
    assert tally.statuses.get(200, 0) > 0 and tally.statuses.get(400, 0) > 0  # both kinds were generated


def test_canonical_keys_keep_what_the_api_reads_the_same_and_split_the_rest():
    tally = fuzz.Tally("keys")
    fuzz.keys(CASES, tally)
    assert tally.merges == tally.splits == 0


def test_requests_the_api_answers_differently_never_share_a_flight_or_an_answer(app):
    tally = fuzz.Tally("isolation")
    fuzz.isolation(app, CASES, tally)
    assert tally.merges == 0 and tally.server_errors == 0
