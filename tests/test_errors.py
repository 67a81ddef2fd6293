"""The one converter from any exception to what a client is told."""

from __future__ import annotations

import logging

from proxy.errors import HerdError, InvalidRequest, as_herd_error


def test_a_herd_error_is_answered_as_it_is():
    error = InvalidRequest("bad", code="invalid_request")
    assert as_herd_error(error, "on /v1/x") is error


def test_anything_else_is_a_500_that_names_nothing_of_it_and_is_logged(caplog):
    secret = "sk-this-must-not-reach-the-client"
    with caplog.at_level(logging.ERROR, logger="herd.errors"):
        error = as_herd_error(KeyError(secret), "on /v1/chat/completions")
    assert type(error) is HerdError and error.status == 500 and error.code == "internal_error"
    assert secret not in error.body_bytes().decode() and "KeyError" not in error.body_bytes().decode()
    (record,) = caplog.records
    assert "on /v1/chat/completions" in record.getMessage() and "KeyError" in record.getMessage()
    assert record.exc_info is not None
