"""Grad-CAM in closed form from the graph's CAM activations: equal to pytorch-grad-cam, checked at load, and
GET /explain computed from a prediction's stored activations without running the network again."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.batching import MicroBatcher
from service.gradcam import gradcam_maps
from service.model.bundle import (
    CARD_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    BundleError,
    LoadedBundle,
    ParityMismatch,
    load_bundle,
    ort_outputs,
    sha256_file,
    write_manifest,
)
from service.model.cam import CAM_ACTIVATIONS_NAME, ClosedFormCam, closed_form_head
from service.model.imaging import decode_image
from service.model.preprocess import PreprocessSpec, preprocess
from service.predictor import CAM_PARITY_TOL, Predictor
from service.reference_check import check_in_child
from service.settings import Settings
from service.store import InMemoryPredictionStore, StoredPrediction
from tests.fixtures.bundles import CLASSES_3, CPU
from tests.fixtures.clients import AppClient
from tests.fixtures.synthetic import xray_png, xray_unit

MiB = 1 << 20


@pytest.fixture(scope="module")
def densenet_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, untrained DenseNet-121 bundle at 64 px (its CAM layer is followed by a ReLU; 2 x 2 grid)."""
    import torch

    from service.model.backbones import build
    from service.model.bundle import write_bundle

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bundles") / "densenet"
    write_bundle(
        build("densenet121", 3),
        out,
        name="test-densenet",
        arch="densenet121",
        classes=CLASSES_3,
        spec=PreprocessSpec(64),
        cam_layer="features.norm5",
    )
    return out


def _without_cam_output(source: Path, out: Path) -> Path:
    """A copy of a bundle whose graph lacks ``cam_activations`` (as exported before it existed), re-hashed."""
    import shutil

    import onnx

    shutil.copytree(source, out)
    graph = onnx.load(str(out / ONNX_FILE))
    (kept,) = [o for o in graph.graph.output if o.name == CAM_ACTIVATIONS_NAME]
    graph.graph.output.remove(kept)
    onnx.save(graph, str(out / ONNX_FILE))
    card = json.loads((out / CARD_FILE).read_text())
    card["sha256"][ONNX_FILE] = sha256_file(out / ONNX_FILE)
    (out / CARD_FILE).write_text(json.dumps(card))
    write_manifest(out)
    return out


def _reference_maps(bundle: LoadedBundle, batch: np.ndarray, targets: list[int]) -> np.ndarray:
    assert bundle.torch_model is not None
    layer = bundle.torch_model.get_submodule(bundle.card.cam_layer)
    return gradcam_maps(bundle.torch_model, layer, batch, targets)


def _closed_form_maps(bundle: LoadedBundle, batch: np.ndarray, targets: list[int]) -> np.ndarray:
    from service.model.cam import load_head_weight

    head = closed_form_head(bundle.card.arch, bundle.card.cam_layer)
    assert head is not None
    cam = ClosedFormCam(load_head_weight(bundle.path / "weights.safetensors", head), head.relu_before_pool)
    activations = ort_outputs(bundle.session, batch, [CAM_ACTIVATIONS_NAME])[CAM_ACTIVATIONS_NAME]
    return cam.maps(activations, targets, bundle.card.input_size)


# --------------------------------------------------------------------------- the closed form


@pytest.mark.parametrize("which", ["resnet18", "densenet121"])
def test_closed_form_from_onnx_equals_pytorch_grad_cam(which: str, bundle_dir: Path, densenet_bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir if which == "resnet18" else densenet_bundle_dir, CPU)
    images = [xray_unit(seed=s, label=label) for s, label in enumerate(CLASSES_3)]
    batch = preprocess(images, bundle.card.spec)
    for targets in ([0, 1, 2], [2, 2, 0]):
        expected = _reference_maps(bundle, batch, targets)
        got = _closed_form_maps(bundle, batch, targets)
        assert got.shape == expected.shape == (3, bundle.card.input_size, bundle.card.input_size)
        assert expected.max() == pytest.approx(1.0, abs=1e-5)  # real maps, not all-zero ones
        np.testing.assert_allclose(got, expected, rtol=0.0, atol=1e-4)


