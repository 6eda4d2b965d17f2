"""Admission control for CPU-heavy work (decode, predict, explain): a concurrency limit with a bounded queue.

A request's heavy part runs inside ``async with limiter.slot():``. At most ``max_active`` run at once, at
most ``max_waiting`` more wait for a slot (in the event loop: a waiting request holds no worker thread and
has not read its upload into memory yet), and beyond that the request is refused at once with
:class:`~service.errors.Overloaded` (503 + ``Retry-After``). So the memory of heavy work has a ceiling,
``max_active`` times what one request may allocate, and health routes, which never take a slot, answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from service.errors import Overloaded

DEFAULT_MAX_ACTIVE = 4
DEFAULT_MAX_WAITING = 32


class WorkLimiter:
    """At most ``max_active`` slots held at once and ``max_waiting`` requests waiting for one."""

    def __init__(
        self, max_active: int = DEFAULT_MAX_ACTIVE, max_waiting: int = DEFAULT_MAX_WAITING, retry_after_s: float = 1.0
    ) -> None:
        if max_active < 1 or max_waiting < 0:
            raise ValueError("max_active must be at least 1 and max_waiting at least 0")
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self._slots = anyio.Semaphore(max_active)
        self.waiting = 0

    @property
    def active(self) -> int:
        """Slots held right now."""
        return self.max_active - self._slots.value

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the block; raises Overloaded when none is free and the queue is full."""
        if self._slots.value == 0 and self.waiting >= self.max_waiting:
            raise Overloaded(
                f"The service is busy ({self.active} images in analysis, {self.waiting} waiting); "
                "try again in a moment.",
                retry_after_s=self.retry_after_s,
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()
