"""The blocksketch query service: an authenticated JSON API over the Redis index.

Every endpoint but ``/healthz`` needs ``Authorization: Bearer TOKEN`` (compared in constant time).
Bodies are size-limited; errors are JSON ``{"error", "detail"}`` with a 4xx for bad input and a 5xx
only for real server faults. Handlers are synchronous library calls run in Starlette's thread pool.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import msgpack
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sketch.errors import BlocksketchError, UsageError
from store import keys

from .errors import HTTPError, error_response, library_error_response
from .metrics import ServiceMetrics
from .openapi import openapi_document

DEFAULT_MAX_BODY_BYTES = 64 << 20
WORKER_THREADS = max(2, 2 * (os.cpu_count() or 1))
MSGPACK = "application/msgpack"
# A body may take BODY_GRACE_S, plus one second per BODY_MIN_RATE bytes received: a 40 MiB rank
# query (a 1 GiB image in 512-byte blocks) still crosses a 10 Mbit/s link, a trickle does not.
BODY_GRACE_S = 10.0
BODY_MIN_RATE = 64 << 10
CLOSE = {"Connection": "close"}  # after a refused body: the rest of it is not worth reading

log = logging.getLogger("blocksketch.server")


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a string the client sent (a lone surrogate) always renders."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


@dataclass
class ServiceState:
    """What every handler needs: the store, the token, the limits, the metrics, handler extensions."""

    store: object
    token: str | None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)


async def read_body(request: Request, limit: int) -> list[bytes]:
    """The request body's chunks: 413 past ``limit`` bytes (declared or streamed), 408 if it arrives too slowly.

    Not joined here: joining 57 MiB takes ~90 ms, which the event loop must not wait for."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise HTTPError(400, "bad_request", "Content-Length is not a number")
        if len(declared) > 19 or int(declared) > limit:
            raise _too_large(limit)
    chunks = []
    size = 0
    started = time.monotonic()
    stream = request.stream()
    while True:
        allowed = started + BODY_GRACE_S + size / BODY_MIN_RATE - time.monotonic()
        chunk = None
        with anyio.move_on_after(max(allowed, 0)) as wait:
            try:
                chunk = await anext(stream, None)
            except ClientDisconnect:
                raise HTTPError(400, "bad_request", "the client closed the connection before the body ended") \
                    from None
        if wait.cancelled_caught:
            raise HTTPError(408, "body_timeout", f"the request body arrived slower than {BODY_MIN_RATE >> 10} KiB/s "
                            f"(after {BODY_GRACE_S:.0f} s)", CLOSE)
        if chunk is None:
            return chunks
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)


def _too_large(limit: int) -> HTTPError:
    return HTTPError(413, "body_too_large", f"the request body is over this service's limit of {limit} bytes "
                     f"({limit / (1 << 20):g} MiB)", CLOSE)


def decode_body(chunks: list[bytes], content_type: str) -> dict:
    """A JSON (or msgpack) object body; anything else, however malformed or deep, is a 400.

    Large bodies take a while to join and decode: the caller runs this off the event loop."""
    body = b"".join(chunks)
    if not body:
        raise HTTPError(400, "bad_request", "request body is empty; a JSON object is expected")
    if content_type.split(";")[0].strip().lower() == MSGPACK:
        try:
            value = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types on bad input
            raise HTTPError(400, "bad_request", f"malformed msgpack body: {_first_line(exc)}") from None
    else:
        try:
            value = json.loads(body)
        except RecursionError:
            raise HTTPError(400, "bad_request", "malformed JSON body: nested too deeply") from None
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise HTTPError(400, "bad_request", f"malformed JSON body: {_first_line(exc)}") from None
    if not isinstance(value, dict):
        raise HTTPError(400, "bad_request", "the body must be an object")
    return value


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def check_token(request: Request, token: str | None) -> None:
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPError(401, "unauthorized", "a valid 'Authorization: Bearer TOKEN' header is required")


Handler = Callable[[ServiceState, dict, dict], object]


