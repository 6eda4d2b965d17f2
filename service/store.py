"""A bounded store of recent predictions, so ``GET /explain?id=...`` can explain an image sent earlier.

It keeps what Grad-CAM and the overlay need, the decoded grayscale image (compacted) and the predicted label,
never the uploaded bytes (a DICOM file carries patient fields). :class:`PredictionStore` is the interface;
:class:`InMemoryPredictionStore` is the default backend (per process: one worker only);
:class:`~service.store_redis.RedisPredictionStore` is shared by every process that points at the same Redis.
:func:`open_store` picks one from ``CXR_STORE_URL``.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.errors import PredictionNotFound

# 16 random bytes: 128 bits, unguessable; URL-safe so it goes into explain_url as is.
ID_BYTES = 16


@dataclass(frozen=True)
class StoredPrediction:
    """One prediction kept for /explain: the image (uint8 when that is exact, else float16) and its label.

    ``activations``: the network's CAM-layer activations of this image (K x h x w float16), when the service
    explains in closed form; GET /explain then computes the heatmap of any class from them, without the network.
    """

    label: str
    pixels: np.ndarray
    activations: np.ndarray | None = None

    @classmethod
    def from_image(
        cls,
        image: np.ndarray,
        label: str,
        activations: np.ndarray | None = None,
        levels: np.ndarray | None = None,
    ) -> StoredPrediction:
        """Compact a 2-D float32 [0, 1] image: uint8 if it is exactly 8-bit (most PNG/JPEG), else float16;
        ``activations`` are kept as float16 (their heatmap differs from float32's by about 1e-3). ``levels``:
        the decoder's 8-bit levels of ``image`` (``DecodedImage.levels``), kept as they are, without a check."""
        kept = None if activations is None else np.asarray(activations, dtype=np.float16)
        if levels is not None:
            return cls(label, np.asarray(levels, dtype=np.uint8), kept)
        # Without the decoder's levels (16-bit, DICOM, other callers) find out: two float32 temporaries and
        # in-place passes (np.allclose took 12 ms on a 1024 px image).
        scaled = np.multiply(image, np.float32(255.0), dtype=np.float32)
        rounded = np.rint(scaled)
        np.clip(rounded, 0.0, 255.0, out=rounded)
        residual = np.abs(np.subtract(scaled, rounded, out=scaled), out=scaled)
        # A tolerance, not equality: decoders may scale by 1/255 or divide by 255 (1 ulp apart).
        if residual.size == 0 or float(residual.max()) <= 255.0 * 1e-6:
            return cls(label, rounded.astype(np.uint8), kept)
        return cls(label, image.astype(np.float16), kept)

    def image(self) -> np.ndarray:
        """The image back as 2-D float32 in [0, 1]."""
        if self.pixels.dtype == np.uint8:
            return self.pixels.astype(np.float32) / np.float32(255.0)
        return self.pixels.astype(np.float32)

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes) + (0 if self.activations is None else int(self.activations.nbytes))


class PredictionStore(Protocol):
    """Where predictions wait for /explain. Implementations are thread-safe."""

    # True when every method answers from this process's memory, never over the network: /readyz and /metrics
    # then call it on the event loop instead of taking a worker thread, which under load waits behind model work.
    in_process: bool

    def put(self, item: StoredPrediction) -> str:
        """Keep ``item`` and return its new unguessable id."""
        ...

    def get(self, prediction_id: str) -> StoredPrediction:
        """The item with this id; raises PredictionNotFound if it is unknown or has expired."""
        ...

    def unavailable_reason(self) -> str | None:
        """None when the store can be used now, else a sentence saying why not (for /readyz)."""
        ...

    def close(self) -> None:
        """Release connections (at shutdown)."""
        ...

    def __len__(self) -> int:
        """Items held now."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of image data held now."""
        ...


def prediction_not_found(ttl_s: float) -> PredictionNotFound:
    """The 404 of every backend for an unknown or expired id."""
    return PredictionNotFound(
        f"No prediction with this id: it is unknown or has expired (predictions are kept for "
        f"{ttl_s:g} s). Send the image to POST /predict again, or use POST /explain."
    )


def open_store(url: str, ttl_s: float, max_items: int, max_bytes: int) -> PredictionStore:
    """``memory://``: this process's own store; ``redis://host:port/db`` (or ``rediss://``, ``unix://``): shared."""
    if url == "memory://":
        return InMemoryPredictionStore(ttl_s, max_items, max_bytes)
    from service.store_redis import RedisPredictionStore  # redis-py is only imported when it is used

    return RedisPredictionStore(url, ttl_s, max_items, max_bytes)


class InMemoryPredictionStore:
    """A dict with a TTL and item/byte bounds; when full, the oldest entries are evicted first."""

    in_process = True

    def __init__(
        self,
        ttl_s: float,
        max_items: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_items < 1 or max_bytes < 1:
            raise ValueError("ttl_s, max_items and max_bytes must be positive.")
        self.ttl_s = ttl_s
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, StoredPrediction]] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, item: StoredPrediction) -> str:
        """Keep ``item`` (evicting expired, then oldest entries to make room) and return its id."""
        if item.nbytes > self.max_bytes:
            raise ValueError(f"An item of {item.nbytes} bytes never fits a store of {self.max_bytes} bytes.")
        prediction_id = secrets.token_urlsafe(ID_BYTES)
        with self._lock:
            now = self._clock()
            self._drop_expired(now)
            while self._items and (len(self._items) >= self.max_items or self._bytes + item.nbytes > self.max_bytes):
                self._pop_oldest()
            self._items[prediction_id] = (now + self.ttl_s, item)
            self._bytes += item.nbytes
        return prediction_id

    def get(self, prediction_id: str) -> StoredPrediction:
        """The item with this id; raises PredictionNotFound if it is unknown or has expired."""
        with self._lock:
            self._drop_expired(self._clock())
            entry = self._items.get(prediction_id)
        if entry is None:
            raise prediction_not_found(self.ttl_s)
        return entry[1]

    def unavailable_reason(self) -> str | None:
        """Always None: memory is always there."""
        return None

    def close(self) -> None:
        """Nothing to release."""

    def __len__(self) -> int:
        with self._lock:
            self._drop_expired(self._clock())
            return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes of image data held now."""
        with self._lock:
            self._drop_expired(self._clock())
            return self._bytes

    def _drop_expired(self, now: float) -> None:
        # Entries are in insertion order and share one TTL, so the expired ones are at the front.
        while self._items:
            expires_at, _ = next(iter(self._items.values()))
            if expires_at > now:
                break
            self._pop_oldest()

    def _pop_oldest(self) -> None:
        _, (_, item) = self._items.popitem(last=False)
        self._bytes -= item.nbytes