def test_densenet_needs_its_relu_mask(densenet_bundle_dir: Path) -> None:
    # Without the ReLU between norm5 and the pooling (m_k = 1) the maps are visibly different: the mask matters.
    bundle = load_bundle(densenet_bundle_dir, CPU)
    batch = preprocess([xray_unit(seed=3), xray_unit(seed=4)], bundle.card.spec)
    head = closed_form_head("densenet121", "features.norm5")
    assert head is not None and head.relu_before_pool
    from service.model.cam import load_head_weight

    weight = load_head_weight(bundle.path / "weights.safetensors", head)
    activations = ort_outputs(bundle.session, batch, [CAM_ACTIVATIONS_NAME])[CAM_ACTIVATIONS_NAME]
    masked = ClosedFormCam(weight, relu_before_pool=True).raw(activations, [0, 1])
    unmasked = ClosedFormCam(weight, relu_before_pool=False).raw(activations, [0, 1])
    assert np.abs(masked - unmasked).max() > 1e-3 * np.abs(masked).max()


def test_closed_form_refuses_mismatched_input() -> None:
    cam = ClosedFormCam(np.ones((3, 4), dtype=np.float32), relu_before_pool=False)
    with pytest.raises(ValueError, match=r"Expected N x 4 x h x w activations, got shape \(1, 5, 2, 2\)"):
        cam.raw(np.ones((1, 5, 2, 2), dtype=np.float32), [0])
    with pytest.raises(ValueError, match="One target per image: 2 targets for 1 images"):
        cam.raw(np.ones((1, 4, 2, 2), dtype=np.float32), [0, 1])
    with pytest.raises(ValueError, match=r"Target class indices \[3\] outside 0..2"):
        cam.raw(np.ones((1, 4, 2, 2), dtype=np.float32), [3])
    assert closed_form_head("vgg16", "features.29") is None
    assert closed_form_head("resnet18", "layer3") is None  # only at the layer the head pools


# --------------------------------------------------------------------------- engines and the load-time check


def test_loaded_predictor_explains_in_closed_form_and_matches_the_torch_engine(
    predictor: Predictor, bundle_dir: Path
) -> None:
    assert predictor.explain_engine == "onnx"
    assert CAM_ACTIVATIONS_NAME in predictor.output_names
    torch_engine = Predictor(load_bundle(bundle_dir, CPU), CPU, explain_engine="torch")
    assert torch_engine.explain_engine == "torch" and CAM_ACTIVATIONS_NAME not in torch_engine.output_names
    image = xray_unit(seed=5)
    prediction = predictor.predict(image)
    assert prediction.activations is not None and prediction.activations.shape == (512, 3, 3)
    assert prediction.activations.dtype == np.float16  # as the store keeps them
    assert torch_engine.predict(image).activations is None
    for target in CLASSES_3:
        expected = torch_engine.heatmap(image, target)
        from_image = predictor.heatmap(image, target)
        # float16 activations: within a few 1e-3 of Grad-CAM (the float32 closed form is within 1e-4, above).
        np.testing.assert_allclose(from_image, expected, atol=5e-3)
        np.testing.assert_array_equal(predictor.heatmap(None, target, prediction.activations), from_image)


def test_the_load_time_check_refuses_a_closed_form_that_is_not_the_network(predictor: Predictor) -> None:
    assert predictor.check_cam_parity() <= CAM_PARITY_TOL
    head_weight = predictor._closed_form
    assert head_weight is not None
    swapped = Predictor(predictor.bundle, CPU)
    # The head's rows in another order: every class is explained with another class's weights.
    swapped._closed_form = ClosedFormCam(head_weight.weight[[1, 2, 0]], head_weight.relu_before_pool)
    with pytest.raises(ParityMismatch, match="closed-form Grad-CAM from cam_activations differs from Grad-CAM"):
        swapped.check_cam_parity()


