"""The route layer: HTTP in, HTTP out. Built by `create_app(settings)`; no globals."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
from collections.abc import AsyncIterator, Mapping

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.apis import APIS
from proxy.apis.base import Api, load_object, require_model
from proxy.apis.chat import CHAT
from proxy.apis.embeddings import PATH as EMBEDDINGS_PATH
from proxy.apis.embeddings import parse_embeddings
from proxy.apis.messages import MESSAGES, parse_messages
from proxy.config import Settings
from proxy.errors import (
    DeadlineExceeded,
    HerdError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    UpstreamError,
    as_herd_error,
)
from proxy.gateway import Gateway
from proxy.ids import unique_id
from proxy.logs import flush_logs, log_access
from proxy.metrics import CONTENT_TYPE_LATEST, Metrics
from proxy.responses import FlightResponse, shutting_down, until_disconnect
from proxy.sampling import HEADER as SAMPLED_HEADER
from proxy.sampling import parse_header as sampled_policy
from proxy.tasks import this_task
from proxy.upstream.base import forward_path

log = logging.getLogger("herd.app")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The collector's youngest-generation threshold (CPython's default: 700). A request's few
# hundred objects die by reference counting, but at 700 the collector still ran ~100 times a
# second at half load (4% of the loop's time, pauses of 0.3 ms, and 2 ms for the older
# generations it promotes in-flight requests' objects into); at 10,000 it hardly runs.
# `herd bench compare --workload unique`: half-load p50 ~0.3 ms lower, req/s ~10% higher.
GC_YOUNG_THRESHOLD = 10_000


def request_id_of(headers: Mapping[str, str]) -> str:
    """The client's x-request-id when it is a plain token, else a new one."""
    given = headers.get("x-request-id", "")
    return given if given and _REQUEST_ID.fullmatch(given) else unique_id()


