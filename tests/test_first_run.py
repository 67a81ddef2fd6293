"""What a new user meets first: forwarded headers, refusals herd makes itself, what a
per-request policy got, and upstream connection errors in words."""

from __future__ import annotations

import logging
import re

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
