"""Request context: an id per request (``X-Request-ID``), the serving process (``X-Instance``), one access-log
line, metrics, the last-resort 500; the API key, Host, body size and upload time checks.

The access log says who asked for what, who served it and how fast (request id, client address, key id, method,
route template, status, latency, model sha) and never anything from the request itself: no query string (ids),
file names, pixels, or the key (its id is the first 8 hex digits of its sha256).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
import traceback
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import SecretStr
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Unauthorized, error_response, internal_error_response, response_for
from service.logging_setup import request_id_var
from service.model.imaging import TooManyBytes

if TYPE_CHECKING:
    from service.store import PredictionStore

access_logger = logging.getLogger("service.access")
logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
# Which process answered, so an operator can watch a load balancer spread requests; random, so it says nothing
# about the host (one app per process: replicas and uvicorn workers each build their own).
INSTANCE_HEADER = "X-Instance"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
UNMATCHED_ROUTE = "<unmatched>"
# Where ApiKeyMiddleware leaves the id of the key a request came with, for the access log (scope["state"]).
KEY_ID_STATE = "api_key_id"
NO_KEY = "-"
INVALID_KEY = "invalid"


class HttpMetrics:
    """Prometheus counters for one app (own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cxr_http_requests",
            "HTTP requests served.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cxr_http_request_duration_seconds",
            "HTTP request latency.",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )

    def watch_store(self, store: PredictionStore) -> None:
        """Gauges of what an in-process prediction store holds: a bounded part of RSS that fills under load."""
        Gauge("cxr_store_items", "Predictions kept for /explain.", registry=self.registry).set_function(
            lambda: len(store)
        )
        Gauge("cxr_store_bytes", "Image bytes kept for /explain.", registry=self.registry).set_function(
            lambda: store.nbytes
        )


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    return str(getattr(route, "path", UNMATCHED_ROUTE))


def _model_sha12(scope: Scope) -> str:
    app = scope.get("app")
    service_state = getattr(getattr(app, "state", None), "service", None)
    return str(getattr(service_state, "model_sha12", "-"))


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown location"
    last = frames[-1]
    return f"{last.filename}:{last.lineno} in {last.name}"


def _client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "-"


def _key_id(scope: Scope) -> str:
    return str(scope.get("state", {}).get(KEY_ID_STATE, NO_KEY))


class RequestContextMiddleware:
    """Pure ASGI middleware (no body buffering): request id, access log, metrics, catch-all 500, and the headers
    every response gets (``X-Content-Type-Options: nosniff``; ``Cache-Control: no-store`` under ``no_store``:
    results about a patient's image are not for a shared cache or the browser's history)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics | None = None, no_store: Sequence[str] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.instance_id = secrets.token_hex(6)
        self.no_store = tuple(no_store)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _VALID_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 500
        response_started = False
        no_store = bool(self.no_store) and str(scope["path"]).startswith(self.no_store)

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                headers[INSTANCE_HEADER] = self.instance_id
                headers.setdefault("X-Content-Type-Options", "nosniff")
                if no_store:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # A server bug. Log its type and where it happened, never its message (it may quote the input).
            logger.error("unhandled %s at %s", type(exc).__name__, _where(exc))
            if response_started:
                raise
            await internal_error_response(request_id)(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            method, route, model = scope["method"], _route_template(scope), _model_sha12(scope)
            client, key_id = _client_address(scope), _key_id(scope)
            access_logger.info(
                "%s %s %d %.1f ms client=%s key=%s model=%s",
                method,
                route,
                status,
                elapsed * 1000.0,
                client,
                key_id,
                model,
                extra={
                    "request_id": request_id,
                    "client": client,
                    "key_id": key_id,
                    "method": method,
                    "route": route,
                    "status": status,
                    "latency_ms": round(elapsed * 1000.0, 2),
                    "model_sha": model,
                },
            )
            if self.metrics is not None:
                self.metrics.requests.labels(method, route, str(status)).inc()
                self.metrics.latency.labels(method, route).observe(elapsed)
            request_id_var.reset(token)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit. It only carries the decoder's
    ``TooManyBytes`` through FastAPI, which re-raises HTTPExceptions from body parsing as they are (any
    other error there becomes a 400); its handler answers with that error like any other."""

    def __init__(self, max_upload_bytes: int) -> None:
        self.error = TooManyBytes(max_upload_bytes)
        super().__init__(status_code=413, detail=str(self.error))


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes``: at once when Content-Length says so (nothing is read),
    otherwise as soon as the streamed bytes pass the limit (chunked uploads), before the rest is received."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes  # what the client is told: the per-file limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await response_for(TooManyBytes(self.max_upload_bytes))(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_upload_bytes)
            return message

        await self.app(scope, limited_receive, send)


