"""Typed service errors and their one mapping to HTTP: JSON ``{"detail": "...", "code": "..."}``.

The exception classes import nothing from FastAPI, so the predictor, the store and the CLI can raise them;
:func:`response_for` is the single place where a domain error (these, and the decoder's ``ImageDecodeError``)
becomes a status code; :func:`install_error_handlers` routes every handled exception through it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from service.model.imaging import ImageDecodeError, TooManyBytes, UnsupportedFormat

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of the errors a client can cause or see; ``detail`` is a sentence meant for a person."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotReady(ServiceError):
    """No verified model bundle is loaded."""

    status_code = 503
    code = "not_ready"


class Unauthorized(ServiceError):
    """API keys are configured and the request has none of them."""

    status_code = 401
    code = "unauthorized"


class PredictionNotFound(ServiceError):
    """A prediction id that is unknown or has expired from the store."""

    status_code = 404
    code = "unknown_id"


class UnknownTargetClass(ServiceError):
    """A class name that the loaded model does not predict."""

    status_code = 422
    code = "unknown_class"


class NotAChestXray(ServiceError):
    """The gate refused the image: it is not a chest radiograph the model was made for (nothing is labelled).

    ``score``/``threshold``: the gate score and the threshold it exceeded; both None when the DICOM metadata
    (Modality, BodyPartExamined) refused it before the network ran.
    """

    status_code = 422
    code = "not_a_chest_xray"

    def __init__(self, detail: str, score: float | None = None, threshold: float | None = None) -> None:
        super().__init__(detail)
        self.score = score
        self.threshold = threshold


class Overloaded(ServiceError):
    """Too much work is already queued (CPU-heavy work, the batching queue or the store's backend): try again later.

    ``retry_after_s`` goes into the ``Retry-After`` header (whole seconds, at least 1).
    """

    status_code = 503
    code = "overloaded"

    def __init__(self, detail: str, retry_after_s: float = 1.0) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


def decode_error_status(error: ImageDecodeError) -> int:
    """413 for too many bytes, 415 for a format that is not PNG/JPEG/DICOM, 400 for everything else."""
    if isinstance(error, TooManyBytes):
        return 413
    if isinstance(error, UnsupportedFormat):
        return 415
    return 400


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "file_too_large",
    415: "unsupported_format",
    422: "invalid_request",
    503: "not_ready",
}
_HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
_LOCATION_NAMES = {
    "body": "form field",
    "query": "query parameter",
    "path": "path parameter",
    "header": "header",
    "cookie": "cookie",
}


def validation_detail(errors: Sequence[Mapping[str, Any]]) -> str:
    """One readable sentence per FastAPI validation error, e.g. ``Missing required form field 'file'.``"""
    sentences = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        kind = _LOCATION_NAMES.get(loc[0], "field") if loc else "field"
        name = ".".join(loc[1:]) if len(loc) > 1 else (loc[0] if loc else "request")
        if error.get("type") == "missing":
            sentences.append(f"Missing required {kind} '{name}'.")
        else:
            message = str(error.get("msg", "invalid value")).rstrip(".")
            sentences.append(f"Invalid {kind} '{name}': {message}.")
    return " ".join(sentences) or "Invalid request."


def error_response(
    status_code: int,
    detail: str,
    code: str,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    """The one error body shape: ``{"detail": ..., "code": ...}`` (plus ``extra`` fields for some codes)."""
    from fastapi.responses import JSONResponse

    body: dict[str, Any] = {"detail": detail, "code": code, **(extra or {})}
    return JSONResponse(body, status_code=status_code, headers=dict(headers or {}))


def response_for(error: ServiceError | ImageDecodeError) -> JSONResponse:
    """The one mapping of a domain error to its HTTP answer (status, ``detail`` and ``code``)."""
    if isinstance(error, NotAChestXray):
        extra = {"gate_score": error.score, "gate_threshold": error.threshold}
        return error_response(error.status_code, error.detail, error.code, extra=extra)
    if isinstance(error, Overloaded):
        retry_after = str(max(1, round(error.retry_after_s)))
        return error_response(error.status_code, error.detail, error.code, headers={"Retry-After": retry_after})
    if isinstance(error, Unauthorized):
        # RFC 9110: a 401 names how to authenticate; the key goes in a header, not a standard scheme.
        challenge = 'APIKey realm="covid-cxr", header="X-API-Key"'
        return error_response(error.status_code, error.detail, error.code, headers={"WWW-Authenticate": challenge})
    if isinstance(error, ServiceError):
        return error_response(error.status_code, error.detail, error.code)
    return error_response(decode_error_status(error), str(error), error.code)


def internal_error_response(request_id: str) -> JSONResponse:
    """500 for a server bug: says nothing about the request beyond its id (which is in the server log)."""
    return error_response(500, f"Internal server error (request id {request_id}).", "internal_error")


def allowed_methods(request: Request) -> str:
    """The ``Allow`` value of a 405: every method some route serves at the request's path. Starlette's own names
    only the first matching route's (``GET`` for /explain, which takes ``POST`` too; RFC 9110 wants them all)."""
    from starlette.routing import Match, Mount

    # A mount matches its whole prefix whatever the method; the files below it answer their own 405s.
    routes = [route for route in request.app.router.routes if not isinstance(route, Mount)]
    return ", ".join(
        method
        for method in _HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every expected error into ``{"detail", "code"}`` JSON."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from service.middleware import BodyTooLarge

    async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError | ImageDecodeError)
        return response_for(exc)

    async def on_body_too_large(request: Request, exc: Exception) -> JSONResponse:
        # The body limit tripped while the multipart body streamed in: the decoder's own refusal.
        assert isinstance(exc, BodyTooLarge)
        return response_for(exc.error)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, validation_detail(exc.errors()), "invalid_request")

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and (allow := allowed_methods(request)):
            headers["Allow"] = allow
        return error_response(exc.status_code, str(exc.detail), code, headers)

    app.add_exception_handler(ServiceError, on_domain_error)
    app.add_exception_handler(ImageDecodeError, on_domain_error)
    app.add_exception_handler(BodyTooLarge, on_body_too_large)  # before its base class, HTTPException
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