def header_map(request: Request) -> dict[str, str]:
    """The request's headers as a plain dict, the first of repeated names winning: one pass
    over the raw headers instead of one per lookup (chat requests look up several)."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(request.scope["headers"])}


def error_response(error: HerdError, api: Api | None = None) -> Response:
    """An error in `api`'s shape (OpenAI's by default)."""
    body, content_type = api.error_body(error) if api is not None else (error.body_bytes(), error.content_type)
    return Response(body, status_code=error.status, media_type=content_type, headers=error.headers)


def body_arrived(receive: Receive) -> bool:
    """Whether the server holds the whole request body already, so that `receive()` returns
    it without waiting. uvicorn says so on the object `receive` is a method of (its message
    event set, no more body to come; the same idea as responses.drop_connection); on another
    server, or when in doubt, False."""
    cycle = getattr(receive, "__self__", None)
    event = getattr(cycle, "message_event", None)
    return isinstance(event, asyncio.Event) and event.is_set() and getattr(cycle, "more_body", True) is False


async def read_body(receive: Receive, limit: int, length: str | None, timeout_s: float) -> bytes:
    """The request body, refused past `limit` bytes (`length`: its content-length header) or
    when it has not all arrived within `timeout_s` (a client that declares a length and
    sends nothing, or drips a byte at a time, must not hold its connection forever)."""
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"The request body is {length} bytes; the limit is {limit}.")
    parts, size = [], 0
    # the usual case, a body that is all here already, needs no timer (one per request)
    timer = contextlib.nullcontext() if body_arrived(receive) else asyncio.timeout(timeout_s)
    try:
        async with timer:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                part = message.get("body", b"")
                size += len(part)
                if size > limit:
                    raise PayloadTooLarge(f"The request body is over the limit of {limit} bytes.")
                parts.append(part)
                if not message.get("more_body", False):
                    return b"".join(parts)
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {timeout_s:g} seconds.", headers={"connection": "close"}
        ) from None


def create_app(settings: Settings, gateway: Gateway | None = None) -> ApisFirst:
    gateway = gateway or Gateway(settings, Metrics())
    limit = settings.server.max_body_bytes
    body_timeout = settings.server.body_timeout_s

    metrics = gateway.metrics
    access_log = settings.server.access_log

    def count_error(error: HerdError, api: Api | None = CHAT) -> None:
        metrics.errors.labels(str(error.status)).inc()
        if api is not None:
            metrics.requests.labels("error").inc()
            metrics.api_requests.labels(api.name, "error").inc()

    async def coalesced(api: Api, request: Request) -> FlightResponse:
        """POST to a coalesced API (chat, Responses, legacy completions): parse with the
        API's module, submit to the gateway, render the flight to this waiter."""
        headers = header_map(request)
        identity = gateway.auth.identify(headers)
        req = api.parse(await read_body(request.receive, limit, headers.get("content-length"), body_timeout))
        api.read_headers(req, headers)
        mode = gateway.mode_for(headers.get("x-herd-coalesce"))
        sampled = sampled_policy(headers.get(SAMPLED_HEADER))
        control = headers.get("cache-control")
        directives = {d.strip().lower() for d in control.split(",")} if control else set()
        ticket = gateway.submit(
            req, identity, mode, read_cache="no-cache" not in directives, write_cache="no-store" not in directives,
            sampled=sampled,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        request_id = request_id_of(headers)

        def done(response: FlightResponse) -> None:
            ticket = response.ticket
            if response.error is not None:
                count_error(response.error, api)
            elif response.disconnected:
                metrics.disconnects.labels(ticket.role).inc()
            else:
                metrics.requests.labels(ticket.role).inc()
                metrics.api_requests.labels(api.name, ticket.role).inc()
                if response.shared_sample:
                    metrics.shared_samples.labels(ticket.role).inc()
                usage = req.wire.flight_usage(ticket.flight)
                gateway.accountant.record(ticket.role, req.model, identity.tenant, usage)
                finished = ticket.flight.finished_at
                if finished is not None and response.answered_at is not None and ticket.role != "cache":
                    metrics.fanout_lag.observe(max(0.0, response.answered_at - finished))
            if access_log:
                extra = {
                    "request_id": request_id,
                    "api": api.name,
                    "flight": ticket.flight.public_id,
                    "role": response.role,
                    "status": response.error.status if response.error is not None else 200,
                    "disconnected": response.disconnected,
                    "stream": req.stream,
                    "model": req.model,
                    "tenant": identity.tenant,
                    "upstream": ticket.flight.served_by,
                    "ms": round((loop.time() - started) * 1000, 2),
                }
                if settings.server.log_prompts and req.final_text is not None:
                    extra["prompt"] = req.final_text
                log_access(api.name, extra)

        return FlightResponse(
            ticket,
            req,
            deadline=started + settings.server.request_timeout_s,
            release=gateway.release,
            on_done=done,
            request_id=request_id,
            on_cut=metrics.clients_cut.inc,
            coalesce=mode if headers.get("x-herd-coalesce") else "",
        )

    async def list_models(request: Request) -> Response:
        models = await gateway.list_models(gateway.auth.identify(request.headers))
        return Response(orjson.dumps({"object": "list", "data": models}), media_type="application/json")

    async def forward(request: Request) -> Response:
        # checked before anything else: a path that could leave /v1 is never sent anywhere
        path = forward_path(request.method, request.path_params["path"])
        identity = gateway.auth.identify(request.headers)
        body = await read_body(request.receive, limit, request.headers.get("content-length"), body_timeout)
        try:
            upstream, resp = await gateway.forward(
                request.method, path, request.url.query, dict(request.headers), body, identity
            )
        except HerdError:
            metrics.api_requests.labels("forward", "error").inc()
            raise
        # a forwarded answer is one upstream call of its own: counted as a bypass
        metrics.requests.labels("bypass").inc()
        metrics.api_requests.labels("forward", "bypass").inc()
        headers = [(k, v) for k, v in resp.headers] + [("x-herd", "bypass"), ("x-herd-upstream", upstream)]

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for part in resp.body:
                    yield part
            finally:
                resp.close()

        out = StreamingResponse(relay(), status_code=resp.status)
        out.raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers]
        return out

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        body = {"status": "ready", "flights": len(gateway.group), "mode": settings.coalesce.mode}
        if gateway.redis is not None:
            # Still 200 while Redis is down: herd serves every request local-only meanwhile.
            body["redis"] = "up" if gateway.redis.up else "down"
            if not gateway.redis.up:
                body["status"] = "degraded"
        return JSONResponse(body)

    async def prometheus(request: Request) -> Response:
        return Response(await gateway.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    async def on_herd_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HerdError)  # registered for HerdError
        count_error(exc, None)
        return error_response(exc)

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)  # registered for HTTPException
        if exc.status_code == 404:
            error: HerdError = NotFound(f"Unknown path {request.url.path}", code="unknown_url")
        else:
            error = InvalidRequest(str(exc.detail), status=exc.status_code, code="invalid_request")
        return error_response(error)

    async def on_exception(request: Request, exc: Exception) -> Response:
        return error_response(as_herd_error(exc, f"on {request.url.path}"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        # What start-up made (modules, tokenizer tables, the matcher's word lists, the model)
        # lives as long as the process: out of the collector's sight, a full collection under
        # load takes ~2.4 ms instead of ~22 ms (python -m benchmarks.inprocess).
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        log.info("herd ready", extra={"mode": settings.coalesce.mode, "upstreams": list(gateway.upstreams)})
        try:
            yield
        finally:
            await gateway.aclose()
            log.info("herd stopped: every flight finished")
            flush_logs()  # the process may end by the re-raised SIGTERM, before atexit runs

    def api_route(api: Api) -> ASGIApp:
        async def route(scope: Scope, receive: Receive, send: Send) -> None:
            """POST to `api`, with the error handling Starlette's layers give the rest."""
            request = Request(scope, receive)
            response: Response | FlightResponse
            try:
                response = await coalesced(api, request)
            except ClientDisconnect:
                return  # gone while sending its body: nobody to answer
            except asyncio.CancelledError:  # the server's shutdown grace is over: still a proper answer
                this_task().uncancel()
                error: HerdError = shutting_down()
                count_error(error, api)
                response = error_response(error, api)
            except Exception as exc:
                error = as_herd_error(exc, f"on {request.url.path}")
                count_error(error, api)
                response = error_response(error, api)
            await response(scope, receive, send)

        return route

    async def embeddings(scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/embeddings, coalesced per input (Gateway.embed); errors in OpenAI's shape."""
        request = Request(scope, receive)
        response: Response
        try:
            headers = header_map(request)
            identity = gateway.auth.identify(headers)
            req = parse_embeddings(await read_body(request.receive, limit, headers.get("content-length"),
                                                   body_timeout))
            mode = gateway.mode_for(headers.get("x-herd-coalesce"))
            control = headers.get("cache-control")
            directives = {d.strip().lower() for d in control.split(",")} if control else set()
            tickets, _ = gateway.embed(req, identity, mode, read_cache="no-cache" not in directives,
                                       write_cache="no-store" not in directives)
            answer: list = []

            async def wait() -> None:
                answer.append(await gateway.embedded(req, tickets))

            try:
                async with asyncio.timeout(settings.server.request_timeout_s):
                    # a client that leaves releases its inputs' flights: the last waiter out cancels the call
                    if not await until_disconnect(wait(), receive):
                        return
            except TimeoutError:
                raise DeadlineExceeded("The embeddings were not all answered before the request's deadline.") from None
            result = answer[0]
            metrics.requests.labels(result.role).inc()
            metrics.api_requests.labels("embeddings", result.role).inc()
            for source, n in result.counts.items():
                metrics.embedding_inputs.labels(source).inc(n)
            usage = orjson.loads(result.body[result.body.rindex(b',"usage":') + 9:-1])
            gateway.accountant.record(result.role, req.model, identity.tenant, usage)
            summary = ";".join(f"{k}={v}" for k, v in result.counts.items())
            response = Response(result.body, media_type="application/json",
                                headers={"x-herd": result.role, "x-herd-inputs": summary})
        except ClientDisconnect:
            return
        except asyncio.CancelledError:
            this_task().uncancel()
            error: HerdError = shutting_down()
            count_error(error, None)
            response = error_response(error)
        except Exception as exc:
            error = as_herd_error(exc, f"on {request.url.path}")
            count_error(error, None)
            metrics.requests.labels("error").inc()
            metrics.api_requests.labels("embeddings", "error").inc()
            response = error_response(error)
        await response(scope, receive, send)

    async def count_tokens(scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/messages/count_tokens: an Anthropic route's upstream counts (the body as
        it came); for an OpenAI-compatible route herd counts the translated request with
        tiktoken and says so (x-herd-token-count: estimate)."""
        request = Request(scope, receive)
        response: Response
        try:
            headers = header_map(request)
            identity = gateway.auth.identify(headers)
            raw = await read_body(request.receive, limit, headers.get("content-length"), body_timeout)
            body = load_object(raw)
            model = require_model(body)
            probe = parse_messages(orjson.dumps({"max_tokens": 1, **body}))
            MESSAGES.read_headers(probe, headers)
            _, upstream = gateway.route(model)
            native = getattr(upstream, "native", None)
            if native is not None:
                # a forwarded call like any other: the dispatcher's breaker, rate limits and metrics
                try:
                    name, resp = await gateway.forward("POST", "messages/count_tokens", "",
                                                       {"content-type": "application/json"}, raw, identity,
                                                       api_headers=probe.upstream_headers)
                    try:
                        answer = b"".join([part async for part in resp.body])
                    finally:
                        resp.close()
                    if resp.status >= 400:
                        content_type = next((v for k, v in resp.headers if k.lower() == "content-type"),
                                            "application/json")
                        raise UpstreamError(resp.status, answer, content_type=content_type, upstream=name)
                except HerdError:
                    metrics.api_requests.labels("forward", "error").inc()
                    raise
                metrics.requests.labels("bypass").inc()
                metrics.api_requests.labels("forward", "bypass").inc()
                response = Response(answer, status_code=resp.status, media_type="application/json",
                                    headers={"x-herd": "bypass", "x-herd-upstream": name})
            else:
                from proxy.upstream.anthropic import chat_request_of  # the SDK is loaded only when used

                chat = chat_request_of({**body, "max_tokens": 1})
                count = gateway.dispatcher.tokens.count(chat, model)
                response = Response(orjson.dumps({"input_tokens": count.tokens}), media_type="application/json",
                                    headers={"x-herd": "estimate", "x-herd-token-count": "estimate",
                                             "x-herd-token-encoding": count.encoding})
        except ClientDisconnect:
            return
        except Exception as exc:
            error = as_herd_error(exc, f"on {request.url.path}")
            count_error(error, None)
            response = error_response(error, MESSAGES)
        await response(scope, receive, send)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    app = Starlette(
        routes=[
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/{path:path}", forward, methods=methods),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        exception_handlers={HerdError: on_herd_error, HTTPException: on_http_exception, Exception: on_exception},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return ApisFirst(app, {**{api.path: api_route(api) for api in APIS}, EMBEDDINGS_PATH: embeddings,
                          "/v1/messages/count_tokens": count_tokens})


class ApisFirst:
    """The ASGI app herd serves: a POST to a coalesced API (chat completions, the hot path,
    and the others in proxy.apis) goes straight to its handler; everything else (the other
    routes, lifespan) goes to the Starlette app.

    Starlette's router and middleware add calls to every request, and to every chunk sent
    to every stream waiter, that do nothing for it (see benchmarks/RESULTS.md).
    """

    def __init__(self, app: Starlette, apis: dict[str, ASGIApp]) -> None:
        self.app = app
        self.apis = apis
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and (api := self.apis.get(scope["path"])):
            await api(scope, receive, send)
        elif scope["type"] == "http":
            await answer_shutdown(self.app, scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def answer_shutdown(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run `app` for a request; if the server cancels it when its shutdown grace is over,
    the client gets an OpenAI-format 503 instead of the server's plain-text 500. (A response
    that has started is cut: a forwarded body cannot take an error.)"""
    started = False

    async def tracked(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, tracked)
    except asyncio.CancelledError:
        if started:
            raise
        this_task().uncancel()
        await error_response(shutting_down())(scope, receive, send)
