"""The model contract: labels, preprocess, backbones and bundles (write, load, verify, refuse)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from service.model import backbones
from service.model.bundle import (
    CARD_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    BundleError,
    BundleNotFound,
    ChecksumMismatch,
    InvalidCard,
    ModelCard,
    ParityMismatch,
    bundle_problem,
    load_bundle,
    ort_logits,
    probe_batch,
    read_card,
    sha256_file,
    write_bundle,
    write_card,
)
from service.model.decision import Decision
from service.model.labels import UnknownLabelError, canonical_label, order_classes
from service.model.preprocess import (
    BAND_PREPROCESSING_ID,
    BAND_SHARE,
    CLAHE_PREPROCESSING_ID,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessSpec,
    preprocess,
    to_original_geometry,
)
from tests.fixtures.bundles import build_test_bundle
from tests.fixtures.synthetic import make_xray

CLASSES3 = ["COVID", "Normal", "Viral Pneumonia"]
CLASSES4 = [*CLASSES3, "Lung Opacity"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("COVID-19", "COVID"),
        ("covid", "COVID"),
        ("Viral_Pneumonia", "Viral Pneumonia"),
        ("viral pneumonia", "Viral Pneumonia"),
        ("Lung_Opacity", "Lung Opacity"),
        ("NORMAL", "Normal"),
    ],
)
def test_canonical_labels(name: str, expected: str) -> None:
    assert canonical_label(name) == expected


def test_unknown_label_and_class_order() -> None:
    with pytest.raises(UnknownLabelError, match="Unknown class label 'masks'"):
        canonical_label("masks")
    assert order_classes(["Lung_Opacity", "Normal", "COVID-19"]) == ["COVID", "Normal", "Lung Opacity"]


def test_preprocess_shape_normalisation_and_inverse_geometry() -> None:
    spec = PreprocessSpec(64)
    image = np.zeros((120, 200), np.float32)
    image[:, :100] = 1.0  # left half white
    batch = preprocess([image, np.full((50, 50), 0.5, np.float32)], spec)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == np.float32
    for c in range(3):  # white -> (1 - mean) / std, in the left half, per channel
        assert batch[0, c, 32, 5] == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-5)
        assert batch[0, c, 32, 60] == pytest.approx((0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-5)
        assert batch[1, c, 10, 10] == pytest.approx((0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-5)
    # A map in input geometry goes back to (width, height) with the boundary where it was.
    back = to_original_geometry(batch[0, 0], (200, 120))
    assert back.shape == (120, 200)
    assert back[60, 90] > 2.0 and back[60, 110] < -2.0
    with pytest.raises(ValueError, match="not supported"):
        PreprocessSpec(64, preprocessing="center-crop")


def test_clahe_preprocessing_takes_exposure_out_of_the_input() -> None:
    rng = np.random.default_rng(0)
    image = make_xray("COVID", 160, rng).astype(np.float32) / 255.0
    under_exposed = 0.25 + 0.3 * image**1.8  # a flatter, darker, other-gamma reading of the same chest
    plain, equalised = PreprocessSpec(96), PreprocessSpec(96, preprocessing=CLAHE_PREPROCESSING_ID)

    def brightness_gap_and_contrast_ratio(spec: PreprocessSpec) -> tuple[float, float]:
        a, b = preprocess([image, under_exposed], spec)
        return float(abs(a.mean() - b.mean())), float(b.std() / a.std())

    plain_gap, plain_ratio = brightness_gap_and_contrast_ratio(plain)
    clahe_gap, clahe_ratio = brightness_gap_and_contrast_ratio(equalised)
    assert clahe_gap < 0.4 * plain_gap  # the two exposures land much closer together with CLAHE
    assert plain_ratio < 0.4 < 0.7 < clahe_ratio  # and the flat one gets most of its contrast back
    assert preprocess(image, equalised).shape == (1, 3, 96, 96)


def test_the_band_preprocessing_hides_markers_in_the_border_band_and_keeps_the_inside() -> None:
    image = make_xray("Normal", 200, np.random.default_rng(0)).astype(np.float32) / 255.0
    marked = image.copy()
    marked[4:14, 4:30] = 1.0  # a bright "L" marker in the top-left corner, inside the outer 8 %
    marked[:, :3] = 0.0  # and a black frame edge
    plain, banded = PreprocessSpec(100), PreprocessSpec(100, preprocessing=BAND_PREPROCESSING_ID)
    band = round(BAND_SHARE * 100)
    assert band == 8
    inside = (slice(None), slice(band + 2, 100 - band - 2), slice(band + 2, 100 - band - 2))
    a, b = preprocess([image, marked], banded)
    np.testing.assert_allclose(a[inside], preprocess(image, plain)[0][inside], atol=1e-6)  # the lungs untouched
    assert np.ptp(a[0, :band, :]) == 0.0  # the band is one flat value: the inside's mean
    np.testing.assert_allclose(a[0, 0, 0], a[0, band:-band, band:-band].mean(), atol=1e-5)
    # the marker and the frame change the plain input's corner, and nothing of the banded one but the mean
    p_plain, m_plain = preprocess([image, marked], plain)
    assert np.abs(p_plain[:, :band, :band] - m_plain[:, :band, :band]).max() > 1.0
    np.testing.assert_allclose(b[inside], a[inside], atol=1e-6)
    assert np.abs(b[:, :band, :band] - a[:, :band, :band]).max() < 0.05


@pytest.mark.parametrize("preprocessing", [CLAHE_PREPROCESSING_ID, BAND_PREPROCESSING_ID])
def test_a_bundle_is_served_with_its_preprocessing(tmp_path: Path, preprocessing: str) -> None:
    from service.model.bundle import ort_logits
    from service.predictor import Predictor

    spec = PreprocessSpec(64, preprocessing=preprocessing)
    bundle_dir = build_test_bundle(tmp_path / "bundle", CLASSES3, spec=spec)
    predictor = Predictor.load(bundle_dir, ["CPUExecutionProvider"])
    assert predictor.card.spec == spec
    image = 0.3 + 0.2 * make_xray("Normal", 120, np.random.default_rng(1)).astype(np.float32) / 255.0
    served = predictor.predict(image).probabilities
    logits = ort_logits(predictor.bundle.session, preprocess(image, spec))[0] / predictor.card.temperature
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose([served[c] for c in predictor.classes], expected, atol=1e-5)
    plain = ort_logits(predictor.bundle.session, preprocess(image, PreprocessSpec(64)))[0] / predictor.card.temperature
    assert not np.allclose(logits, plain, atol=1e-3)  # it is not the plain preprocessing


@pytest.mark.parametrize("arch", ["vgg16", "resnet18", "densenet121"])
@pytest.mark.parametrize("classes", [CLASSES3, CLASSES4])
def test_backbones_build_with_head_and_cam_layer(arch: str, classes: list[str]) -> None:
    model = backbones.build(arch, len(classes)).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, len(classes))
    layer = backbones.cam_layer(model, arch)
    assert isinstance(layer, torch.nn.Module)
    assert backbones.cam_layer_name(arch) in dict(model.named_modules())


def test_backbone_weights_from_path(tmp_path: Path) -> None:
    source = backbones.build("resnet18", 3)
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(full))
    same = backbones.build("resnet18", 3, full)
    assert torch.equal(same.get_parameter("fc.weight"), source.get_parameter("fc.weight"))
    # An ImageNet-style 1000-class state dict: the backbone is loaded, the head replaced.
    imagenet_like = backbones.build("resnet18", 1000)
    path = tmp_path / "imagenet.pt"
    torch.save(imagenet_like.state_dict(), path)
    model = backbones.build("resnet18", 4, path)
    assert model.get_parameter("fc.weight").shape[0] == 4  # a new 4-class head
    assert torch.equal(model.get_parameter("conv1.weight"), imagenet_like.get_parameter("conv1.weight"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        backbones.build("resnet18", 3, tmp_path / "missing.pt")
    with pytest.raises(backbones.UnknownArchError, match="choose one of: vgg16, resnet18, densenet121"):
        backbones.build("alexnet", 3)


# Not ImageNet's statistics: the card must carry the training spec's, not a default that happens to match.
SPEC = PreprocessSpec(64, mean=(0.5, 0.45, 0.4), std=(0.3, 0.25, 0.2))
DECISION = Decision(
    positive_class="COVID",
    threshold=0.23,
    rule="COVID suspected when P(COVID) >= 0.23 (chosen on source-held-out validation for sensitivity >= 0.97)",
)
CALIBRATION = {"method": "temperature", "temperature": 1.0, "ece": {"before": 0.08, "after": 0.03}}
PROBES = {"border_only_auc": 0.61, "notes": ["lungs masked"]}
SOURCES = {"kaggle-radiography": {"train": 10, "val": 2, "test": 3}, "other": {"test": 4}}


def write_resnet18(out: Path, classes: list[str], spec: PreprocessSpec = SPEC, **card: Any) -> ModelCard:
    """An untrained resnet18 written as a bundle (seeded: the same weights every time)."""
    torch.manual_seed(0)
    model = backbones.build("resnet18", len(classes))
    cam_layer = backbones.cam_layer_name("resnet18")
    return write_bundle(
        model, out, name="tiny-test", arch="resnet18", classes=classes, spec=spec, cam_layer=cam_layer, **card
    )


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    write_resnet18(
        out,
        CLASSES4,
        metrics={"accuracy": 0.5},
        decision=DECISION,
        calibration=CALIBRATION,
        probes=PROBES,
        sources=SOURCES,
    )
    return out


def test_bundle_round_trip(bundle_dir: Path) -> None:
    card = read_card(bundle_dir)
    assert card.classes == CLASSES4 and card.input_size == 64 and card.arch == "resnet18"
    assert card.name == "tiny-test" and card.metrics == {"accuracy": 0.5}
    # The preprocessing is the training spec's, statistics included (what the service will normalise with).
    assert card.spec == SPEC
    assert (card.mean, card.std, card.preprocessing) == ((0.5, 0.45, 0.4), (0.3, 0.25, 0.2), "stretch-resize-v1")
    assert card.decision == DECISION
    assert (card.calibration, card.probes, card.sources) == (CALIBRATION, PROBES, SOURCES)
    on_disk = json.loads((bundle_dir / CARD_FILE).read_text())
    assert on_disk["decision"] == DECISION.model_dump() and on_disk["sources"] == SOURCES
    assert (bundle_dir / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o644
    assert card.sha256[ONNX_FILE] == sha256_file(bundle_dir / ONNX_FILE)
    assert card.sha256[WEIGHTS_FILE] == sha256_file(bundle_dir / WEIGHTS_FILE)
    assert (bundle_dir / "report").is_dir()
    bundle = load_bundle(bundle_dir, providers=["CPUExecutionProvider"])
    assert bundle.providers == ["CPUExecutionProvider"]
    assert bundle.parity_max_abs_diff is not None and bundle.parity_max_abs_diff < 1e-3
    batch = probe_batch(card.spec, n=5, seed=3)  # dynamic batch axis: 5 works although 1 was exported
    assert bundle.torch_model is not None
    with torch.no_grad():
        expected = bundle.torch_model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(ort_logits(bundle.session, batch), expected, atol=1e-3)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_file_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    copy = _copy(bundle_dir, tmp_path / "tampered")
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match=r"weights\.safetensors .* does not match its card"):
        load_bundle(copy)


def test_onnx_torch_mismatch_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    copy = _copy(bundle_dir, tmp_path / "mismatch")
    other = backbones.build("resnet18", 4)  # different random weights, same architecture
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(copy / WEIGHTS_FILE))
    card = read_card(copy)
    card.sha256[WEIGHTS_FILE] = sha256_file(copy / WEIGHTS_FILE)  # checksums consistent: only parity can tell
    write_card(copy, card)
    with pytest.raises(ParityMismatch, match="disagree: max logit difference"):
        load_bundle(copy)


def test_missing_and_invalid_bundles_are_refused(bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleNotFound, match="the folder does not exist"):
        load_bundle(tmp_path / "nowhere")
    copy = _copy(bundle_dir, tmp_path / "invalid")
    card = json.loads((copy / CARD_FILE).read_text())
    del card["classes"]
    (copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(InvalidCard, match="is not a valid model card"):
        load_bundle(copy)
    (copy / CARD_FILE).unlink()
    with pytest.raises(BundleNotFound, match=r"card\.json is missing"):
        load_bundle(copy)


def test_write_card_round_trips_fields_it_does_not_know(bundle_dir: Path, tmp_path: Path) -> None:
    copy = _copy(bundle_dir, tmp_path / "extras")
    card = read_card(copy)
    updated = card.model_copy(update={"probes": {"border_only_auc": 0.55}})
    # A field a newer training job adds, which this version of the card does not declare.
    updated.from_the_future = {"method": "ensemble", "members": 3}  # type: ignore[attr-defined]
    write_card(copy, updated)
    again = read_card(copy)
    assert again.probes == {"border_only_auc": 0.55}
    assert again.model_dump()["from_the_future"] == {"method": "ensemble", "members": 3}
    assert again.model_dump() == updated.model_dump()


def test_a_bundle_without_the_optional_fields_reads_as_before(bundle_dir: Path, tmp_path: Path) -> None:
    copy = _copy(bundle_dir, tmp_path / "old-card")
    card = json.loads((copy / CARD_FILE).read_text())
    for key in ("decision", "calibration", "probes", "sources"):
        del card[key]
    (copy / CARD_FILE).write_text(json.dumps(card))
    old = read_card(copy)
    assert (old.decision, old.calibration, old.probes, old.sources) == (None, None, None, None)


@pytest.mark.parametrize(
    ("probabilities", "label", "positive"),
    [
        ({"COVID": 0.30, "Normal": 0.60, "Viral Pneumonia": 0.10}, "COVID", True),  # not the argmax
        ({"COVID": 0.23, "Normal": 0.07, "Viral Pneumonia": 0.70}, "COVID", True),  # at the threshold
        ({"COVID": 0.2299, "Normal": 0.30, "Viral Pneumonia": 0.4701}, "Viral Pneumonia", False),
        ({"COVID": 0.10, "Normal": 0.45, "Viral Pneumonia": 0.45}, "Normal", False),  # a tie: class order
    ],
)
def test_the_decision_rule(probabilities: dict[str, float], label: str, positive: bool) -> None:
    assert DECISION.label(probabilities) == label
    outcome = DECISION.outcome(probabilities)
    assert outcome.model_dump() == {
        "positive_class": "COVID",
        "threshold": 0.23,
        "positive": positive,
        "rule": DECISION.rule,
    }


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 1.5])
def test_a_decision_threshold_must_lie_strictly_between_0_and_1(threshold: float) -> None:
    with pytest.raises(ValidationError, match="threshold"):
        Decision(positive_class="COVID", threshold=threshold, rule="COVID when P(COVID) >= t")


def test_a_decision_for_a_class_the_model_lacks_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "never-written"
    wrong = Decision(positive_class="Pneumothorax", threshold=0.5, rule="Pneumothorax when P >= 0.5")
    with pytest.raises(ValidationError, match="'Pneumothorax' is not one of the classes"):
        write_resnet18(out, CLASSES3, PreprocessSpec(64), decision=wrong)
    assert not out.exists()  # refused before anything was exported
    copy = _copy(bundle_dir, tmp_path / "bad-decision")
    card = json.loads((copy / CARD_FILE).read_text())
    card["decision"]["positive_class"] = "Pneumothorax"
    (copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(InvalidCard, match="is not a valid model card"):
        read_card(copy)


def test_weights_of_another_architecture_give_a_short_reason_without_paths(bundle_dir: Path, tmp_path: Path) -> None:
    copy = _copy(bundle_dir, tmp_path / "wrong-arch")
    other = backbones.build("densenet121", 4)  # torch's report of every missing/unexpected key: ~34,000 characters
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(copy / WEIGHTS_FILE))
    card = read_card(copy)
    card.sha256[WEIGHTS_FILE] = sha256_file(copy / WEIGHTS_FILE)
    write_card(copy, card)  # consistent checksums and manifest: only loading the weights can tell
    with pytest.raises(ParityMismatch) as refused:
        load_bundle(copy, providers=["CPUExecutionProvider"])
    reason = bundle_problem(refused.value, copy)
    assert reason == (
        "The model bundle 'wrong-arch' cannot be served: weights.safetensors does not fit a resnet18 with 4 classes "
        "(Error(s) in loading state_dict for ResNet)."
    )
    assert str(tmp_path) not in reason


def test_an_unloadable_graph_gives_a_short_reason_without_paths(bundle_dir: Path, tmp_path: Path) -> None:
    copy = _copy(bundle_dir, tmp_path / "bad-graph")
    (copy / ONNX_FILE).write_bytes(b"not a protobuf" * 1000)
    card = read_card(copy)
    card.sha256[ONNX_FILE] = sha256_file(copy / ONNX_FILE)
    write_card(copy, card)
    with pytest.raises(BundleError) as refused:
        load_bundle(copy, providers=["CPUExecutionProvider"])
    reason = bundle_problem(refused.value, copy)
    assert reason.startswith("The model bundle 'bad-graph' cannot be served: onnxruntime cannot load model.onnx: ")
    assert str(tmp_path) not in reason and len(reason) < 400


def test_building_from_a_weights_file_draws_nothing_from_torchs_generator(tmp_path: Path) -> None:
    # The service builds its torch reference in a background thread: a draw from the global generator there would
    # change what a seeded build elsewhere in the process gets.
    torch.manual_seed(0)
    model = backbones.build("resnet18", 3).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    state = torch.random.get_rng_state()
    loaded = backbones.build("resnet18", 3, path).eval()
    assert torch.equal(torch.random.get_rng_state(), state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not any(t.is_meta for t in loaded.state_dict().values())
