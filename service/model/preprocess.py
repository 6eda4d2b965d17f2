"""The single function that turns a decoded grayscale image into network input.

Geometry (preprocessing id ``stretch-resize-v1``): the whole image is resized to S x S, stretching a
non-square image. That is how the source databases made their square images, so training and serving see
the same geometry, nothing is cropped away, and the inverse is a plain resize back to (width, height):
a heatmap computed on the S x S input lands exactly on the original image (`to_original_geometry`).

Intensities: the [0, 1] grayscale value is repeated on three channels and normalised with the bundle's
mean/std. Imports numpy and Pillow only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

PREPROCESSING_ID = "stretch-resize-v1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """What a bundle says about its input: side length S and per-channel mean/std."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    preprocessing: str = PREPROCESSING_ID

    def __post_init__(self) -> None:
        if self.preprocessing != PREPROCESSING_ID:
            raise ValueError(
                f"Preprocessing {self.preprocessing!r} is not supported by this version "
                f"(supported: {PREPROCESSING_ID!r})."
            )
        if self.size < 32:
            raise ValueError(f"Input size must be at least 32 pixels, got {self.size}.")


def resize_gray(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D float32 array to (width, height) with antialiased bilinear filtering."""
    img = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def preprocess(images: np.ndarray | Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Turn one 2-D [0, 1] image, or a sequence of them, into an N x 3 x S x S float32 batch."""
    if isinstance(images, np.ndarray) and images.ndim == 2:
        images = [images]
    batch = np.empty((len(images), 3, spec.size, spec.size), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    for i, image in enumerate(images):
        if image.ndim != 2:
            raise ValueError(f"Expected a 2-D grayscale image, got shape {image.shape}.")
        square = np.clip(resize_gray(image, (spec.size, spec.size)), 0.0, 1.0)
        batch[i] = (square[None, :, :] - mean) / std
    return batch


def to_original_geometry(map_2d: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """Invert the geometry: resize an S x S map (e.g. a Grad-CAM heatmap) to the original (width, height)."""
    return resize_gray(map_2d, original_size)
