"""Augmentation for chest X-rays, applied to the cached S x S array *before* service preprocessing.

Small rotations (±10°), translations (±6 %), zoom (0.9-1.1), brightness/contrast (±20 %), gamma (0.8-1.25,
a stand-in for other exposures and window settings) and, now and then, a blur or a down-and-up resample
(other scanners' resolutions). No horizontal flips: the heart sits on the patient's left, and a mirrored
film (with its mirrored text markers) is not an X-ray the service will see.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random, label-preserving variant of a uint8 S x S image; returns float32 in [0, 1]."""
    size = image.shape[0]
    pil = Image.fromarray(image)
    angle = rng.uniform(-10.0, 10.0)
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.06, 0.06, size=2) * size
    pil = pil.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(round(shift[0]), round(shift[1])))
    if abs(scale - 1.0) > 1e-3:
        side = round(size / scale)
        offset = (size - side) // 2
        pil = pil.transform(
            (size, size),
            Image.Transform.EXTENT,
            (offset, offset, offset + side, offset + side),
            resample=Image.Resampling.BILINEAR,
        )
    roll = rng.random()
    if roll < 0.15:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 1.5)))
    elif roll < 0.3:
        low = max(32, int(size * rng.uniform(0.35, 0.7)))
        pil = pil.resize((low, low), Image.Resampling.BILINEAR).resize(
            (size, size), Image.Resampling.BILINEAR
        )
    out = np.asarray(pil, dtype=np.float32) / 255.0
    out = out ** rng.uniform(0.8, 1.25)
    contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)
    out = (out - out.mean()) * contrast + out.mean() + brightness
    return np.clip(out, 0.0, 1.0).astype(np.float32)