def test_a_bundle_without_the_output_falls_back_to_torch_or_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    old = _without_cam_output(bundle_dir, tmp_path / "old")
    auto = Predictor.load(old, CPU)
    assert auto.explain_engine == "torch" and auto.predict(xray_unit()).activations is None
    assert auto.heatmap(xray_unit(), "Normal").shape == (96, 96)
    with pytest.raises(
        BundleError, match=r"CXR_EXPLAIN_ENGINE=onnx, but this resnet18 bundle .* has no 'cam_activations'"
    ):
        Predictor.load(old, CPU, explain_engine="onnx")


def test_explain_engine_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().explain_engine == "auto"
    monkeypatch.setenv("CXR_EXPLAIN_ENGINE", "Torch")
    assert Settings().explain_engine == "torch"
    monkeypatch.setenv("CXR_EXPLAIN_ENGINE", "tensorflow")
    with pytest.raises(ValueError, match="explain_engine"):
        Settings()


def test_readyz_says_which_engine_is_in_use(make_client: AppClient, bundle_dir: Path, tmp_path: Path) -> None:
    with make_client() as client:
        assert client.get("/readyz").json()["explain_engine"] == "onnx"
    with make_client(predictor=None, explain_engine="torch") as client:
        assert client.get("/readyz").json()["explain_engine"] == "torch"
    old = _without_cam_output(bundle_dir, tmp_path / "old")
    with make_client(predictor=None, model_dir=old, explain_engine="onnx") as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "has no 'cam_activations' output; use auto or torch" in response.json()["detail"]


# --------------------------------------------------------------------------- a cold start without torch


def _with_weights(source: Path, out: Path, change: Callable[[dict[str, np.ndarray]], None]) -> Path:
    """A copy of a bundle whose weights.safetensors was changed by ``change`` and re-hashed (card and manifest):
    consistent checksums, so only a comparison with the graph can tell."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, out)
    tensors = load_file(str(out / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(out / WEIGHTS_FILE))
    card = json.loads((out / CARD_FILE).read_text())
    card["sha256"][WEIGHTS_FILE] = sha256_file(out / WEIGHTS_FILE)
    (out / CARD_FILE).write_text(json.dumps(card))
    write_manifest(out)
    return out


def _wait_for_reference_check(client: Any, timeout_s: float = 120.0) -> Any:
    """/readyz once the background reference check has finished (passed: 200; failed: 503)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/readyz")
        if response.status_code != 200 or response.json()["reference_check"] != "pending":
            return response
        assert time.monotonic() < deadline, "the reference check did not finish"
        time.sleep(0.05)


def test_a_deferred_reference_serves_the_same_answers_and_verifies_later(
    bundle_dir: Path, predictor: Predictor
) -> None:
    deferred = Predictor.load(bundle_dir, CPU, defer_reference=True)
    assert deferred.reference_check == "pending" and deferred.bundle.torch_model is None
    assert deferred.check_closed_form_head() <= 1e-4
    image = xray_unit(seed=3)
    served, reference = deferred.predict(image), predictor.predict(image)
    assert served.probabilities == pytest.approx(reference.probabilities, abs=1e-6)
    np.testing.assert_array_equal(deferred.heatmap(image, "Normal"), predictor.heatmap(image, "Normal"))
    deferred.verify_reference()
    assert deferred.reference_check == "passed" and deferred.bundle.torch_model is not None
    assert deferred.bundle.parity_max_abs_diff is not None and deferred.bundle.parity_max_abs_diff < 1e-3
    assert predictor.reference_check == "passed"  # Predictor.load without deferral checks at once


