"""The "is this a chest X-ray?" gate: its maths and file, the bundle's features output, and refusals through the
service and the CLI. The gate is fitted here, on synthetic X-ray-like images, through the same
``fit_bundle_gate`` that training calls at export."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service import cli
from service.errors import NotAChestXray
from service.model.bundle import (
    FEATURES_NAME,
    OUTPUT_NAME,
    BundleError,
    ChecksumMismatch,
    load_bundle,
    ort_logits,
    ort_logits_and_features,
    read_card,
    write_card,
)
from service.model.cam import CAM_ACTIVATIONS_NAME
from service.model.gate import (
    GATE_FILE,
    FeatureDensity,
    GateError,
    GatePolicy,
    _shrunk_covariance,
    dicom_refusal,
    fit_gate,
    load_gate,
    save_gate,
)
from service.model.imaging import decode_image
from service.model.preprocess import preprocess
from service.predictor import Predictor
from tests.fixtures.bundles import CLASSES_3, CPU
from tests.fixtures.images import dicom_bytes, png_bytes
from tests.fixtures.synthetic import make_xray
from training.gate import NEGATIVE_KINDS, XRAY_KINDS, fit_bundle_gate, synthetic_negatives

REFUSAL_START = "This image does not look like a chest X-ray, so it was not classified"


def _xrays(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [make_xray(CLASSES_3[i % 3], 96, rng).astype(np.float32) / 255.0 for i in range(n)]


@pytest.fixture(scope="session")
def fit_xrays() -> list[np.ndarray]:
    return _xrays(150, seed=10)


@pytest.fixture(scope="session")
def gated_bundle_dir(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path, fit_xrays: list[np.ndarray]) -> Path:
    """A copy of the session's tiny bundle with a gate fitted on synthetic X-rays."""
    out = tmp_path_factory.mktemp("gated") / "bundle"
    shutil.copytree(bundle_dir, out)
    fit_bundle_gate(out, fit_xrays, _xrays(60, seed=11), seed=0, fit_labels=[i % 3 for i in range(150)])
    return out


@pytest.fixture(scope="session")
def gated_predictor(gated_bundle_dir: Path) -> Predictor:
    return Predictor.load(gated_bundle_dir, CPU)


def _threshold(predictor: Predictor) -> float:
    assert predictor.bundle.gate is not None
    return predictor.bundle.gate.threshold


def _junk_png(kind: str, seed: int = 0) -> bytes:
    ((_, image),) = synthetic_negatives(np.random.default_rng(seed), 1, _xrays(3, seed=99), kinds=[kind])
    return png_bytes((image * 255.0 + 0.5).astype(np.uint8))


