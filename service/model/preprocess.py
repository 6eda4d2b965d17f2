"""The single function that turns a decoded grayscale image into network input.

Geometry (preprocessing id ``stretch-resize-v1``): the whole image is resized to S x S, stretching a
non-square image. That is how the source databases made their square images, so training and serving see
the same geometry, nothing is cropped away, and the inverse is a plain resize back to (width, height):
a heatmap computed on the S x S input lands exactly on the original image (`to_original_geometry`).

Border band (``stretch-resize-band-v1``): after the resize, the outer ``BAND_SHARE`` of S on every side is set to
the mean of the square inside it. Markers, collimation edges, text and the image frame sit in that band; a network
that never sees it cannot learn which hospital's borders go with which class (the shortcut probes of issue 10).

Intensities: with ``stretch-resize-clahe-v1`` the resized image is first equalised with CLAHE (OpenCV's
contrast-limited adaptive histogram equalisation on 8 x 8 tiles, clip limit 2, on its 8-bit quantisation), which
takes exposure, scanner contrast and windowing out of what the network can use. Then the [0, 1] grayscale value
is repeated on three channels and normalised with the bundle's mean/std. Imports numpy, Pillow and (for CLAHE
only) OpenCV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

PREPROCESSING_ID = "stretch-resize-v1"
CLAHE_PREPROCESSING_ID = "stretch-resize-clahe-v1"
BAND_PREPROCESSING_ID = "stretch-resize-band-v1"
PREPROCESSING_IDS = (PREPROCESSING_ID, CLAHE_PREPROCESSING_ID, BAND_PREPROCESSING_ID)
BAND_SHARE = 0.08
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = (8, 8)
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
        if self.preprocessing not in PREPROCESSING_IDS:
            raise ValueError(
                f"Preprocessing {self.preprocessing!r} is not supported by this version "
                f"(supported: {', '.join(map(repr, PREPROCESSING_IDS))})."
            )
        if self.size < 32:
            raise ValueError(f"Input size must be at least 32 pixels, got {self.size}.")


def resize_gray(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D float32 array to (width, height) with antialiased bilinear filtering."""
    img = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def clahe(square: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a 2-D [0, 1] image (8-bit, as OpenCV does it)."""
    import cv2  # only bundles that ask for it pay the import

    equaliser = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=CLAHE_TILES)
    quantised = np.rint(np.clip(square, 0.0, 1.0) * 255.0).astype(np.uint8)
    return equaliser.apply(quantised).astype(np.float32) / 255.0


def blank_band(square: np.ndarray, share: float = BAND_SHARE) -> np.ndarray:
    """A copy of an S x S image with the outer ``share`` of S on every side set to the mean of what is inside."""
    side = square.shape[0]
    band = round(share * side)
    inner = square[band : side - band, band : side - band]
    out = np.full_like(square, inner.mean())
    out[band : side - band, band : side - band] = inner
    return out


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
        if spec.preprocessing == CLAHE_PREPROCESSING_ID:
            square = clahe(square)
        elif spec.preprocessing == BAND_PREPROCESSING_ID:
            square = blank_band(square)
        batch[i] = (square[None, :, :] - mean) / std
    return batch


def to_original_geometry(map_2d: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """Invert the geometry: resize an S x S map (e.g. a Grad-CAM heatmap) to the original (width, height)."""
    return resize_gray(map_2d, original_size)
