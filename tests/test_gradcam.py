"""service.gradcam: Grad-CAM maps on the torch copy, hooks released on every path, failures typed; the PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from torch import nn

from service.gradcam import GradCamError, gradcam_maps, png_bytes
from service.model.preprocess import preprocess
from service.predictor import Predictor
from tests.fixtures.synthetic import xray_unit


def _model_and_layer(predictor: Predictor) -> tuple[nn.Module, nn.Module]:
    model = predictor.bundle.torch_model
    assert model is not None
    return model, model.get_submodule(predictor.card.cam_layer)


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_maps_are_in_unit_range_one_per_image(predictor: Predictor) -> None:
    model, layer = _model_and_layer(predictor)
    batch = preprocess([xray_unit(seed=0), xray_unit(seed=1)], predictor.card.spec)
    maps = gradcam_maps(model, layer, batch, [0, 2])
    assert maps.shape == (2, 96, 96) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and maps.max() > 0.0
    assert _no_hooks_left(model)


def test_a_failure_inside_pytorch_grad_cam_is_a_typed_error_and_releases_the_hooks(
    predictor: Predictor, capsys: pytest.CaptureFixture[str]
) -> None:
    # pytorch-grad-cam's own __exit__ would swallow this IndexError (printing it), leaving no map at all.
    model, layer = _model_and_layer(predictor)
    batch = preprocess(xray_unit(), predictor.card.spec)
    with pytest.raises(GradCamError, match=r"Grad-CAM failed for target class indices \[7\]") as raised:
        gradcam_maps(model, layer, batch, [7])  # the network has 3 outputs
    assert isinstance(raised.value.__cause__, IndexError)
    assert capsys.readouterr().out == ""  # nothing printed
    assert _no_hooks_left(model)
    # The model is untouched: the next explanation works.
    assert gradcam_maps(model, layer, batch, [1]).shape == (1, 96, 96)


def test_one_target_per_image(predictor: Predictor) -> None:
    model, layer = _model_and_layer(predictor)
    batch = preprocess([xray_unit(), xray_unit()], predictor.card.spec)
    with pytest.raises(ValueError, match="One target per image: 1 targets for 2 images"):
        gradcam_maps(model, layer, batch, [0])


@pytest.mark.parametrize("shape", [(97, 131, 3), (64, 40)], ids=["rgb overlay", "gray layer"])
def test_png_bytes_is_a_lossless_png_that_pillow_reads(shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = png_bytes(pixels)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(image), pixels)
