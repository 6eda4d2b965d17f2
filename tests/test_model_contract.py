"""The model contract: labels, preprocess, backbones and bundles (write, load, verify, refuse)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from service.model import backbones
from service.model.bundle import (
    CARD_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    BundleNotFound,
    ChecksumMismatch,
    InvalidCard,
    ParityMismatch,
    load_bundle,
    ort_logits,
    probe_batch,
    read_card,
    sha256_file,
    write_bundle,
    write_card,
)
from service.model.labels import UnknownLabelError, canonical_label, order_classes
from service.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, preprocess, to_original_geometry

CLASSES3 = ["COVID", "Normal", "Viral Pneumonia"]
CLASSES4 = [*CLASSES3, "Lung Opacity"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("COVID-19", "COVID"), ("covid", "COVID"), ("Viral_Pneumonia", "Viral Pneumonia"),
     ("viral pneumonia", "Viral Pneumonia"), ("Lung_Opacity", "Lung Opacity"), ("NORMAL", "Normal")],
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
    assert torch.equal(same.fc.weight, source.fc.weight)
    # An ImageNet-style 1000-class state dict: the backbone is loaded, the head replaced.
    imagenet_like = backbones.build("resnet18", 1000)
    path = tmp_path / "imagenet.pt"
    torch.save(imagenet_like.state_dict(), path)
    model = backbones.build("resnet18", 4, path)
    assert model.fc.out_features == 4
    assert torch.equal(model.conv1.weight, imagenet_like.conv1.weight)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        backbones.build("resnet18", 3, tmp_path / "missing.pt")
    with pytest.raises(backbones.UnknownArchError, match="choose one of: vgg16, resnet18, densenet121"):
        backbones.build("alexnet", 3)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bundle") / "b"
    write_bundle(
        backbones.build("resnet18", 4), out, name="tiny-test", arch="resnet18", classes=CLASSES4, input_size=64,
        cam_layer=backbones.cam_layer_name("resnet18"), metrics={"accuracy": 0.5},
    )
    return out


def test_bundle_round_trip(bundle_dir: Path) -> None:
    card = read_card(bundle_dir)
    assert card.classes == CLASSES4 and card.input_size == 64 and card.arch == "resnet18"
    assert card.name == "tiny-test" and card.metrics == {"accuracy": 0.5}
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
