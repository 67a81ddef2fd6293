"""Invariant 12: herd never sends a request, or its provider key, anywhere but under the
upstream's configured base path, whatever path a client writes on the wire.

The requests are raw bytes on a socket (an HTTP client library would normalize `..` away
before sending), and the upstream records every request target it receives as it came.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import HerdServer, herd_settings
from tests.raw_http import RawUpstream, raw_request

CLIENT_KEY = "sk-client-one"
PROVIDER_KEY = "sk-provider-SECRET"


@pytest.fixture(scope="module")
def upstream():
    with RawUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def herd(upstream):
    cfg = herd_settings(
        upstream.url,
        upstreams={"sim": {"base_url": upstream.url + "/base/v1", "api_key": PROVIDER_KEY}},
        auth={"mode": "keys", "keys": [{"sha256": hashlib.sha256(CLIENT_KEY.encode()).hexdigest()}]},
    )
    with HerdServer(cfg) as h:
        yield h


def get(herd, target: str, method: str = "GET"):
    request = (
        f"{method} {target} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\n"
        "content-length: 0\r\nconnection: close\r\n\r\n"
    )
    return raw_request(herd.port, request.encode("latin-1"))


def escapes(target: str) -> bool:
    """Whether any server could read `target` as a path outside /base/v1/: decoded as often as
    it decodes, backslashes as slashes, `;` parameters dropped, dot segments resolved."""
    path = target.split("?", 1)[0]
    for _ in range(5):
        path = urllib.parse.unquote(path)
    path = path.replace("\\", "/")
    path = "/".join(segment.split(";", 1)[0] for segment in path.split("/"))
    return not posixpath.normpath(path).startswith("/base/v1/") or "//" in path


TRAVERSALS = [
    "/v1/../x",
    "/v1/..%2fx",
    "/v1/..%2Fx",
    "/v1/%2e%2e/x",
    "/v1/%2E%2E/admin",
    "/v1/.%2e/x",
    "/v1/models/../../x",
    "/v1/models/..%2f..%2fx",
    "/v1/%252e%252e/x",
    "/v1/%252e%252e%252fx",
    "/v1/..%5cx",
    "/v1/..\\x",
    "/v1/..;/x",
    "/v1/%c0%ae%c0%ae/x",
    "/v1//evil.example/x",
    "/v1/./x",
    "/v1/x/..",
    "/v1/...",
    "/v1/",
    "/v1/models/",
    "/v1/%2f%2fevil.example/x",
    "/v1/models%3f/x",
    "/v1/x%23/../../y",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_a_path_that_could_leave_v1_is_refused_and_never_sent(herd, upstream, target):
    before = len(upstream.received)
    answer = get(herd, target)
    assert answer.status in (400, 404), (target, answer)
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert upstream.received[before:] == []


def test_a_plain_path_is_forwarded_under_the_base_path_with_its_query(herd, upstream):
    answer = get(herd, "/v1/files/file-abc_1/content?limit=2&after=a%20b")
    assert answer.status == 200 and answer.json() == {"ok": True}
    sent = upstream.received[-1]
    assert sent.target == "/base/v1/files/file-abc_1/content?limit=2&after=a%20b"
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    answer = get(herd, "/v1/models/ft:gpt-4o-mini:org::abc")
    assert answer.status == 200
    assert upstream.received[-1].target == "/base/v1/models/ft:gpt-4o-mini:org::abc"


def test_an_absolute_form_target_goes_to_the_upstream_not_to_the_host_it_names(herd, upstream):
    answer = get(herd, "http://evil.example/v1/files")
    assert answer.status == 200
    assert upstream.received[-1].target == "/base/v1/files"


# Pieces of request targets that are valid on the wire, chosen for what they mean to URL parsers.
PIECES = [
    "/", "//", ".", "..", "...", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\", "%25", "%252e", "%252f",
    "2e", "2f", ";", "..;", "%3b", "%3f", "%23", "%00", "%c0%ae", "%u002e", "x", "v1", "models", "files",
    "admin", "?", "?a=/../..", "&", "=", ":", "@", "~", "-", "_", "a b".replace(" ", "%20"), "%",
]


@settings(max_examples=int(os.environ.get("HERD_FUZZ_CASES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=8), method=st.sampled_from(["GET", "POST"]))
def test_no_generated_path_reaches_the_upstream_outside_its_base_path(herd, upstream, pieces, method):
    before = len(upstream.received)
    answer = get(herd, "/v1/" + "".join(pieces), method)
    assert answer.status != 500
    for request in upstream.received[before:]:
        assert not escapes(request.target), request.target
        assert request.headers.get("authorization") == f"Bearer {PROVIDER_KEY}"


async def echo_key_in_pieces(request, writer) -> None:
    """A 401 whose error message repeats the Authorization it got, written in two pieces
    that split the key, so a redaction that looked at one read at a time would miss it."""
    seen = request.headers.get("authorization", "")
    body = b'{"error": {"message": "bad credentials: ' + seen.encode() + b'", "type": "invalid_request_error"}}'
    cut = body.index(b"sk-") + 5
    writer.write(b"HTTP/1.1 401 X\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
    for piece in (body[:cut], body[cut:]):
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


def test_a_forwarded_error_that_echoes_the_provider_key_is_redacted():
    with RawUpstream(echo_key_in_pieces) as up:
        cfg = herd_settings(
            up.url,
            upstreams={"sim": {"base_url": up.url + "/v1", "api_key": PROVIDER_KEY}},
            auth={"mode": "keys", "keys": [{"sha256": hashlib.sha256(CLIENT_KEY.encode()).hexdigest()}]},
        )
        with HerdServer(cfg) as h:
            answer = get(h, "/v1/files", "POST")
    assert up.received and up.received[-1].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert answer.status == 401  # the upstream's own answer, status and all
    assert PROVIDER_KEY.encode() not in answer.body and b"[redacted]" in answer.body
