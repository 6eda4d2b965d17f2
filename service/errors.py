"""Typed service errors and their one mapping to HTTP: JSON ``{"detail": "...", "code": "..."}``.

The exception classes import nothing from FastAPI, so the predictor, the store and the CLI can raise them;
:func:`install_error_handlers` is the single place where any error becomes a status code.
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


class UploadTooLarge(ServiceError):
    """The upload exceeds the byte limit (found while streaming it, before decoding)."""

    status_code = 413
    code = "file_too_large"


def format_bytes(n: int) -> str:
    """A byte count for people: ``512 bytes``, ``1.5 KiB``, ``20 MiB``."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{n} bytes" if unit == "bytes" else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def upload_too_large(max_bytes: int) -> UploadTooLarge:
    """The error for an upload over ``max_bytes``; the same sentence however the excess was detected."""
    return UploadTooLarge(f"The file is larger than the upload limit of {format_bytes(max_bytes)}.")


def decode_error_status(error: ImageDecodeError) -> int:
    """413 for too many bytes, 415 for a format that is not PNG/JPEG/DICOM, 400 for everything else."""
    if isinstance(error, TooManyBytes):
        return 413
    if isinstance(error, UnsupportedFormat):
        return 415
    return 400


_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 413: "file_too_large", 415: "unsupported_format", 422: "invalid_request",
    503: "not_ready",
}
_LOCATION_NAMES = {"body": "form field", "query": "query parameter", "path": "path parameter",
                   "header": "header", "cookie": "cookie"}


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


def error_response(status_code: int, detail: str, code: str, headers: Mapping[str, str] | None = None,
                   ) -> JSONResponse:
    """The one error body shape: ``{"detail": ..., "code": ...}``."""
    from fastapi.responses import JSONResponse

    body = {"detail": detail, "code": code}
    return JSONResponse(body, status_code=status_code, headers=dict(headers or {}))


def internal_error_response(request_id: str) -> JSONResponse:
    """500 for a server bug: says nothing about the request beyond its id (which is in the server log)."""
    return error_response(500, f"Internal server error (request id {request_id}).", "internal_error")


def install_error_handlers(app: FastAPI, *, max_upload_bytes: int) -> None:
    """Register the handlers that turn every expected error into ``{"detail", "code"}`` JSON."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc.status_code, exc.detail, exc.code)

    async def on_decode_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ImageDecodeError)
        return error_response(decode_error_status(exc), str(exc), exc.code)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, validation_detail(exc.errors()), "invalid_request")

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 413:  # BodyLimitMiddleware tripped while the multipart body streamed in
            error = upload_too_large(max_upload_bytes)
            return error_response(error.status_code, error.detail, error.code)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), code, exc.headers)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(ImageDecodeError, on_decode_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