def _cr_dicom(image: np.ndarray, **attributes: str) -> bytes:
    """A 12-bit CR DICOM of a [0, 1] image, with the given attributes (Modality, BodyPartExamined) set."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.rint(image * 4095).astype(np.uint16))))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the maths and the file


def test_shrunk_covariance_is_ledoit_wolf() -> None:
    covariance = pytest.importorskip("sklearn.covariance")
    x = np.random.default_rng(0).standard_normal((40, 25)) @ np.random.default_rng(1).standard_normal((25, 25))
    x -= x.mean(axis=0)
    expected, _ = covariance.ledoit_wolf(x, assume_centered=True)
    np.testing.assert_allclose(_shrunk_covariance(x), expected, rtol=1e-10, atol=1e-12)


def test_feature_density_distance_is_zero_at_a_class_mean_and_grows_away_from_it() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    features = np.abs(rng.normal(0, 1, (400, 8)) + np.where(labels[:, None] == 0, 1.0, 4.0)) ** 2
    density = FeatureDensity.fit(features, labels)
    root_mean = np.sqrt(features[labels == 1]).mean(axis=0)
    assert density.score(root_mean[None] ** 2)[0] == pytest.approx(0.0, abs=1e-6)
    far = (root_mean + 10 * np.sqrt(features).std(axis=0)) ** 2
    assert density.score(far[None])[0] > 5.0


def test_fit_gate_threshold_lets_the_target_share_of_calibration_images_pass() -> None:
    rng = np.random.default_rng(0)
    fit, calibration = rng.gamma(2.0, 1.0, (300, 16)), rng.gamma(2.0, 1.0, (200, 16))
    gate = fit_gate(fit, rng.integers(0, 3, 300), calibration, target_pass_rate=0.95)
    passed = np.mean(~gate.refused(calibration))
    assert 0.95 <= passed <= 0.96
    assert gate.refused(np.full((1, 16), 50.0))[0]
    with pytest.raises(ValueError, match="at least 20 calibration images"):
        fit_gate(fit, rng.integers(0, 3, 300), calibration[:10])


def test_with_sources_the_threshold_lets_the_target_share_of_every_source_pass() -> None:
    rng = np.random.default_rng(1)
    fit = rng.gamma(2.0, 1.0, (300, 16))
    near, far = rng.gamma(2.0, 1.0, (200, 16)), rng.gamma(2.0, 1.0, (40, 16)) * 1.6  # one source unlike the rest
    calibration, sources = np.vstack([near, far]), ["a"] * 200 + ["b"] * 40
    pooled = fit_gate(fit, np.zeros(300, int), calibration, 0.95)
    assert np.mean(pooled.refused(far)) > 0.05  # a pooled quantile refuses more of the odd source
    gate = fit_gate(fit, np.zeros(300, int), calibration, 0.95, calibration_sources=sources)
    assert np.mean(gate.refused(near)) <= 0.05 and np.mean(gate.refused(far)) <= 0.05
    assert gate.threshold == max(gate.info["source_thresholds"].values())
    assert gate.describe()["threshold_rule"] == "every source"
    assert gate.info["pooled_threshold"] <= gate.threshold  # the pooled quantile of the same score
    assert np.mean(gate.scores(calibration) <= gate.info["pooled_threshold"]) == pytest.approx(0.95, abs=0.005)
    few = fit_gate(fit, np.zeros(300, int), calibration, 0.95, calibration_sources=["a"] * 230 + ["c"] * 10)
    assert set(few.info["source_thresholds"]) == {"a"}  # too few images of "c" to set a quantile on
    with pytest.raises(ValueError, match="240 calibration images but 3 sources"):
        fit_gate(fit, np.zeros(300, int), calibration, 0.95, calibration_sources=["a", "b", "c"])


def test_per_class_density_refuses_what_is_typical_only_of_another_class() -> None:
    # Class 0 varies along feature 0 only, class 1 along feature 1 only. An image at class 0's mean moved along
    # feature 1 is ordinary under the shared covariance (class 1 varies there) but far under class 0's own.
    rng = np.random.default_rng(0)
    spread = np.zeros((600, 4))
    spread[:300, 0] = rng.normal(0, 1.0, 300)
    spread[300:, 1] = rng.normal(0, 1.0, 300)
    roots = 5.0 + spread + rng.normal(0, 0.05, (600, 4))
    roots[300:, 2] += 2.0  # class 1's mean is elsewhere
    features, labels = roots**2, np.repeat([0, 1], 300)
    odd = np.array([[5.0, 7.5, 5.0, 5.0]]) ** 2  # 2.5 sd of class 1 along feature 1, at class 0's mean otherwise
    shared, per_class = FeatureDensity.fit(features, labels), FeatureDensity.fit(features, labels, per_class=True)
    assert per_class.per_class and per_class.whiten.shape == (2, 4, 4) and not shared.per_class
    assert per_class.score(np.array([[5.0, 5.0, 7.0, 5.0]]) ** 2)[0] < 1.0  # class 1's mean itself
    assert shared.score(odd)[0] < 4.0 < 20.0 < per_class.score(odd)[0]
    gate = fit_gate(features, labels, features[::5], target_pass_rate=0.95)
    assert gate.refused(odd)[0]
    assert [d["covariance"] for d in gate.describe()["densities"]] == ["shared", "per class"]


def test_version_1_gate_files_still_load(tmp_path: Path) -> None:
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    features, labels = rng.gamma(2.0, 1.0, (100, 6)), rng.integers(0, 2, 100)
    density = FeatureDensity.fit(features, labels)
    meta = {"format_version": 1, "method": "mahalanobis-pooled-features-v1", "threshold": 3.0, "target_pass_rate": 0.99}
    arrays = {"means": density.means.astype(np.float32), "whiten": density.whiten.astype(np.float32)}
    path = tmp_path / GATE_FILE
    path.write_bytes(save(arrays, metadata={"gate": json.dumps(meta)}))
    loaded = load_gate(path, hashlib.sha256(path.read_bytes()).hexdigest())
    np.testing.assert_allclose(loaded.scores(features), density.score(features), rtol=1e-5)  # unscaled distances
    assert loaded.threshold == 3.0 and loaded.scales == (1.0,)


def test_gate_file_round_trips_and_is_refused_when_changed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    features = rng.gamma(2.0, 1.0, (100, 6))
    gate = fit_gate(features, rng.integers(0, 2, 100), features[:40])
    path = tmp_path / GATE_FILE
    sha = save_gate(gate, path)
    loaded = load_gate(path, sha)
    np.testing.assert_allclose(loaded.scores(features), gate.scores(features), rtol=1e-5)
    assert loaded.threshold == gate.threshold
    with pytest.raises(GateError, match="does not match its card"):
        load_gate(path, "0" * 64)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(GateError, match="modified or corrupted"):
        load_gate(path, sha)
    with pytest.raises(GateError, match="missing"):
        load_gate(tmp_path / "nothing.safetensors", sha)


@pytest.mark.parametrize(
    ("modality", "body_part", "refused_for"),
    [
        ("CR", "CHEST", None),
        ("DX", "chest ", None),
        ("DR", None, None),
        (None, None, None),
        ("MR", "HEAD", "MR image (Modality)"),
        ("CT", "CHEST", "CT image (Modality)"),
        ("CR", "HAND", "shows the HAND (BodyPartExamined)"),
        ("DX", "KNEE", "shows the KNEE (BodyPartExamined)"),
    ],
)
def test_dicom_refusal(modality: str | None, body_part: str | None, refused_for: str | None) -> None:
    reason = dicom_refusal(modality, body_part, GatePolicy())
    if refused_for is None:
        assert reason is None
    else:
        assert reason is not None and refused_for in reason and "only chest X-rays are classified" in reason
    assert dicom_refusal(modality, body_part, GatePolicy(enabled=False)) is None
    assert dicom_refusal(modality, body_part, GatePolicy(dicom_modalities=(), dicom_body_parts=())) is None


def test_synthetic_negatives_are_unit_images_of_every_kind() -> None:
    negatives = synthetic_negatives(np.random.default_rng(0), 2, _xrays(4, seed=1))
    assert [kind for kind, _ in negatives] == [kind for kind in NEGATIVE_KINDS for _ in range(2)]
    for _, image in negatives:
        assert image.ndim == 2 and image.dtype == np.float32 and 0.0 <= image.min() <= image.max() <= 1.0
    without_xrays = {kind for kind, _ in synthetic_negatives(np.random.default_rng(0), 1)}
    assert without_xrays == set(NEGATIVE_KINDS) - set(XRAY_KINDS)
    with pytest.raises(ValueError, match="need real X-ray images"):
        synthetic_negatives(np.random.default_rng(0), 1, kinds=["inverted_xray"])


# --------------------------------------------------------------------------- the bundle


def test_onnx_features_output_comes_with_the_same_logits(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir, CPU, with_torch=False)
    assert [o.name for o in bundle.session.get_outputs()] == [OUTPUT_NAME, FEATURES_NAME, CAM_ACTIVATIONS_NAME]
    batch = preprocess(_xrays(3, seed=2), bundle.card.spec)
    logits, features = ort_logits_and_features(bundle.session, batch)
    np.testing.assert_array_equal(logits, ort_logits(bundle.session, batch))
    assert features.shape == (3, 512) and features.min() >= 0.0  # resnet18: avgpool(layer4), after a ReLU


def test_fitted_gate_is_in_the_card_and_its_checksums(gated_bundle_dir: Path) -> None:
    card = read_card(gated_bundle_dir)
    assert card.gate is not None and card.gate["file"] == GATE_FILE
    assert card.gate["target_pass_rate"] == 0.99
    assert card.gate["calibration_pass_rate"] >= 0.99
    assert card.gate["synthetic_negatives_refused"] >= 0.95
    assert GATE_FILE in card.sha256
    bundle = load_bundle(gated_bundle_dir, CPU, with_torch=False)
    assert bundle.gate is not None and bundle.gate.threshold == card.gate["threshold"]


def test_tampered_gate_file_makes_the_bundle_refuse_to_load(gated_bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(gated_bundle_dir, copy)
    data = bytearray((copy / GATE_FILE).read_bytes())
    data[-8] ^= 0x01
    (copy / GATE_FILE).write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match=f"{GATE_FILE} in .* does not match its card"):
        Predictor.load(copy, CPU)
    (copy / GATE_FILE).unlink()
    with pytest.raises(BundleError, match=f"has no {GATE_FILE}"):
        Predictor.load(copy, CPU)


def test_card_threshold_edited_without_the_gate_file_is_refused(gated_bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(gated_bundle_dir, copy)
    card = read_card(copy)
    assert card.gate is not None
    card.gate = {**card.gate, "threshold": card.gate["threshold"] * 10}
    write_card(copy, card)
    with pytest.raises(BundleError, match="threshold differs"):
        load_bundle(copy, CPU, with_torch=False)


def test_gate_passes_most_fresh_xrays_and_refuses_every_synthetic_kind(gated_predictor: Predictor) -> None:
    def passes(image: np.ndarray) -> bool:
        try:
            return gated_predictor.screen(image) is not None
        except NotAChestXray:
            return False

    assert np.mean([passes(image) for image in _xrays(40, seed=12)]) >= 0.9
    for kind, image in synthetic_negatives(np.random.default_rng(3), 2, _xrays(4, seed=13)):
        with pytest.raises(NotAChestXray) as refusal:
            gated_predictor.predict(image)
        assert refusal.value.score is not None and refusal.value.threshold is not None, kind
        assert refusal.value.score > refusal.value.threshold, kind


# --------------------------------------------------------------------------- the service and the CLI


@pytest.mark.parametrize("kind", ["noise_uniform", "text", "gradient", "inverted_xray"])
def test_predict_and_explain_refuse_junk_with_422(make_client: Any, gated_predictor: Predictor, kind: str) -> None:
    with make_client(predictor=gated_predictor) as client:
        for route in ("/predict", "/explain"):
            response = client.post(route, files={"file": ("junk.png", _junk_png(kind), "image/png")})
            assert response.status_code == 422, (route, response.text)
            body = response.json()
            assert body["code"] == "not_a_chest_xray"
            assert body["detail"].startswith(REFUSAL_START)
            assert body["gate_score"] > body["gate_threshold"] == _threshold(gated_predictor)


def test_chest_cr_dicom_passes_and_extremity_or_mr_is_refused_by_metadata(
    make_client: Any, gated_predictor: Predictor, fit_xrays: list[np.ndarray]
) -> None:
    # pydicom's test files have no chest radiograph (their CR files are 16 x 16 cervical-spine frames), so the
    # chest CR is synthetic: a fitting image of the gate, with chest metadata.
    from pydicom.data import get_testdata_file

    chest = _cr_dicom(fit_xrays[0], Modality="CR", BodyPartExamined="CHEST")
    hand = _cr_dicom(fit_xrays[0], Modality="CR", BodyPartExamined="HAND")
    mr = Path(str(get_testdata_file("MR_small.dcm"))).read_bytes()  # a real MR slice from pydicom's test files
    with make_client(predictor=gated_predictor) as client:
        ok = client.post("/predict", files={"file": ("chest.dcm", chest, "application/dicom")})
        assert ok.status_code == 200, ok.text
        assert ok.json()["gate_score"] <= _threshold(gated_predictor)
        for name, data, reason in [
            ("hand.dcm", hand, "This DICOM file shows the HAND (BodyPartExamined), not the chest"),
            ("mr.dcm", mr, "This DICOM file is a MR image (Modality), not a radiograph"),
        ]:
            for route in ("/predict", "/explain"):
                refused = client.post(route, files={"file": (name, data, "application/dicom")})
                assert refused.status_code == 422, (name, route, refused.text)
                body = refused.json()
                assert body["code"] == "not_a_chest_xray" and body["detail"].startswith(reason)
                assert body["gate_score"] is None


def test_gate_off_lets_everything_through_and_model_shows_the_settings(
    make_client: Any, gated_bundle_dir: Path, gated_predictor: Predictor
) -> None:
    junk = _junk_png("noise_uniform")
    with make_client(predictor=gated_predictor) as client:
        settings = client.get("/model").json()["gate_settings"]
        assert settings["enabled"] is True and settings["active"] is True
        assert settings["threshold"] == _threshold(gated_predictor)
        assert settings["dicom_modalities"] == ["CR", "DX", "DR"] and settings["dicom_body_parts"] == ["CHEST"]
    with make_client(predictor=None, model_dir=gated_bundle_dir, gate="off") as client:
        model = client.get("/model").json()
        assert model["gate_settings"]["enabled"] is False and model["gate_settings"]["active"] is False
        assert model["gate"]["file"] == GATE_FILE
        response = client.post("/predict", files={"file": ("junk.png", junk, "image/png")})
        assert response.status_code == 200, response.text
        assert response.json()["gate_score"] is None
        hand = _cr_dicom(_xrays(1, seed=4)[0], Modality="CR", BodyPartExamined="HAND")
        assert client.post("/predict", files={"file": ("hand.dcm", hand, "application/dicom")}).status_code == 200


def test_gate_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    monkeypatch.setenv("CXR_GATE", "OFF")
    monkeypatch.setenv("CXR_GATE_DICOM_MODALITIES", "cr, dx")
    monkeypatch.setenv("CXR_GATE_DICOM_BODY_PARTS", "")
    assert Settings().gate_policy == GatePolicy(enabled=False, dicom_modalities=("CR", "DX"), dicom_body_parts=())


def test_cli_prints_a_row_per_refused_file_in_input_order_and_exits_non_zero(
    tmp_path: Path, gated_bundle_dir: Path, fit_xrays: list[np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "chest.png"
    good.write_bytes(png_bytes((fit_xrays[1] * 255 + 0.5).astype(np.uint8)))
    junk = tmp_path / "noise.png"
    junk.write_bytes(_junk_png("noise_gaussian"))
    hand = tmp_path / "hand.dcm"
    hand.write_bytes(_cr_dicom(fit_xrays[1], Modality="CR", BodyPartExamined="HAND"))
    files = [str(junk), str(good), str(hand)]

    assert cli.predict_main([*files, "--json", "--model-dir", str(gated_bundle_dir)]) == cli.EXIT_REFUSED
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["file"] for row in rows] == files
    assert rows[0]["code"] == "not_a_chest_xray" and rows[0]["error"].startswith(REFUSAL_START)
    assert "label" not in rows[0] and rows[0]["gate_score"] > rows[0]["gate_threshold"]
    assert rows[1]["label"] in CLASSES_3 and "error" not in rows[1]
    assert rows[2]["code"] == "not_a_chest_xray" and "HAND" in rows[2]["error"] and rows[2]["gate_score"] is None
    assert "2 of 3 file(s) refused: not a chest X-ray" in err

    assert cli.predict_main([str(junk), "--model-dir", str(gated_bundle_dir)]) == cli.EXIT_REFUSED
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith(f"{junk}  REFUSED: {REFUSAL_START}")

    assert cli.predict_main([*files, "--gate", "off", "--model-dir", str(gated_bundle_dir)]) == cli.EXIT_OK
    assert "REFUSED" not in capsys.readouterr().out


def test_decoder_keeps_dicom_modality_and_body_part() -> None:
    image = decode_image(_cr_dicom(_xrays(1, seed=5)[0], Modality="DX", BodyPartExamined="CHEST"))
    assert (image.modality, image.body_part) == ("DX", "CHEST")
    assert decode_image(png_bytes(np.zeros((8, 8), np.uint8))).modality is None


def test_metadata_refusal_is_never_logged(
    make_client: Any, gated_predictor: Predictor, fit_xrays: list[np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    hand = _cr_dicom(fit_xrays[2], Modality="CR", BodyPartExamined="HAND")
    with caplog.at_level("DEBUG"), make_client(predictor=gated_predictor) as client:
        response = client.post("/predict", files={"file": ("hand.dcm", hand, "application/dicom")})
    assert response.status_code == 422 and "HAND" in response.json()["detail"]
    assert caplog.records and "HAND" not in caplog.text and "BodyPartExamined" not in caplog.text