def endpoint(state: ServiceState, route: str, handler: Handler, *, auth: bool = True, body: bool = False):
    """Wrap a synchronous ``handler(state, path_params, body)`` with auth, body parsing, errors, metrics."""

    async def asgi_endpoint(request: Request) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            if auth:
                check_token(request, state.token)
            payload = {}
            if body:
                chunks = await read_body(request, state.max_body_bytes)
                payload = await anyio.to_thread.run_sync(decode_body, chunks, request.headers.get("content-type", ""))
            params = dict(request.path_params)
            params["_query"] = dict(request.query_params)
            result = await run_in_threadpool(handler, state, params, payload)
            response = result if isinstance(result, Response) else AsciiJSONResponse(result)
        except HTTPError as exc:
            response = error_response(exc.status, exc.error, exc.detail, exc.headers)
        except BlocksketchError as exc:
            response = library_error_response(exc)
            if response.status_code >= 500:  # the store is down: the operator needs to know, not only the client
                log.error("%s %s answered %d", request.method, route, response.status_code, exc_info=exc)
        except Exception as exc:  # a real fault: 500 with a JSON body, the traceback to the log only
            log.exception("%s %s failed", request.method, route)
            response = error_response(500, "internal_error", f"{type(exc).__name__}: {_first_line(exc)}")
        status = response.status_code
        state.metrics.requests.labels(route, request.method, str(status)).inc()
        state.metrics.latency.labels(route).observe(time.perf_counter() - started)
        if status >= 400:
            state.metrics.errors.labels(route, json.loads(response.body).get("error", "unknown")).inc()
        return response

    return asgi_endpoint


def _healthz(state: ServiceState, params: dict, body: dict) -> Response:
    try:
        redis_ok = bool(state.store.client.ping())
    except Exception:  # any failure to answer means "not healthy", which is what this endpoint reports
        redis_ok = False
    return JSONResponse({"status": "ok", "redis": redis_ok, "store": state.store.url})


def _hosts(state: ServiceState, params: dict, body: dict) -> list:
    return [host.to_dict() for host in state.store.hosts()]


def _host_images(state: ServiceState, params: dict, body: dict) -> list:
    host = keys.check_host(params["host"])
    if host not in state.store.host_names():
        raise_unknown_host(state, host)
    return [image.to_dict() for image in state.store.images(host)]


def raise_unknown_host(state: ServiceState, host: str) -> None:
    from sketch.errors import NotFound

    known = state.store.host_names()
    raise NotFound(f"unknown host {host!r}; indexed hosts: {', '.join(known) if known else 'none'}")


def _index(state: ServiceState, params: dict, body: dict) -> dict:
    from sketch.errors import NotFound

    config = state.store.config()
    if config is None:
        raise NotFound("the index is empty: run `blocksketch index` on the hosts first")
    return {"block_size": config.block_size, "algorithm": config.algorithm, "fp_rate": config.fp_rate,
            "k": config.k, "hosts": len(state.store.host_names())}


def _metrics(state: ServiceState, params: dict, body: dict) -> Response:
    hosts = state.store.hosts()
    state.metrics.index_hosts.set(len(hosts))
    state.metrics.index_images.set(sum(h.images for h in hosts))
    state.metrics.index_bytes.set(sum(h.size_bytes for h in hosts))
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _openapi(state: ServiceState, params: dict, body: dict) -> JSONResponse:
    return JSONResponse(openapi_document())


def positive_int(body: dict, name: str, default: int, maximum: int = 100_000) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise UsageError(f"'{name}' must be an integer from 0 to {maximum}")
    return value


def string_field(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise UsageError(f"'{name}' must be a non-empty string")
    return value


def create_app(store, token: str | None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Starlette:
    """The ASGI app over an open store."""
    from . import handlers

    state = ServiceState(store, token, max_body_bytes)
    routes = [
        Route("/healthz", endpoint(state, "/healthz", _healthz, auth=False), methods=["GET"]),
        Route("/openapi.json", endpoint(state, "/openapi.json", _openapi), methods=["GET"]),
        Route("/metrics", endpoint(state, "/metrics", _metrics), methods=["GET"]),
        Route("/v1/index", endpoint(state, "/v1/index", _index), methods=["GET"]),
        Route("/v1/hosts", endpoint(state, "/v1/hosts", _hosts), methods=["GET"]),
        Route("/v1/hosts/{host}/images", endpoint(state, "/v1/hosts/{host}/images", _host_images), methods=["GET"]),
        Route("/v1/rank", endpoint(state, "/v1/rank", handlers.rank, body=True), methods=["POST"]),
        Route("/v1/manifest", endpoint(state, "/v1/manifest", handlers.manifest, body=True), methods=["POST"]),
    ]

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        if status == 405:
            response = error_response(405, "method_not_allowed",
                                      f"{request.method} is not allowed on {request.url.path}")
            allow = (getattr(exc, "headers", None) or {}).get("Allow")
            if allow:
                response.headers["Allow"] = allow  # RFC 9110: a 405 lists the methods the resource has
            return response
        return error_response(404, "not_found", f"no endpoint at {request.url.path}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Ranking is numpy work on 2 cores: a few threads finish requests sooner than 40 contending ones.
        anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
        yield

    async def server_error(request: Request, exc: Exception) -> Response:
        # Only faults outside the endpoints get here; Starlette re-raises them for uvicorn to log.
        return error_response(500, "internal_error", type(exc).__name__)

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, Exception: server_error},
                    lifespan=lifespan)
    app.state.service = state
    return app
