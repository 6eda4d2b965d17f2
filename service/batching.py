"""Micro-batching: images of concurrent /predict requests run through the network as one ORT batch.

A request *reserves* a place before its image is decoded: the bound on waiting images is enforced before any
work is done (``Overloaded``: 503 + Retry-After when full), and the batcher knows how many images are on their
way. One thread runs the network. It takes whatever is queued as soon as the network is free, and waits for
more (at most ``max_wait_s``) only while reserved images are still being decoded and the batch is not full,
so a lone client never waits: its image runs the moment it arrives. Under load, images that arrive while a
batch runs form the next one.

Every request still gets its own outputs (the rows of the batch that are its), so the gate and the CAM
activations work as without batching.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

from service.errors import Overloaded

logger = logging.getLogger(__name__)

Forward = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass
class _Job:
    batch: np.ndarray
    result: Future[dict[str, np.ndarray]] = field(default_factory=Future)


class MicroBatcher:
    """Runs ``forward`` on batches gathered from concurrent callers; start with :meth:`start`, stop with :meth:`close`.

    ``max_batch``: most images per run; ``max_wait_s``: longest a batch waits for reserved images;
    ``max_queue``: most images reserved or queued at once (the running batch not counted).
    """

    def __init__(self, forward: Forward, *, max_batch: int, max_wait_s: float, max_queue: int) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be at least 1, max_wait_s not negative.")
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.batches_run = 0
        self.images_run = 0
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._reserved = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread that runs the network."""
        if self._thread is not None:
            raise RuntimeError("The batcher is already started.")
        self._thread = threading.Thread(target=self._run, name="cxr-micro-batcher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Refuse new reservations, run what is queued or reserved, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def reserve(self) -> Reservation:
        """A place for one image (or batch) to come; ``Overloaded`` when ``max_queue`` are already waiting."""
        with self._cond:
            if self._closed:
                raise Overloaded("The service is shutting down; send the image again.", retry_after_s=1.0)
            if self._reserved + len(self._queue) >= self.max_queue:
                raise Overloaded(
                    f"Too many images are waiting for the model ({self.max_queue}); try again in a moment.",
                    retry_after_s=1.0,
                )
            self._reserved += 1
        return Reservation(self)

    def _submit(self, batch: np.ndarray) -> _Job:
        job = _Job(batch)
        with self._cond:
            self._reserved -= 1
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def _release(self) -> None:
        with self._cond:
            self._reserved -= 1
            self._cond.notify_all()  # the batcher may be waiting for this image

    def _next_jobs(self) -> list[_Job]:
        """Wait for work; then the jobs of the next batch (empty once closed and drained)."""
        with self._cond:
            while not self._queue and not (self._closed and self._reserved == 0):
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait_s
            while not self._closed and self._reserved > 0 and self._rows(self._queue) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    break
            jobs: list[_Job] = []
            while self._queue and (not jobs or self._rows(jobs) + len(self._queue[0].batch) <= self.max_batch):
                jobs.append(self._queue.pop(0))
            return jobs

    @staticmethod
    def _rows(jobs: list[_Job]) -> int:
        return sum(len(job.batch) for job in jobs)

    def _run(self) -> None:
        while jobs := self._next_jobs():
            try:
                batch = jobs[0].batch if len(jobs) == 1 else np.concatenate([job.batch for job in jobs])
                outputs = self.forward(batch)
            except Exception as err:  # every request of the batch gets the error; the thread keeps serving
                logger.exception("a batch of %d image(s) failed in the network", len(jobs))
                for job in jobs:
                    job.result.set_exception(err)
                continue
            self.batches_run += 1
            self.images_run += len(batch)
            start = 0
            for job in jobs:
                stop = start + len(job.batch)
                job.result.set_result({name: array[start:stop] for name, array in outputs.items()})
                start = stop


class Reservation:
    """One reserved place: call it once with the batch (it blocks until its rows are computed), or leave the
    ``with`` block without calling it (a refused or undecodable image) to give the place back."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher = batcher
        self._used = False

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._used:
            raise RuntimeError("A reservation runs one batch.")
        self._used = True
        return self._batcher._submit(batch).result.result()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if not self._used:
            self._used = True
            self._batcher._release()
