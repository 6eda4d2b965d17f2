"""The micro-batcher: concurrent images in one network run, a lone caller never waits, a bounded queue (503),
the gate and the outputs per image kept, and the real app batching concurrent POST /predict requests."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from service.batching import MicroBatcher
from service.errors import NotAChestXray, Overloaded
from service.model.bundle import OUTPUT_NAME
from service.model.imaging import decode_image
from service.model.preprocess import preprocess
from service.predictor import Predictor
from tests.fixtures.bundles import CLASSES_3, CPU
from tests.fixtures.clients import AppClient
from tests.fixtures.synthetic import make_xray, xray_png, xray_unit


class _Recorded:
    """A real forward (the predictor's), recording the batch sizes the batcher ran."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.sizes.append(len(batch))
        return self.predictor.forward(batch)


def _batch(predictor: Predictor, seed: int) -> np.ndarray:
    return preprocess(xray_unit(seed=seed, label=CLASSES_3[seed % 3]), predictor.card.spec)


def test_concurrent_images_share_runs_and_each_gets_its_own_rows(predictor: Predictor) -> None:
    forward = _Recorded(predictor)
    batcher = MicroBatcher(forward, max_batch=4, max_wait_s=0.5, max_queue=16)
    batcher.start()
    reservations = [batcher.reserve() for _ in range(8)]  # all 8 "being decoded" before any is submitted
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: reservations[i](_batch(predictor, i)), range(8)))
    finally:
        batcher.close()
    assert sum(forward.sizes) == 8 and max(forward.sizes) <= 4 and len(forward.sizes) < 8
    assert (batcher.batches_run, batcher.images_run) == (len(forward.sizes), 8)
    for i, outputs in enumerate(results):
        alone = predictor.forward(_batch(predictor, i))
        assert outputs.keys() == alone.keys()
        for name in alone:
            assert outputs[name].shape == alone[name].shape
            np.testing.assert_allclose(outputs[name], alone[name], rtol=1e-4, atol=1e-5)


def test_a_lone_caller_never_waits_for_the_max_wait(predictor: Predictor) -> None:
    forward = _Recorded(predictor)
    batcher = MicroBatcher(forward, max_batch=8, max_wait_s=30.0, max_queue=8)
    batcher.start()
    try:
        for seed in range(3):
            start = time.monotonic()
            with batcher.reserve() as reservation:
                reservation(_batch(predictor, seed))
            assert time.monotonic() - start < 10.0  # nothing else reserved: it ran at once, not after 30 s
    finally:
        batcher.close()
    assert forward.sizes == [1, 1, 1]


def test_a_batch_waits_for_reserved_images_and_not_for_released_ones(predictor: Predictor) -> None:
    forward = _Recorded(predictor)
    batcher = MicroBatcher(forward, max_batch=8, max_wait_s=30.0, max_queue=8)
    batcher.start()
    try:
        late = batcher.reserve()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(lambda: batcher.reserve()(_batch(predictor, 0)))
            time.sleep(0.3)  # the first image waits: another one is reserved
            assert not first.done()
            late(_batch(predictor, 1))
            first.result(timeout=10)
        assert forward.sizes == [2]
        # A reservation given back unused (e.g. an undecodable upload) stops the wait at once.
        unused = batcher.reserve()
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(lambda: batcher.reserve()(_batch(predictor, 2)))
            time.sleep(0.3)
            with unused:
                pass
            second.result(timeout=10)
        assert forward.sizes == [2, 1]
    finally:
        batcher.close()


def test_a_full_queue_refuses_before_any_work(predictor: Predictor) -> None:
    batcher = MicroBatcher(predictor.forward, max_batch=2, max_wait_s=0.0, max_queue=2)
    batcher.start()
    try:
        held = [batcher.reserve(), batcher.reserve()]
        with pytest.raises(Overloaded, match=r"Too many images are waiting for the model \(2\)") as refused:
            batcher.reserve()
        assert refused.value.retry_after_s == 1.0
        with held[0]:
            pass
        with batcher.reserve() as reservation:  # a place came free
            assert reservation(_batch(predictor, 0))[OUTPUT_NAME].shape == (1, 3)
        with held[1]:
            pass
    finally:
        batcher.close()
    with pytest.raises(Overloaded, match="shutting down"):
        batcher.reserve()


