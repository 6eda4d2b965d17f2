"""The bounded prediction store: one set of conformance tests run on both backends (in memory and a real Redis
server), then what only one of them has (the in-memory clock boundary, the Redis codec and outage)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis

from service.errors import NotReady, PredictionNotFound
from service.model.imaging import decode_image
from service.store import InMemoryPredictionStore, PredictionStore, StoredPrediction, open_store
from service.store_redis import RedisPredictionStore, decode_prediction, encode_prediction
from tests.fixtures.clock import FakeClock
from tests.fixtures.images import dicom_bytes, jpeg_bytes, palette_png_bytes, png_bytes
from tests.fixtures.redis_server import RedisServer, running_redis

BACKENDS = ["memory", "redis"]


def item(nbytes: int = 100, label: str = "COVID") -> StoredPrediction:
    return StoredPrediction(label, np.arange(nbytes, dtype=np.uint8))


def assert_same(got: StoredPrediction, expected: StoredPrediction) -> None:
    assert got.label == expected.label
    assert got.pixels.dtype == expected.pixels.dtype
    np.testing.assert_array_equal(got.pixels, expected.pixels)


@dataclass
class Backend:
    """Makes stores of one kind and makes time pass for them (by hand in memory, for real on Redis)."""

    name: str
    make: Callable[..., InMemoryPredictionStore | RedisPredictionStore]
    pass_time: Callable[[float], None]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        clock = FakeClock(1000.0)

        def advance(seconds: float) -> None:
            clock.now += seconds

        def make_memory(ttl_s: float = 60.0, max_items: int = 10, max_bytes: int = 10_000) -> InMemoryPredictionStore:
            return InMemoryPredictionStore(ttl_s, max_items, max_bytes, clock=clock)

        yield Backend("memory", make_memory, advance)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    server.flush()
    made: list[RedisPredictionStore] = []

    def make_redis(ttl_s: float = 60.0, max_items: int = 10, max_bytes: int = 10_000) -> RedisPredictionStore:
        made.append(RedisPredictionStore(server.url, ttl_s, max_items, max_bytes))
        return made[-1]

    yield Backend("redis", make_redis, time.sleep)
    for store in made:
        store.close()


# --------------------------------------------------------------------------- conformance (both backends)


def test_put_returns_unguessable_url_safe_ids_and_get_returns_the_item(backend: Backend) -> None:
    store = backend.make()
    stored = item(label="Normal")
    ids = {store.put(stored) for _ in range(5)}
    assert len(ids) == 5
    for prediction_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", prediction_id)  # 16 random bytes, base64url
        assert_same(store.get(prediction_id), stored)
    assert store.unavailable_reason() is None


def test_unknown_id_raises_not_found_with_message(backend: Backend) -> None:
    with pytest.raises(PredictionNotFound) as raised:
        backend.make().get("nope")
    assert raised.value.detail == (
        "No prediction with this id: it is unknown or has expired (predictions are kept for 60 s). "
        "Send the image to POST /predict again, or use POST /explain."
    )
    assert raised.value.status_code == 404 and raised.value.code == "unknown_id"


def test_items_expire_after_the_ttl(backend: Backend) -> None:
    # Seconds, not minutes: Redis expires by its own clock, so the Redis run really waits (about 1.7 s).
    store = backend.make(ttl_s=1.0)
    first = store.put(item())
    backend.pass_time(0.5)
    second = store.put(item())
    backend.pass_time(0.1)
    assert_same(store.get(first), item())
    assert_same(store.get(second), item())
    backend.pass_time(0.6)  # first is 1.2 s old, second 0.7 s
    with pytest.raises(PredictionNotFound):
        store.get(first)
    assert_same(store.get(second), item())
    assert len(store) == 1 and store.nbytes == 100
    backend.pass_time(0.5)
    assert len(store) == 0 and store.nbytes == 0


def test_item_bound_evicts_oldest_first(backend: Backend) -> None:
    store = backend.make(max_items=3)
    ids = [store.put(item()) for _ in range(5)]
    assert len(store) == 3
    for old in ids[:2]:
        with pytest.raises(PredictionNotFound):
            store.get(old)
    for kept in ids[2:]:
        assert_same(store.get(kept), item())


def test_byte_bound_evicts_oldest_until_the_new_item_fits(backend: Backend) -> None:
    store = backend.make(max_bytes=1000)
    small = [store.put(item(300)) for _ in range(3)]  # 900 bytes
    big = store.put(item(500))  # needs the two oldest gone
    assert store.nbytes == 800 and len(store) == 2
    for gone in small[:2]:
        with pytest.raises(PredictionNotFound):
            store.get(gone)
    assert_same(store.get(small[2]), item(300))
    assert_same(store.get(big), item(500))


def test_an_item_larger_than_the_whole_store_is_refused(backend: Backend) -> None:
    store = backend.make(max_bytes=1000)
    kept = store.put(item(10))
    with pytest.raises(ValueError, match="never fits"):
        store.put(item(1001))
    assert_same(store.get(kept), item(10))  # nothing was evicted for it


@pytest.mark.parametrize(("ttl_s", "max_items", "max_bytes"), [(0, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_bounds_must_be_positive(backend: Backend, ttl_s: float, max_items: int, max_bytes: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        backend.make(ttl_s=ttl_s, max_items=max_items, max_bytes=max_bytes)


def test_every_field_survives_the_store(backend: Backend) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.random((48, 40), dtype=np.float32)  # not 8-bit: kept as float16
    activations = rng.standard_normal((8, 7, 7)).astype(np.float32)
    stored = StoredPrediction.from_image(pixels, "Viral Pneumonia", activations)
    store = backend.make(max_bytes=10**6)
    got = store.get(store.put(stored))
    assert got.label == "Viral Pneumonia" and got.nbytes == stored.nbytes == 48 * 40 * 2 + 8 * 7 * 7 * 2
    assert got.pixels.dtype == np.float16 and got.activations is not None and got.activations.dtype == np.float16
    np.testing.assert_array_equal(got.pixels, stored.pixels)
    np.testing.assert_array_equal(got.activations, stored.activations)


def test_concurrent_puts_keep_the_bounds_and_the_byte_count(backend: Backend) -> None:
    store = backend.make(max_items=50, max_bytes=10**9)
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


# --------------------------------------------------------------------------- in memory only


def test_in_memory_items_expire_exactly_at_the_ttl() -> None:
    clock = FakeClock(1000.0)
    store = InMemoryPredictionStore(60, 10, 10_000, clock=clock)
    kept = store.put(item())
    clock.now += 59.9
    assert store.get(kept)
    clock.now += 0.1
    with pytest.raises(PredictionNotFound):
        store.get(kept)


@pytest.mark.parametrize(
    "scale",
    [
        pytest.param(lambda levels: levels / 255.0, id="divided by 255"),
        pytest.param(lambda levels: levels.astype(np.float32) * np.float32(1.0 / 255.0), id="times 1/255 in float32"),
    ],
)
def test_eight_bit_images_are_kept_exactly_as_uint8(scale: Callable[[np.ndarray], np.ndarray]) -> None:
    levels = np.arange(256, dtype=np.float64).reshape(16, 16)
    pixels = np.asarray(scale(levels), dtype=np.float32)  # how decoders make 8-bit data
    stored = StoredPrediction.from_image(pixels, "COVID")
    assert stored.pixels.dtype == np.uint8 and stored.nbytes == 256
    np.testing.assert_array_equal(stored.pixels, levels.astype(np.uint8))
    np.testing.assert_allclose(stored.image(), levels / 255.0, atol=1e-6)
    nudged = pixels.copy()
    nudged[3, 5] += np.float32(0.3 / 255.0)  # one pixel between two 8-bit levels: not 8-bit data
    assert StoredPrediction.from_image(nudged, "COVID").pixels.dtype == np.float16


@pytest.mark.parametrize(
    ("encode", "has_levels"),
    [
        pytest.param(lambda a: png_bytes(a), True, id="8-bit PNG"),
        pytest.param(lambda a: palette_png_bytes(a), True, id="palette PNG"),
        pytest.param(lambda a: jpeg_bytes(a), True, id="JPEG"),
        pytest.param(lambda a: png_bytes(a.astype(np.uint16) * 257), False, id="16-bit PNG"),
        pytest.param(lambda a: dicom_bytes(a.astype(np.uint16) * 16), False, id="12-bit DICOM"),
    ],
)
def test_the_decoders_8_bit_levels_are_stored_as_the_check_would_store_them(
    encode: Callable[[np.ndarray], bytes], has_levels: bool
) -> None:
    source = (np.arange(96 * 80, dtype=np.int64).reshape(96, 80) % 251).astype(np.uint8)
    image = decode_image(encode(source))
    assert (image.levels is not None) == has_levels
    checked = StoredPrediction.from_image(image.array, "COVID")
    handed = StoredPrediction.from_image(image.array, "COVID", levels=image.levels)
    assert handed.pixels.dtype == checked.pixels.dtype
    np.testing.assert_array_equal(handed.pixels, checked.pixels)
    if image.levels is not None:
        np.testing.assert_array_equal(image.array, image.levels * np.float32(1.0 / 255.0))


def test_high_bit_depth_images_are_kept_as_float16() -> None:
    pixels = (np.arange(4096, dtype=np.float64).reshape(64, 64) / 4095.0).astype(np.float32)  # 12-bit
    stored = StoredPrediction.from_image(pixels, "Normal")
    assert stored.pixels.dtype == np.float16 and stored.nbytes == 2 * pixels.size
    restored = stored.image()
    assert restored.dtype == np.float32
    np.testing.assert_allclose(restored, pixels, atol=5e-4)  # float16 keeps ~11 bits


# --------------------------------------------------------------------------- Redis only


def test_open_store_picks_the_backend_from_the_url(redis_server: RedisServer) -> None:
    assert isinstance(open_store("memory://", 60, 10, 1000), InMemoryPredictionStore)
    shared = open_store(redis_server.url, 60, 10, 1000)
    assert isinstance(shared, RedisPredictionStore) and shared.where == f"127.0.0.1:{redis_server.port}/0"
    shared.close()


def test_the_codec_keeps_raw_array_bytes_behind_a_small_header() -> None:
    stored = StoredPrediction.from_image(np.full((64, 64), 128 / 255, dtype=np.float32), "COVID")
    payload = encode_prediction(stored)
    assert stored.pixels.dtype == np.uint8
    assert len(payload) < stored.nbytes + 300  # the raw bytes plus a small header, no base64 or pickle
    assert_same(decode_prediction(payload), stored)
    assert decode_prediction(payload).activations is None


def test_two_stores_on_one_redis_share_ids_and_bounds(redis_server: RedisServer) -> None:
    redis_server.flush()
    # Two app processes in production; two clients here, each with its own connection pool.
    first = RedisPredictionStore(redis_server.url, 60, 3, 10_000)
    second = RedisPredictionStore(redis_server.url, 60, 3, 10_000)
    made_by_first = [first.put(item(label="Normal")) for _ in range(2)]
    made_by_second = [second.put(item(label="COVID")) for _ in range(2)]
    assert_same(second.get(made_by_first[1]), item(label="Normal"))
    assert_same(first.get(made_by_second[0]), item(label="COVID"))
    with pytest.raises(PredictionNotFound):
        second.get(made_by_first[0])  # the oldest of all four went when the fourth arrived
    assert len(first) == len(second) == 3
    first.close()
    second.close()


def test_every_redis_key_expires_so_an_idle_store_leaves_nothing(redis_server: RedisServer) -> None:
    redis_server.flush()
    store = RedisPredictionStore(redis_server.url, 60, 10, 10_000)
    store.put(item())
    with redis.Redis.from_url(redis_server.url) as client:
        keys = client.keys("*")
        assert len(keys) == 5  # the item, the arrival order, the sizes, their sum, the sequence
        assert all(0 < client.pttl(key) <= 60_000 for key in keys)
    store.close()


def test_redis_down_is_not_ready_with_the_reason_and_recovers_by_itself(tmp_path: Path) -> None:
    with running_redis(tmp_path) as server:
        store: PredictionStore = RedisPredictionStore(server.url, 60, 10, 10_000)
        kept = store.put(item())
        server.stop()
        reason = store.unavailable_reason()
        expected = f"The prediction store (Redis at 127.0.0.1:{server.port}/0) cannot be reached"
        assert reason is not None and reason.startswith(expected)
        for call in (lambda: store.put(item()), lambda: store.get(kept)):
            started = time.monotonic()
            with pytest.raises(NotReady) as raised:
                call()
            assert time.monotonic() - started < 5.0  # short timeouts, no long retry loop
            assert raised.value.status_code == 503 and raised.value.detail.startswith(expected)
        server.start()  # same port, empty (no persistence)
        assert store.unavailable_reason() is None
        with pytest.raises(PredictionNotFound):
            store.get(kept)
        assert_same(store.get(store.put(item(label="Normal"))), item(label="Normal"))
        store.close()


def test_the_redis_password_never_shows_in_reasons() -> None:
    store = RedisPredictionStore("redis://cxr:s3cret-pw@127.0.0.1:1/2", 60, 10, 10_000)
    assert store.where == "127.0.0.1:1/2"
    reason = store.unavailable_reason()
    assert reason is not None and "s3cret" not in reason and "cxr:" not in reason
    store.close()
