"""Request context: an id per request (``X-Request-ID``), one access-log line, metrics, the last-resort 500.

The access log says who served what and how fast (request id, method, route template, status, latency,
model sha) and never anything from the request itself: no query string (ids), file names or pixels.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import internal_error_response, response_for
from service.logging_setup import request_id_var
from service.model.imaging import TooManyBytes

access_logger = logging.getLogger("service.access")
logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
UNMATCHED_ROUTE = "<unmatched>"


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


class RequestContextMiddleware:
    """Pure ASGI middleware (no body buffering): request id, access log, metrics, catch-all 500."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

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

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
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
            access_logger.info(
                "%s %s %d %.1f ms model=%s",
                method,
                route,
                status,
                elapsed * 1000.0,
                model,
                extra={
                    "request_id": request_id,
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