def test_an_error_in_the_network_reaches_every_caller_and_the_batcher_keeps_serving(predictor: Predictor) -> None:
    def forward(batch: np.ndarray) -> dict[str, np.ndarray]:
        if batch.shape[-1] != predictor.card.input_size:
            raise ValueError("wrong input size")
        return predictor.forward(batch)

    batcher = MicroBatcher(forward, max_batch=4, max_wait_s=1.0, max_queue=4)
    batcher.start()
    try:
        with pytest.raises(ValueError, match="wrong input size"):
            batcher.reserve()(np.zeros((1, 3, 8, 8), dtype=np.float32))
        assert batcher.reserve()(_batch(predictor, 0))[OUTPUT_NAME].shape == (1, 3)
    finally:
        batcher.close()


def test_close_runs_what_is_reserved(predictor: Predictor) -> None:
    batcher = MicroBatcher(predictor.forward, max_batch=4, max_wait_s=0.0, max_queue=4)
    batcher.start()
    reservation = batcher.reserve()
    closer = threading.Thread(target=batcher.close)
    closer.start()
    assert reservation(_batch(predictor, 0))[OUTPUT_NAME].shape == (1, 3)
    closer.join(timeout=10)
    assert not closer.is_alive()


def test_the_gate_refuses_one_image_of_a_batch_and_passes_the_others(
    tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path
) -> None:
    from training.gate import fit_bundle_gate

    rng = np.random.default_rng(10)
    xrays = [make_xray(CLASSES_3[i % 3], 96, rng).astype(np.float32) / 255.0 for i in range(150)]
    out = tmp_path_factory.mktemp("gated") / "bundle"
    shutil.copytree(bundle_dir, out)
    fit_bundle_gate(out, xrays[:120], xrays[120:], seed=0, fit_labels=[i % 3 for i in range(120)])
    gated = Predictor.load(out, CPU)
    assert gated.gate_active
    not_an_xray = np.random.default_rng(1).random((96, 96)).astype(np.float32)  # noise
    images = [xray_unit(seed=1), not_an_xray, xray_unit(seed=2, label="Normal")]
    batcher = MicroBatcher(gated.forward, max_batch=4, max_wait_s=1.0, max_queue=4)
    batcher.start()
    reservations = [batcher.reserve() for _ in images]

    def predict(i: int) -> object:
        try:
            return gated.predict(images[i], forward=reservations[i])
        except NotAChestXray as err:
            return err

    try:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(predict, range(3)))
    finally:
        batcher.close()
    assert batcher.batches_run == 1 and batcher.images_run == 3
    assert isinstance(results[1], NotAChestXray) and results[1].score is not None
    for i in (0, 2):
        alone = gated.predict(images[i])
        assert not isinstance(results[i], Exception)
        assert results[i].probabilities == pytest.approx(alone.probabilities, abs=1e-5)  # type: ignore[attr-defined]
        assert results[i].gate_score == pytest.approx(alone.gate_score, rel=1e-4)  # type: ignore[attr-defined]


def test_concurrent_predict_requests_are_answered_like_single_ones(
    make_client: AppClient, predictor: Predictor
) -> None:
    uploads = [xray_png(seed=s, label=CLASSES_3[s % 3]) for s in range(8)]
    with make_client(batch_max_size=8, batch_max_wait_ms=20.0) as client:
        batcher = client.app.state.service.batcher

        def post(data: bytes) -> dict[str, object]:
            response = client.post("/predict", files={"file": ("x.png", data, "image/png")})
            assert response.status_code == 200
            return dict(response.json())

        with ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(post, uploads))
        assert batcher.images_run == 8
    for data, body in zip(uploads, bodies, strict=True):
        alone = predictor.predict(decode_image(data))
        assert body["label"] == alone.label
        assert body["probabilities"] == pytest.approx(alone.probabilities, abs=1e-5)


def test_a_full_queue_is_a_503_with_retry_after(make_client: AppClient) -> None:
    with make_client(batch_max_size=4, batch_max_queue=1) as client:
        held = client.app.state.service.batcher.reserve()
        with held:
            response = client.post("/predict", files={"file": ("x.png", xray_png(), "image/png")})
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert response.json() == {
            "detail": "Too many images are waiting for the model (1); try again in a moment.",
            "code": "overloaded",
        }
        assert client.post("/predict", files={"file": ("x.png", xray_png(), "image/png")}).status_code == 200
        # An undecodable upload gives its place back: the next request is not refused.
        assert client.post("/predict", files={"file": ("x.png", b"not an image", "image/png")}).status_code == 415
        assert client.post("/predict", files={"file": ("x.png", xray_png(), "image/png")}).status_code == 200


def test_batching_off_runs_without_a_batcher(make_client: AppClient) -> None:
    with make_client(batch_max_size=1) as client:
        assert client.app.state.service.batcher is None
        assert client.post("/predict", files={"file": ("x.png", xray_png(), "image/png")}).status_code == 200
