"""How ``cxr-serve`` runs uvicorn: timeouts, keep-alive and connection limits, and a header deadline.

uvicorn times out idle keep-alive connections only; a client that opens a connection and sends half a request
line (or nothing) keeps it forever. :class:`DeadlineH11Protocol` gives every request ``header_timeout_s`` to
arrive complete, from the connection (or the previous response) on, and answers a malformed request with the
service's JSON error shape instead of uvicorn's plain text. Body timeouts (idle gap, minimum rate) are ASGI
middleware (``service.middleware.UploadTimeoutMiddleware``), so they answer 408 in the same shape.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (what MALLOC_ARENA_MAX does) for this process; False where it is not glibc.

    Each worker thread otherwise gets its own arena, and freed image buffers stay in them: RSS grows in steps.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def limit_blas_threads(threads: int = 1) -> None:
    """One BLAS thread per caller for this process (numpy's OpenBLAS; the gate's matrix products).

    Requests already run in parallel worker threads and ORT has its own pool; BLAS threads on top only contend:
    the gate scores of 4 concurrent callers took 3.3 ms per image with OpenBLAS's 2 threads, 0.7 ms with 1.
    """
    import numpy  # noqa: F401  (threadpoolctl limits the libraries already loaded: numpy's BLAS first)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers and JSON 400s."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._on_header_deadline)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _on_header_deadline(self) -> None:
        self._header_deadline = None
        # Still waiting for a complete request line and headers (h11 leaves the client IDLE until then).
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info("closed a connection whose request headers did not arrive within %.0f s", self.header_timeout_s)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the headers are in: the body has its own timeouts
            self._cancel_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"detail": "The request is not valid HTTP/1.1.", "code": "bad_request"}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


def protocol_with_deadline(header_timeout_s: float) -> type[DeadlineH11Protocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with this header deadline."""
    return type("ConfiguredDeadlineH11Protocol", (DeadlineH11Protocol,), {"header_timeout_s": header_timeout_s})
