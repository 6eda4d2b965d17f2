"""The bounded prediction store: ids, TTL, item and byte bounds (oldest first), compaction, thread safety."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from service.errors import PredictionNotFound
from service.store import InMemoryPredictionStore, StoredPrediction
from tests.fixtures.clock import FakeClock


def item(nbytes: int = 100, label: str = "COVID") -> StoredPrediction:
    return StoredPrediction(label, np.zeros(nbytes, dtype=np.uint8))


def make_store(
    clock: FakeClock | None = None,
    *,
    ttl_s: float = 60.0,
    max_items: int = 10,
    max_bytes: int = 10_000,
) -> InMemoryPredictionStore:
    return InMemoryPredictionStore(ttl_s, max_items, max_bytes, clock=clock or FakeClock(1000.0))


def test_put_returns_unguessable_url_safe_ids_and_get_returns_the_item() -> None:
    store = make_store()
    stored = item(label="Normal")
    ids = {store.put(stored) for _ in range(5)}
    assert len(ids) == 5
    for prediction_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", prediction_id)  # 16 random bytes, base64url
        assert store.get(prediction_id) is stored


def test_unknown_id_raises_not_found_with_message() -> None:
    with pytest.raises(PredictionNotFound) as raised:
        make_store().get("nope")
    assert raised.value.detail == (
        "No prediction with this id: it is unknown or has expired (predictions are kept for 60 s). "
        "Send the image to POST /predict again, or use POST /explain."
    )
    assert raised.value.status_code == 404 and raised.value.code == "unknown_id"


def test_items_expire_after_the_ttl() -> None:
    clock = FakeClock(1000.0)
    store = make_store(clock, ttl_s=60)
    first = store.put(item())
    clock.now += 30
    second = store.put(item())
    clock.now += 29.9
    assert store.get(first) and store.get(second)
    clock.now += 0.1  # first is exactly 60 s old
    with pytest.raises(PredictionNotFound):
        store.get(first)
    assert store.get(second)
    assert len(store) == 1 and store.nbytes == 100
    clock.now += 30
    assert len(store) == 0 and store.nbytes == 0


def test_item_bound_evicts_oldest_first() -> None:
    store = make_store(max_items=3)
    ids = [store.put(item()) for _ in range(5)]
    assert len(store) == 3
    for old in ids[:2]:
        with pytest.raises(PredictionNotFound):
            store.get(old)
    assert all(store.get(i) for i in ids[2:])


def test_byte_bound_evicts_oldest_until_the_new_item_fits() -> None:
    store = make_store(max_bytes=1000)
    small = [store.put(item(300)) for _ in range(3)]  # 900 bytes
    big = store.put(item(500))  # needs the two oldest gone
    assert store.nbytes == 800
    with pytest.raises(PredictionNotFound):
        store.get(small[0])
    with pytest.raises(PredictionNotFound):
        store.get(small[1])
    assert store.get(small[2]) and store.get(big)


def test_an_item_larger_than_the_whole_store_is_refused() -> None:
    store = make_store(max_bytes=1000)
    kept = store.put(item(10))
    with pytest.raises(ValueError, match="never fits"):
        store.put(item(1001))
    assert store.get(kept)  # nothing was evicted for it


@pytest.mark.parametrize(("ttl_s", "max_items", "max_bytes"), [(0, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_bounds_must_be_positive(ttl_s: float, max_items: int, max_bytes: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        InMemoryPredictionStore(ttl_s, max_items, max_bytes)


def test_eight_bit_images_are_kept_exactly_as_uint8() -> None:
    pixels = np.arange(256, dtype=np.float64).reshape(16, 16) / 255.0  # how decoders make 8-bit data
    stored = StoredPrediction.from_image(pixels.astype(np.float32), "COVID")
    assert stored.pixels.dtype == np.uint8 and stored.nbytes == 256
    np.testing.assert_allclose(stored.image(), pixels, atol=1e-6)


def test_high_bit_depth_images_are_kept_as_float16() -> None:
    pixels = (np.arange(4096, dtype=np.float64).reshape(64, 64) / 4095.0).astype(np.float32)  # 12-bit
    stored = StoredPrediction.from_image(pixels, "Normal")
    assert stored.pixels.dtype == np.float16 and stored.nbytes == 2 * pixels.size
    restored = stored.image()
    assert restored.dtype == np.float32
    np.testing.assert_allclose(restored, pixels, atol=5e-4)  # float16 keeps ~11 bits


def test_concurrent_puts_keep_the_bounds_and_the_byte_count() -> None:
    store = InMemoryPredictionStore(ttl_s=60, max_items=50, max_bytes=10**9)
    ids: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [store.put(item(10)) for _ in range(200)]
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 800
    assert len(store) == 50 and store.nbytes == 500