def test_the_reference_check_in_a_child_passes_refuses_another_digest_and_stops(bundle_dir: Path) -> None:
    import threading

    served = Predictor.load(bundle_dir, CPU, defer_reference=True)
    passed = check_in_child(bundle_dir, CPU, served.bundle.digest)
    assert passed is not None and passed.passed and passed.reason == ""
    assert passed.parity_max_abs_diff is not None and passed.parity_max_abs_diff < 1e-3
    other = check_in_child(bundle_dir, CPU, "0" * 64)  # the files on disk are not the ones served
    assert other is not None and not other.passed
    assert "its files changed after the server loaded them" in other.reason and str(bundle_dir) not in other.reason
    stop = threading.Event()
    stop.set()  # a shutdown: the child is killed, nothing is recorded
    started = time.monotonic()
    assert check_in_child(bundle_dir, CPU, served.bundle.digest, stop) is None
    assert time.monotonic() - started < 5.0


def test_torch_engine_never_defers_its_reference(bundle_dir: Path) -> None:
    torch_engine = Predictor.load(bundle_dir, CPU, explain_engine="torch", defer_reference=True)
    assert torch_engine.reference_check == "passed" and torch_engine.bundle.torch_model is not None


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda t: t.update({"fc.weight": t["fc.weight"][[1, 2, 0]]}), id="head rows swapped"),
        pytest.param(lambda t: t.update({"fc.bias": t["fc.bias"] + 1.0}), id="bias shifted"),
    ],
)
def test_the_head_check_refuses_head_weights_that_are_not_the_graphs(
    bundle_dir: Path, tmp_path: Path, change: Callable[[dict[str, np.ndarray]], None]
) -> None:
    copy = _with_weights(bundle_dir, tmp_path / "other-head", change)
    with pytest.raises(ParityMismatch, match="logits differ from what its cam_activations and the head in weights"):
        Predictor.load(copy, CPU, defer_reference=True)  # before any torch: the closed form would use these


def test_a_failed_background_reference_check_withdraws_the_model(
    make_client: AppClient, bundle_dir: Path, tmp_path: Path
) -> None:
    # The head is the graph's (the head check passes), the backbone is not: only the torch reference can tell.
    copy = _with_weights(
        bundle_dir, tmp_path / "other-backbone", lambda t: t.update({"conv1.weight": -t["conv1.weight"]})
    )
    with make_client(predictor=None, model_dir=copy) as client:
        assert client.get("/readyz").status_code in (200, 503)  # ready at once, or the check already failed
        response = _wait_for_reference_check(client)
        assert response.status_code == 503
        assert "model.onnx and weights.safetensors disagree: max logit difference" in response.json()["detail"]
        refused = client.post("/predict", files={"file": ("x.png", xray_png(), "image/png")})
        assert refused.status_code == 503 and "disagree" in refused.json()["detail"]
    with make_client(predictor=None, model_dir=copy, reference_check="startup") as client:
        response = client.get("/readyz")  # never ready: checked before
        assert response.status_code == 503 and "disagree: max logit difference" in response.json()["detail"]


def test_readyz_reports_the_reference_check(make_client: AppClient) -> None:
    with make_client(predictor=None) as client:
        first = client.get("/readyz").json()
        assert first["reference_check"] in ("pending", "passed")
        assert _wait_for_reference_check(client).json()["reference_check"] == "passed"
    with make_client(predictor=None, reference_check="startup") as client:
        assert client.get("/readyz").json()["reference_check"] == "passed"


def test_the_onnx_engine_gets_ready_and_explains_without_importing_torch(bundle_dir: Path) -> None:
    # A fresh interpreter: the test process has imported torch long ago.
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from service.app import create_app\n"
        "from service.predictor import Predictor\n"
        f"p = Predictor.load({str(bundle_dir)!r}, ['CPUExecutionProvider'], defer_reference=True)\n"
        "p.warm_up()\n"
        "image = np.random.default_rng(0).random((120, 100), dtype=np.float32)\n"
        "prediction = p.predict(image)\n"
        "png = p.explanation(image, 'Normal', activations=prediction.activations).png\n"
        "print(p.explain_engine, p.reference_check, png[:4] == b'\\x89PNG', 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["onnx", "pending", "True", "False"]


# --------------------------------------------------------------------------- the store and the routes


