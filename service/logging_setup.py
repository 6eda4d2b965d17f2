"""Logging for the entry points: configured once by ``cxr-serve`` / ``cxr-predict``, never at import.

Every record carries the current request id (``-`` outside a request) from a context variable that the
request middleware sets; anyio copies it into worker threads, so logs from decode/ORT/Grad-CAM carry it too.
Formats: ``text`` (one readable line) or ``json`` (one object per line, for log shippers).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import warnings
from contextvars import ContextVar
from typing import Any, TextIO

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

# Attributes every LogRecord has; anything else was passed through ``extra=`` and goes into the JSON.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn adds color_message: the same text with ANSI colours
}
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` from the context of the request being served."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class DropPydicomRecords(logging.Filter):
    """Drops pydicom's records at the handler: they quote header values (possibly patient fields), and pydicom
    resets its logger's level on first import, so setting that level once at start-up does not hold."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "pydicom" or record.name.startswith("pydicom."))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in payload:
                payload[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            payload["exc_type"] = record.exc_info[0].__name__  # the type only: messages may quote input
        return json.dumps(payload, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route all logging (ours, uvicorn's, onnxruntime's Python side) to one handler on ``stream``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(DropPydicomRecords())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # python-multipart warns about malformed bodies quoting the offending bytes: client data, not ours to log.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    # pydicom logs and warns about odd header values by quoting them: they may be patient fields.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn's own handlers are not installed (log_config=None); let its records reach ours.
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
