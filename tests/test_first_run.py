"""What a new user meets first: forwarded headers, refusals herd makes itself, what a
per-request policy got, and upstream connection errors in words."""

from __future__ import annotations

import errno
import itertools
import logging
import re
import socket
import ssl

import httpx
import openai
import pytest

from tests.harness import HerdServer, chat_calls, herd_settings


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def metric(herd: HerdServer, name: str, **labels: str) -> float:
    """The sum of a counter's samples whose labels include `labels` (0 if none)."""
    total = 0.0
    for line in httpx.get(herd.url + "/metrics").text.splitlines():
        m = re.match(rf"{name}(?:_total)?(?:{{(.*)}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_forwarded_responses_carry_one_date_and_not_the_upstreams_server(sim):
    with HerdServer(herd_settings(sim.url)) as herd:
        direct = httpx.post(sim.url + "/v1/moderations", json={"model": "m", "input": "x"})
        upstream_server = direct.headers["server"]
        # (embeddings are coalesced now: a forwarded POST is one herd does not coalesce)
        for method, path in (("POST", "/v1/moderations"), ("GET", "/v1/files")):
            r = httpx.request(method, herd.url + path, json={"model": "m", "input": "x"} if method == "POST" else None)
            assert r.headers["x-herd"] == "bypass"
            assert len(r.headers.get_list("date")) == 1, r.headers.raw
            assert upstream_server not in r.headers.get_list("server"), r.headers.raw


def test_a_prompt_over_the_context_window_is_the_clients_error_not_the_upstreams(sim):
    settings = herd_settings(sim.url, tokens={"context_windows": {"tiny": 20}})
    with HerdServer(settings) as herd:
        c = openai.OpenAI(base_url=herd.url + "/v1", api_key="sk-x", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model="tiny", messages=user("word " * 200))
        r = info.value.response
        assert info.value.code == "context_length_exceeded"
        assert r.headers["x-herd"] == "none" and "x-herd-upstream" not in r.headers
        assert chat_calls(sim.url) == 0
        assert metric(herd, "herd_upstream_errors") == 0
        assert metric(herd, "herd_errors", status="400") == 1
        assert metric(herd, "herd_requests", outcome="error") == 1
        # a prompt that fits is served as usual
        ok = c.chat.completions.with_raw_response.create(model="tiny", messages=user("hi"))
        assert ok.headers["x-herd"] == "leader" and ok.headers["x-herd-upstream"] == "sim"


def test_a_semantic_request_in_exact_mode_is_told_what_it_got(sim, caplog):
    with HerdServer(herd_settings(sim.url)) as herd:
        c = openai.OpenAI(base_url=herd.url + "/v1", api_key="sk-x", max_retries=0, timeout=30)
        with caplog.at_level(logging.WARNING, logger="herd.gateway"):
            for _ in range(3):
                raw = c.chat.completions.with_raw_response.create(
                    model="m", messages=user("hello"), extra_headers={"x-herd-coalesce": "semantic"}
                )
                assert raw.headers["x-herd-coalesce"] == "exact"
        said = [r for r in caplog.records if "x-herd-coalesce: semantic" in r.getMessage()]
        assert len(said) == 1, "logged once, not per request"
        # asked for what the server does: said as applied; not asked: no header
        raw = c.chat.completions.with_raw_response.create(
            model="m", messages=user("hello"), extra_headers={"x-herd-coalesce": "off"}
        )
        assert raw.headers["x-herd-coalesce"] == "off"
        raw = c.chat.completions.with_raw_response.create(model="m", messages=user("hello"))
        assert "x-herd-coalesce" not in raw.headers


def _chain(*errors: BaseException) -> BaseException:
    """errors[0] raised from errors[1] raised from ... (as aiohttp and httpx wrap socket errors)."""
    for outer, inner in itertools.pairwise(errors):
        outer.__cause__ = inner
    return errors[0]


class ClientConnectorError(OSError):  # the name aiohttp gives an error while connecting
    pass


@pytest.mark.parametrize(
    "error, words, unreachable",
    [
        (_chain(ClientConnectorError("x"), socket.gaierror(-2, "Name or service not known")),
         "could not resolve the host 'api.example.com' (DNS lookup failed)", True),
        (_chain(ClientConnectorError("x"), OSError(errno.ECONNREFUSED, "Connect call failed ('10.0.0.1', 8443)")),
         "api.example.com:8443 refused the connection", True),
        (_chain(ClientConnectorError("x"), ssl.SSLCertVerificationError(1, "certificate verify failed")),
         "the TLS certificate of api.example.com:8443 could not be verified", True),
        (_chain(ClientConnectorError("x"), OSError(errno.EHOSTUNREACH, "No route to host")),
         "the connection to api.example.com:8443 failed: no route to host", True),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
         "api.example.com:8443 reset the connection", False),
    ],
)
def test_connection_errors_say_what_failed_in_words(error, words, unreachable):
    from proxy.errors import UpstreamUnavailable, UpstreamUnreachable
    from proxy.upstream.base import connection_error

    e = connection_error("openai", error, "https://user:pw@api.example.com:8443/v1")
    assert isinstance(e, UpstreamUnavailable) and e.status == 502
    assert isinstance(e, UpstreamUnreachable) == unreachable
    assert e.message.startswith(f"upstream 'openai': {words}")
    assert "Error" not in e.message and "pw" not in e.message and "/v1" not in e.message


