"""Any OpenAI-compatible server: OpenAI itself, vLLM, and the many that copy its API.

A streaming call asks for usage in the last chunk; a non-stream call's JSON body is split
into the chunks it would have been streamed as (and kept whole for non-stream waiters), so
either kind of flight serves stream and non-stream waiters alike. The HTTP client is
aiohttp (see benchmarks/HTTP_CLIENTS.md for the measurement behind that choice).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Iterator

import aiohttp
import orjson

from proxy.apis.base import Wire, malformed_answer
from proxy.apis.chat import CHAT_WIRE
from proxy.chunks import Chunk
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable, retry_headers
from proxy.sse import EventParser
from proxy.upstream.base import (
    HOP_BY_HOP,
    NOT_RELAYED,
    CallOptions,
    ForwardResponse,
    Upstream,
    Watchdog,
    connection_error,
    forward_path,
    url_under,
)

CLIENT_AUTH_HEADERS = frozenset({"authorization", "api-key", "x-api-key"})


class OpenAIUpstream(Upstream):
    kind = "openai"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._session: aiohttp.ClientSession | None = None
        self._client_timeout: aiohttp.ClientTimeout | None = None
        # A chat call's total timeout is its Watchdog's: aiohttp only bounds the connect.
        self._connect_timeout: aiohttp.ClientTimeout | None = None
        self._urls: dict[str, str] = {}  # by wire name
        self._fixed_headers: dict[str, dict[str, str]] = {}  # by accept, when the key is herd's own

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
        """The configured headers, the client's organization and project, and the key."""
        headers = {**self.cfg.headers, **options.headers}
        key = self.api_key(options)
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    def _chat_headers(self, options: CallOptions, accept: str) -> dict[str, str]:
        """A chat call's headers; made once per `accept` when herd holds the upstream's key
        and the client sent no organization or project."""
        if self.cfg.api_key and not options.headers:
            headers = self._fixed_headers.get(accept)
            if headers is None:
                headers = self._fixed_headers[accept] = self._build_chat_headers(options, accept)
            return headers
        return self._build_chat_headers(options, accept)

    def _build_chat_headers(self, options: CallOptions, accept: str) -> dict[str, str]:
        return {**self._auth_headers(options), "content-type": "application/json", "accept": accept}

    def _timeout(self) -> aiohttp.ClientTimeout:
        if self._client_timeout is None:
            self._client_timeout = aiohttp.ClientTimeout(
                total=self.cfg.total_timeout_s, connect=self.cfg.connect_timeout_s
            )
        return self._client_timeout

    def _connect_only(self) -> aiohttp.ClientTimeout:
        if self._connect_timeout is None:
            self._connect_timeout = aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout_s)
        return self._connect_timeout

    def _watchdog(self, limit_s: float) -> Watchdog:
        """The call's one timer: `limit_s` first, never past the total timeout."""
        return Watchdog(limit_s, f"upstream {self.name!r}", self.cfg.total_timeout_s)

    def speaks(self, wire: Wire) -> bool:
        return True  # OpenAI-compatible servers speak every OpenAI API (or answer its 404)

    def chat(self, body: dict, options: CallOptions, stream: bool = True) -> AsyncGenerator[list[Chunk], None]:
        return self.call(CHAT_WIRE, body, options, stream)

    def _url(self, wire: Wire) -> str:
        url = self._urls.get(wire.name)
        if url is None:
            url = self._urls[wire.name] = f"{self.cfg.base_url}/{wire.path}"
        return url

    async def call(
        self, wire: Wire, body: dict, options: CallOptions, stream: bool = True
    ) -> AsyncGenerator[list[Chunk], None]:
        wire = wire.per_call()
        if not stream:
            yield await self._whole(wire, body, options)
            return
        resp: aiohttp.ClientResponse | None = None
        watchdog = self._watchdog(self.cfg.first_byte_timeout_s)
        try:
            with self._failures():
                resp = await self._post(wire, wire.stream_payload(body), options, "text/event-stream", watchdog)
                if not resp.content_type.startswith("text/event-stream"):  # a server that ignores `stream`
                    yield wire.whole(await watchdog.wait(resp.read()), self.name)
                    return
                async for batch in self._events(wire, resp, watchdog):
                    yield batch  # the chunks of one network read go out together
        finally:
            watchdog.stop()
            if resp is not None:
                resp.release()

    async def _events(
        self, wire: Wire, resp: aiohttp.ClientResponse, watchdog: Watchdog
    ) -> AsyncGenerator[list[Chunk], None]:
        """The chunks of an SSE answer, a batch per network read, until the wire's end or
        the stream's. Only data events move the idle limit: `: keep-alive` comments never
        hold waiters."""
        reads = aiter(resp.content.iter_any())
        parser = EventParser()
        finished = done = False  # the answer is complete; nothing more will come ([DONE])
        while not done:
            data = await watchdog.wait(anext(reads, None))
            events = parser.close() if data is None else parser.feed(data)
            if events:
                watchdog.progress(self.cfg.idle_timeout_s)
            batch, ends, done = wire.events(events, self.name)
            finished = finished or ends or done
            if batch:
                yield batch
            if data is None:
                break
        if not finished:
            raise UpstreamUnavailable(f"upstream {self.name!r} ended the stream before it was complete")

    async def _whole(self, wire: Wire, body: dict, options: CallOptions) -> list[Chunk]:
        """A non-stream call. Its first byte is the whole answer, so no first-byte or idle
        timeout applies: only the call's total timeout. A server that streams anyway is read
        as a stream, with its first-byte and idle timeouts."""
        resp: aiohttp.ClientResponse | None = None
        watchdog = self._watchdog(self.cfg.total_timeout_s)
        try:
            with self._failures():
                resp = await self._post(wire, wire.whole_payload(body), options, "application/json", watchdog)
                if not resp.content_type.startswith("text/event-stream"):
                    return wire.whole(await watchdog.wait(resp.read()), self.name)
                watchdog.progress(self.cfg.first_byte_timeout_s)
                return [chunk async for batch in self._events(wire, resp, watchdog) for chunk in batch]
        finally:
            watchdog.stop()
            if resp is not None:
                resp.release()

    async def _post(self, wire: Wire, payload: dict, options: CallOptions, accept: str,
                    watchdog: Watchdog) -> aiohttp.ClientResponse:
        """The call's POST under `watchdog`; an error status is raised as the upstream's error
        (its body read, the response released)."""
        resp = await watchdog.wait(self.session.post(
            self._url(wire), data=orjson.dumps(payload), headers=self._chat_headers(options, accept),
            timeout=self._connect_only(),
        ))
        if resp.status >= 400:
            try:
                raise await watchdog.wait(self._error(resp))
            finally:
                resp.release()
        return resp

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """aiohttp's failures, and data that is not JSON, as herd's upstream errors."""
        try:
            yield
        except aiohttp.ConnectionTimeoutError as e:  # never connected: not a slow answer
            raise connection_error(self.name, e, self.cfg.base_url) from None
        except TimeoutError:  # aiohttp's own total timeout (forward)
            raise UpstreamTimeout(f"upstream {self.name!r} did not answer in time") from None
        except orjson.JSONDecodeError:
            raise malformed_answer(self.name, "data that is not JSON") from None
        except (aiohttp.ClientError, ConnectionError) as e:
            raise connection_error(self.name, e, self.cfg.base_url) from None

    async def _error(self, resp: aiohttp.ClientResponse) -> UpstreamError:
        raw = await resp.read()
        return UpstreamError(resp.status, raw, content_type=resp.content_type,
                             headers=retry_headers(resp.headers.items()), upstream=self.name)

    async def forward(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, options: CallOptions
    ) -> ForwardResponse:
        url = url_under(self.cfg.base_url, forward_path(method, path), query)
        out = {k: v for k, v in headers.items() if k not in HOP_BY_HOP and k not in CLIENT_AUTH_HEADERS}
        out.update(self._auth_headers(options))
        with self._failures():
            resp = await self.session.request(method, url, data=body or None, headers=out, timeout=self._timeout())
        back = [(k, v) for k, v in resp.headers.items() if k.lower() not in NOT_RELAYED]
        return ForwardResponse(resp.status, back, resp.content.iter_any(), resp.release)