API_KEY_HEADER = "X-API-Key"


def key_id(key: str) -> str:
    """What the access log says about a key: the first 8 hex digits of its sha256 (never the key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def api_key_is_valid(keys: Sequence[SecretStr], offered: str | None) -> bool:
    """Whether ``offered`` is one of ``keys`` (constant-time: every key is compared, no early exit)."""
    offered_bytes = (offered or "").encode()
    matches = [secrets.compare_digest(offered_bytes, key.get_secret_value().encode()) for key in keys]
    return bool(offered) and any(matches)


class ApiKeyMiddleware:
    """Refuse a request to a protected route without a valid ``X-API-Key`` from its headers alone, before its
    body is read: a client without a key cannot hold a worker or fill the upload spool.

    ``protected``: path prefixes that need a key (the model routes); no keys configured: everything passes.
    """

    def __init__(self, app: ASGIApp, keys: Sequence[SecretStr], protected: Sequence[str]) -> None:
        self.app = app
        self.keys = list(keys)
        self.protected = tuple(protected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and self.keys and str(scope["path"]).startswith(self.protected)
        if not guarded:
            await self.app(scope, receive, send)
            return
        offered = Headers(scope=scope).get(API_KEY_HEADER)
        valid = api_key_is_valid(self.keys, offered)
        # Who asked, for the access log: a key's id once it is known to be valid (a wrong key is no identity).
        scope.setdefault("state", {})[KEY_ID_STATE] = key_id(offered) if valid and offered else INVALID_KEY
        if not valid:
            detail = f"Missing or invalid API key: send a valid key in the {API_KEY_HEADER} header."
            await response_for(Unauthorized(detail))(scope, receive, send)
            return
        await self.app(scope, receive, send)


class AllowedHostsMiddleware:
    """Starlette's TrustedHostMiddleware (the ``Host`` header must name this service: no DNS rebinding of a
    browser onto a key-less deployment), its refusal given in the JSON error shape. ``["*"]``: any host;
    ``exempt`` paths: any host (the probes, which a container's health check calls as 127.0.0.1)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str], exempt: Sequence[str] = ()) -> None:
        self.app = app
        self.allow_any = "*" in allowed_hosts
        self.exempt = tuple(exempt)  # paths any Host may reach (probes that hold no data)
        self.check = TrustedHostMiddleware(self._allowed, allowed_hosts=list(allowed_hosts), www_redirect=False)

    async def _allowed(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["cxr.host_allowed"] = True
        await self.app(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allow_any or scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return

        async def json_refusal(message: Message) -> None:
            if scope.get("cxr.host_allowed"):
                await send(message)
            elif message["type"] == "http.response.start":  # the check's plain-text 400: answered in JSON
                detail = "The Host header does not name this service (CXR_ALLOWED_HOSTS); the request was refused."
                await error_response(400, detail, "invalid_host")(scope, receive, send)
            # the plain-text body that follows is dropped

        await self.check(scope, receive, json_refusal)


class UploadTimedOut(HTTPException):
    """Raised from ``receive`` when a request body stalls or trickles; carried through FastAPI like
    BodyTooLarge, answered 408 with ``Connection: close`` (the rest of the body is never read)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=408, detail=detail, headers={"Connection": "close"})


class UploadTimeoutMiddleware:
    """Bound how long a request body may take: at most ``idle_s`` between two chunks, and after ``grace_s`` at
    least ``min_bytes_per_s`` on average. A body shorter than its Content-Length waits ``idle_s``, not forever."""

    def __init__(self, app: ASGIApp, idle_s: float, min_bytes_per_s: float, grace_s: float) -> None:
        self.app = app
        self.idle_s = idle_s
        self.min_bytes_per_s = min_bytes_per_s
        self.grace_s = grace_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        received = 0

        async def timed_receive() -> Message:
            nonlocal received
            try:
                with anyio.fail_after(self.idle_s):
                    message = await receive()
            except TimeoutError:
                raise UploadTimedOut(
                    f"The request body stalled: nothing arrived for {self.idle_s:g} s; the upload was dropped."
                ) from None
            received += len(message.get("body", b""))
            elapsed = time.monotonic() - start
            if message.get("more_body") and elapsed > self.grace_s and received < self.min_bytes_per_s * elapsed:
                raise UploadTimedOut(
                    f"The request body arrives too slowly (under {self.min_bytes_per_s / 1024:g} KiB/s); "
                    "the upload was dropped."
                )
            return message

        await self.app(scope, timed_receive, send)