CLASS_NAME = re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+)*(?:Error|Exception)\b")


def test_an_unreachable_upstream_is_a_clear_502_every_time():
    """Before: a 502 naming ClientConnectorError, then 503s with retry-after: 30 that the
    openai SDK sleeps through (about 61 s a call)."""
    from proxy.config import parse_settings
    from tests.harness import free_port

    port = free_port()  # nothing listens there
    settings = parse_settings({
        "upstreams": {"u": {"base_url": f"http://127.0.0.1:{port}/v1", "retries": 0, "circuit_failures": 2,
                            "circuit_reset_s": 60, "backoff_max_s": 0}},
        "cache": {"enabled": False},
    }, env={})
    with HerdServer(settings) as herd:
        c = openai.OpenAI(base_url=herd.url + "/v1", api_key="sk-x", max_retries=0, timeout=30)
        answers = []
        for i in range(4):
            with pytest.raises(openai.APIStatusError) as info:
                c.chat.completions.create(model="m", messages=user(f"q{i}"))
            answers.append(info.value)
    for e in answers:
        assert e.status_code == 502 and "retry-after" not in e.response.headers
        assert f"127.0.0.1:{port} refused the connection" in e.body["message"]
        assert not CLASS_NAME.search(e.body["message"]), e.body["message"]
    assert "circuit open" in answers[-1].body["message"]  # the breaker's refusal says why too


def test_https_to_a_plain_http_upstream_is_said(sim):
    from proxy.config import parse_settings

    url = sim.url.replace("http://", "https://") + "/v1"
    settings = parse_settings({"upstreams": {"u": {"base_url": url, "retries": 0}}, "cache": {"enabled": False}},
                              env={})
    with HerdServer(settings) as herd:
        c = openai.OpenAI(base_url=herd.url + "/v1", api_key="sk-x", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as info:
            c.chat.completions.create(model="m", messages=user("hi"))
    assert info.value.status_code == 502
    assert "TLS handshake" in info.value.body["message"] and "http://" in info.value.body["message"]


@pytest.mark.parametrize("failure, words", [
    ("status", "failing (last: HTTP 502); herd stopped calling it for 10 s (circuit open)"),
    ("timeout", "failing (last: upstream 'u' did not answer in time); herd stopped calling it for 10 s"),
])
def test_an_open_circuit_says_what_failed_and_for_how_long(failure, words):
    from proxy.errors import UpstreamError, UpstreamTimeout
    from proxy.resilience import CircuitBreaker, CircuitOpen

    now = [0.0]
    breaker = CircuitBreaker(failures=1, reset_s=10, clock=lambda: now[0])
    error = UpstreamError(502) if failure == "status" else UpstreamTimeout("upstream 'u' did not answer in time")
    breaker.record(error, breaker.admit("u"))
    with pytest.raises(CircuitOpen) as info:
        breaker.admit("u")
    assert info.value.status == 503 and info.value.headers["retry-after"] == "10"
    assert words in info.value.message
