"""Any OpenAI-compatible server: OpenAI itself, vLLM, and the many that copy its API.

A streaming call asks for usage in the last chunk; a non-stream call's JSON body is split
into the chunks it would have been streamed as (and kept whole for non-stream waiters), so
either kind of flight serves stream and non-stream waiters alike. The HTTP client is
aiohttp (see benchmarks/HTTP_CLIENTS.md for the measurement behind that choice).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson

from proxy.chunks import Chunk, split
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.sse import read_events
from proxy.upstream.base import (
    HOP_BY_HOP,
    CallOptions,
    ForwardResponse,
    Upstream,
    Watchdog,
)

CLIENT_AUTH_HEADERS = frozenset({"authorization", "api-key", "x-api-key"})


class OpenAIUpstream(Upstream):
    kind = "openai"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._session: aiohttp.ClientSession | None = None
        self._client_timeout: aiohttp.ClientTimeout | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.cfg.max_connections, ttl_dns_cache=300, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("User-Agent",),
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"upstream {self.name!r} is not started")
        return self._session

    def _auth_headers(self, options: CallOptions) -> dict[str, str]:
        headers = dict(self.cfg.headers)
        key = self.api_key(options)
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    def _timeout(self) -> aiohttp.ClientTimeout:
        if self._client_timeout is None:
            self._client_timeout = aiohttp.ClientTimeout(
                total=self.cfg.total_timeout_s, connect=self.cfg.connect_timeout_s
            )
        return self._client_timeout

    async def chat(self, body: dict, options: CallOptions, stream: bool = True) -> AsyncIterator[Chunk]:
        if stream:
            payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
            limit_s, accept = self.cfg.first_byte_timeout_s, "text/event-stream"
        else:
            payload = {k: v for k, v in body.items() if k != "stream_options"}
            payload["stream"] = False
            # the whole answer is the first byte: only the call's total timeout applies
            limit_s, accept = self.cfg.total_timeout_s, "application/json"
        headers = {**self._auth_headers(options), "content-type": "application/json", "accept": accept}
        url = f"{self.cfg.base_url}/chat/completions"
        finished = False
        resp: aiohttp.ClientResponse | None = None
        watchdog = Watchdog(limit_s, f"upstream {self.name!r}")
        try:
            resp = await watchdog.wait(
                self.session.post(url, data=orjson.dumps(payload), headers=headers, timeout=self._timeout())
            )
            if resp.status >= 400:
                raise await watchdog.wait(self._error(resp))
            if not resp.content_type.startswith("text/event-stream"):
                # A non-stream call, or a server that ignores `stream`: one JSON body, as chunks.
                raw = await watchdog.wait(resp.read())
                for chunk in split(_completion(raw, self.name), raw):
                    yield chunk
                return
            events = aiter(read_events(resp.content.iter_any()))
            while (event := await watchdog.wait(anext(events, None))) is not None:
                watchdog.progress(self.cfg.idle_timeout_s)
                if event.data == b"[DONE]":
                    finished = True
                    break
                data = orjson.loads(event.data)
                if "error" in data and "choices" not in data:
                    raise UpstreamError(502, orjson.dumps(data), upstream=self.name)
                if any(c.get("finish_reason") for c in data.get("choices") or ()):
                    finished = True
                yield Chunk(data, event.data)
        except TimeoutError:  # aiohttp's own connect or total timeout
            raise UpstreamTimeout(f"upstream {self.name!r} did not answer in time") from None
        except (aiohttp.ClientError, orjson.JSONDecodeError, ConnectionError) as e:
            raise UpstreamUnavailable(f"upstream {self.name!r} failed: {type(e).__name__}") from None
        finally:
            watchdog.stop()
            if resp is not None:
                resp.release()
        if not finished:
            raise UpstreamUnavailable(f"upstream {self.name!r} ended the stream before it was complete")

    async def _error(self, resp: aiohttp.ClientResponse) -> UpstreamError:
        raw = await resp.read()
        keep = {k.lower(): v for k, v in resp.headers.items() if k.lower() in ("retry-after", "retry-after-ms")}
        return UpstreamError(resp.status, raw, content_type=resp.content_type, headers=keep, upstream=self.name)

    async def forward(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, options: CallOptions
    ) -> ForwardResponse:
        url = f"{self.cfg.base_url}/{path}" + (f"?{query}" if query else "")
        out = {k: v for k, v in headers.items() if k not in HOP_BY_HOP and k not in CLIENT_AUTH_HEADERS}
        out.update(self._auth_headers(options))
        try:
            resp = await self.session.request(method, url, data=body or None, headers=out, timeout=self._timeout())
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {self.name!r} did not answer in time") from None
        except (aiohttp.ClientError, ConnectionError) as e:
            raise UpstreamUnavailable(f"upstream {self.name!r} failed: {type(e).__name__}") from None
        back = [
            (k, v) for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"
        ]
        return ForwardResponse(resp.status, back, resp.content.iter_any(), resp.release)


def _completion(raw: bytes, upstream: str) -> dict:
    """A non-stream answer's `chat.completion` object; anything else is the upstream's fault."""
    data = orjson.loads(raw)
    if isinstance(data, dict) and isinstance(data.get("choices"), list):
        return data
    if isinstance(data, dict) and "error" in data:
        raise UpstreamError(502, raw, upstream=upstream)  # an error object with a 200 status
    raise UpstreamUnavailable(f"upstream {upstream!r} answered with something that is not a chat completion")
