"""herd's one exception hierarchy. Every error a client sees is rendered in OpenAI's shape:

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

with the right HTTP status. Upstream errors keep the upstream's own status and body.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import orjson

log = logging.getLogger("herd.errors")


class HerdError(Exception):
    """Base class: an error that is answered to the client."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    @property
    def content_type(self) -> str:
        return "application/json"


class InvalidRequest(HerdError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(HerdError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(HerdError):
    status = 404
    type = "invalid_request_error"


class PayloadTooLarge(HerdError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(HerdError):
    """The client did not send its whole request body in time ([server] body_timeout_s)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class Overloaded(HerdError):
    """herd refuses work to protect an upstream (queue full, rate limited, circuit open)."""

    status = 503
    type = "server_error"
    code = "overloaded"


class ShuttingDown(HerdError):
    """herd is stopping and this request did not finish within [server] shutdown_grace_s."""

    status = 503
    type = "server_error"
    code = "shutting_down"


class DeadlineExceeded(HerdError):
    """A waiter's own deadline passed before its answer was complete."""

    status = 504
    type = "timeout"
    code = "deadline_exceeded"


class UpstreamError(HerdError):
    """The upstream answered with an error status: the client gets the same status and body."""

    type = "upstream_error"

    def __init__(
        self,
        status: int,
        raw_body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        message: str | None = None,
        upstream: str | None = None,
    ) -> None:
        super().__init__(message or f"upstream answered HTTP {status}", status=status, headers=headers)
        self.raw_body = raw_body
        self._content_type = content_type or "application/json"
        self.upstream = upstream

    @property
    def _raw_is_json(self) -> bool:
        return bool(self.raw_body) and self._content_type.startswith("application/json")

    @property
    def content_type(self) -> str:
        return self._content_type if self._raw_is_json else "application/json"

    def body(self) -> dict:
        try:
            parsed = orjson.loads(self.raw_body) if self.raw_body else None
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return parsed
        return super().body()

    def body_bytes(self) -> bytes:
        """The upstream's own JSON body as it came, else an OpenAI-format one."""
        if self._raw_is_json:
            return self.raw_body
        return orjson.dumps(self.body())


class UpstreamUnavailable(HerdError):
    """The upstream could not be reached, or dropped the connection."""

    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamUnreachable(UpstreamUnavailable):
    """herd could not connect to the upstream at all (DNS, refused, TLS, connect timeout):
    nothing was sent, and waiting a while rarely helps (proxy.upstream.base.connection_error)."""


class UpstreamTimeout(HerdError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


#: The headers with which an upstream asks for a pause; an UpstreamError keeps them (lower-cased)
#: and proxy.resilience.retry_after reads them.
RETRY_HEADERS = ("retry-after", "retry-after-ms")


def retry_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """An upstream response's Retry-After and retry-after-ms headers, names lower-cased."""
    return {k.lower(): v for k, v in headers if k.lower() in RETRY_HEADERS}


#: Shorter strings are not treated as secrets: cutting them out would mangle ordinary text.
SECRET_MIN_CHARS = 8


def redact(error: HerdError, secrets: Iterable[str | None]) -> None:
    """Cut each secret (a provider's key, a client's key) out of the error's message and body,
    in place: an upstream's error body may echo the key it was sent."""
    for secret in secrets:
        if not secret or len(secret) < SECRET_MIN_CHARS:
            continue
        error.message = error.message.replace(secret, "[redacted]")
        if isinstance(error, UpstreamError) and secret.encode() in error.raw_body:
            error.raw_body = error.raw_body.replace(secret.encode(), b"[redacted]")
    error.args = (error.message,)


def is_retryable(error: BaseException) -> bool:
    """Connect errors, resets, timeouts and 408/409/429/5xx may succeed on another try."""
    if isinstance(error, (UpstreamUnavailable, UpstreamTimeout)):
        return True
    if isinstance(error, UpstreamError):
        return error.status in (408, 409, 429) or error.status >= 500
    return False


def as_herd_error(error: BaseException, where: str) -> HerdError:
    """What a client is told about `error`: the error itself when herd raised it on purpose;
    anything else is a 500 internal_error that names nothing of it, and is logged with its
    traceback as having happened `where` ("on /v1/models", "in a flight")."""
    if isinstance(error, HerdError):
        return error
    log.error("internal error %s: %s", where, type(error).__name__, exc_info=error)
    return HerdError("herd hit an internal error", code="internal_error")