def test_stored_activations_are_float16_and_count_in_the_byte_bound() -> None:
    activations = np.random.default_rng(0).random((512, 3, 3), dtype=np.float32)
    item = StoredPrediction.from_image(xray_unit(), "COVID", activations)
    assert item.activations is not None and item.activations.dtype == np.float16
    assert item.nbytes == 160 * 96 + 512 * 9 * 2
    assert StoredPrediction.from_image(xray_unit(), "COVID").nbytes == 160 * 96
    store = InMemoryPredictionStore(60.0, 10, 2 * item.nbytes)
    store.put(item)
    store.put(item)
    store.put(item)  # the first is evicted: three do not fit
    assert len(store) == 2 and store.nbytes == 2 * item.nbytes


def test_float16_activations_give_nearly_the_same_heatmap(predictor: Predictor) -> None:
    batch = preprocess(xray_unit(seed=7), predictor.card.spec)
    (full,) = ort_outputs(predictor.bundle.session, batch, [CAM_ACTIVATIONS_NAME])[CAM_ACTIVATIONS_NAME]
    np.testing.assert_allclose(
        predictor.heatmap(None, "COVID", full.astype(np.float16)), predictor.heatmap(None, "COVID", full), atol=5e-3
    )


class _CountingSession:
    """The real ORT session, counting its runs (what is under test is the route, not the session)."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.runs = 0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.runs += 1
        return self._session.run(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def _png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_get_explain_runs_no_network_and_post_explain_runs_one(make_client: AppClient, bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir, CPU, with_torch=False)  # no torch copy at all: it cannot be what explains
    session = _CountingSession(bundle.session)
    bundle.session = session
    predictor = Predictor(bundle, CPU)
    torch_engine = Predictor(load_bundle(bundle_dir, CPU), CPU, explain_engine="torch")
    data = xray_png()
    gray = decode_image(data).array
    with make_client(predictor=predictor, batch_max_size=1) as client:
        session.runs = 0
        body = client.post("/predict", files={"file": ("x.png", data, "image/png")}).json()
        assert session.runs == 1
        for params in ({}, {"layer": "heatmap"}, {"layer": "heatmap", "target": "Normal"}, {"layer": "image"}):
            response = client.get("/explain", params={"id": body["id"], **params})
            assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert session.runs == 1  # every class's heatmap came from the stored activations
        heatmap = client.get("/explain", params={"id": body["id"], "layer": "heatmap", "target": "Normal"})
        posted = client.post(
            "/explain", params={"layer": "heatmap", "target": "Normal"}, files={"file": ("x.png", data, "image/png")}
        )
        assert session.runs == 2  # one forward for the upload: gate, label and activations together
    from service.gradcam import overlay
    from service.gradcam import png_bytes as encode_png

    reference = _png_array(encode_png(overlay(gray, torch_engine.heatmap(gray, "Normal"), 1.0, 1024)))
    for got in (_png_array(heatmap.content), _png_array(posted.content)):
        assert got.shape == reference.shape == (96, 160, 3)
        assert np.abs(got - reference).max() <= 8  # a colour-map step at most (float16 activations)
        assert np.abs(got - reference).mean() < 0.5


def test_predict_through_the_batcher_keeps_the_activations(make_client: AppClient, predictor: Predictor) -> None:
    data = xray_png(seed=2)
    with make_client(batch_max_size=8) as client:  # batching is off by default (CPU)
        batcher = client.app.state.service.batcher
        assert isinstance(batcher, MicroBatcher)
        prediction_id = client.post("/predict", files={"file": ("x.png", data, "image/png")}).json()["id"]
        item = client.app.state.service.store.get(prediction_id)
    expected = predictor.predict(decode_image(data)).activations
    assert item.activations is not None and expected is not None
    np.testing.assert_allclose(item.activations.astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert batcher.images_run == 1


def test_settings_leave_room_for_the_activations() -> None:
    with pytest.raises(ValueError, match="and its CAM activations"):
        Settings(max_pixels=1_000_000, store_max_bytes=2_000_000)
    assert Settings(max_pixels=1_000_000, store_max_bytes=2_000_000 + 4 * MiB).store_max_bytes > 0
