"""Augmentation for chest X-rays: one small class per operation, composed into named recipes.

Each transform takes a 2-D float32 image in [0, 1] and a ``numpy`` Generator and returns a new float32 image of
the same size; parameters live in the constructor so a run's config can record them (``describe``). Images are
the cached S x S arrays, before the service's preprocessing. No horizontal flips: the heart sits on the
patient's left, and a mirrored film is not an X-ray the service will see.

Recipes:
  * ``basic-v1``   — the first version: small rotation/shift/zoom, brightness/contrast/gamma, blur or resample.
  * ``shortcut-v2`` — also takes away what a network can read instead of the lungs (measured in the README):
    geometry of other scanners (random resized crops that keep the centre, aspect jitter, zoom-out with padding),
    borders and markers (random frames, erased or filled border bands, burned-in text), and exposure (gamma,
    windowing, contrast, noise, JPEG, resolution).
  * ``scanner-v3`` — ``basic-v1`` with a tighter field of view (resized crops), edge enhancement and noise: the
    changes that made v4 call Normal films COVID at test time.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont


class Transform(Protocol):
    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def _from_pil(pil: Image.Image) -> np.ndarray:
    return np.asarray(pil, dtype=np.float32) / 255.0


@dataclass(frozen=True)
class Affine:
    """Rotation (degrees), translation (share of the side) and isotropic zoom about the centre."""

    degrees: float = 10.0
    shift: float = 0.06
    zoom: tuple[float, float] = (0.9, 1.1)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = image.shape[0]
        angle = rng.uniform(-self.degrees, self.degrees)
        dx, dy = rng.uniform(-self.shift, self.shift, size=2) * size
        scale = rng.uniform(*self.zoom)
        pil = _to_pil(image).rotate(angle, resample=Image.Resampling.BILINEAR, translate=(round(dx), round(dy)))
        if abs(scale - 1.0) > 1e-3:
            side = size / scale
            offset = (size - side) / 2
            pil = pil.transform(
                (size, size),
                Image.Transform.EXTENT,
                (offset, offset, offset + side, offset + side),
                resample=Image.Resampling.BILINEAR,
            )
        return _from_pil(pil)


@dataclass(frozen=True)
class ResizedCrop:
    """Crop a random box of ``area`` share and ``aspect`` ratio (width / height) whose centre stays within
    ``max_offset`` of the image centre (the lungs stay in), then stretch it back to S x S."""

    p: float = 0.6
    area: tuple[float, float] = (0.6, 1.0)
    aspect: tuple[float, float] = (0.75, 1.33)
    max_offset: float = 0.08

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        size = image.shape[0]
        area = rng.uniform(*self.area) * size * size
        aspect = np.exp(rng.uniform(np.log(self.aspect[0]), np.log(self.aspect[1])))
        width = min(size, np.sqrt(area * aspect))
        height = min(size, np.sqrt(area / aspect))
        cx = size / 2 + rng.uniform(-self.max_offset, self.max_offset) * size
        cy = size / 2 + rng.uniform(-self.max_offset, self.max_offset) * size
        left = float(np.clip(cx - width / 2, 0, size - width))
        top = float(np.clip(cy - height / 2, 0, size - height))
        box = (left, top, left + width, top + height)
        return _from_pil(_to_pil(image).transform((size, size), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR))


@dataclass(frozen=True)
class ZoomOut:
    """Shrink the image (keeping or changing its aspect) onto a canvas of a random flat value: films that do not
    fill the detector, or that another scanner exported with a margin."""

    p: float = 0.25
    scale: tuple[float, float] = (0.7, 0.95)
    aspect_jitter: float = 0.15

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        size = image.shape[0]
        scale = rng.uniform(*self.scale)
        jitter = rng.uniform(-self.aspect_jitter, self.aspect_jitter)
        width = max(8, min(size, round(size * scale * (1 + jitter))))
        height = max(8, min(size, round(size * scale * (1 - jitter))))
        small = _to_pil(image).resize((width, height), Image.Resampling.BILINEAR)
        canvas = Image.new("L", (size, size), int(rng.choice([0, 255, int(rng.integers(0, 256))])))
        canvas.paste(small, (int(rng.integers(0, size - width + 1)), int(rng.integers(0, size - height + 1))))
        return _from_pil(canvas)


@dataclass(frozen=True)
class BorderBands:
    """Cover 1-4 edges with bands of a flat value or noise, up to ``max_width`` of the side: collimator edges,
    frames and scanner margins differ between hospitals and must not mean anything."""

    p: float = 0.5
    max_width: float = 0.12

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        out = image.copy()
        size = image.shape[0]
        for edge in rng.permutation(4)[: rng.integers(1, 5)]:
            width = int(rng.integers(1, max(2, int(self.max_width * size))))
            band = out[(np.s_[:width, :], np.s_[-width:, :], np.s_[:, :width], np.s_[:, -width:])[edge]]
            if rng.random() < 0.7:
                band[...] = rng.choice([0.0, 1.0, float(rng.uniform())])
            else:
                band[...] = rng.uniform(0.0, 1.0, band.shape)
        return out


MARKER_TEXTS = ("L", "R", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "1", "A", "B", "C", "->", "<-", "x")


@dataclass(frozen=True)
class BurnedInText:
    """Draw 1-3 markers (side letters, view labels, panel letters, arrows) in random places near the border, in
    white or black: COVID images from papers carry such marks, so a mark must not mean COVID."""

    p: float = 0.5
    texts: Sequence[str] = field(default=MARKER_TEXTS)
    border: float = 0.25

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        size = image.shape[0]
        pil = _to_pil(image)
        draw = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(1, 4))):
            font = ImageFont.load_default(size=float(rng.uniform(0.04, 0.12) * size))
            text = str(rng.choice(list(self.texts)))
            band = int(self.border * size)
            # Near one of the four edges, anywhere along it.
            along, across = rng.uniform(0, size * 0.85), rng.uniform(0, band)
            x, y = (along, across) if rng.random() < 0.5 else (across, along)
            if rng.random() < 0.5:
                x, y = (size - x - band * 0.5, y) if rng.random() < 0.5 else (x, size - y - band * 0.5)
            draw.text((x, y), text, fill=int(rng.choice([0, 255])), font=font)
        return _from_pil(pil)


@dataclass(frozen=True)
class Exposure:
    """Gamma, a random window (clip to percentiles, stretch back) and contrast/brightness: other scanners'
    exposures and export windows."""

    gamma: tuple[float, float] = (0.7, 1.45)
    window_p: float = 0.3
    window_clip: float = 0.08
    contrast: tuple[float, float] = (0.75, 1.25)
    brightness: float = 0.1

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.clip(image, 0.0, 1.0) ** rng.uniform(*self.gamma)
        if rng.random() < self.window_p:
            low = rng.uniform(0.0, self.window_clip)
            high = 1.0 - rng.uniform(0.0, self.window_clip)
            lo, hi = np.quantile(out, [low, high])
            out = (out - lo) / max(hi - lo, 1e-3)
        mean = out.mean()
        out = (out - mean) * rng.uniform(*self.contrast) + mean + rng.uniform(-self.brightness, self.brightness)
        return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Degrade:
    """At most one of: Gaussian blur, down-and-up resampling, JPEG re-encoding, additive noise, unsharp masking
    (the edge enhancement many scanners and exports apply)."""

    blur_p: float = 0.15
    resample_p: float = 0.15
    jpeg_p: float = 0.0
    noise_p: float = 0.0
    sharpen_p: float = 0.0
    jpeg_quality: tuple[int, int] = (25, 90)
    noise_sigma: tuple[float, float] = (0.01, 0.05)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = image.shape[0]
        roll = rng.random()
        edges = np.cumsum([self.blur_p, self.resample_p, self.jpeg_p, self.noise_p, self.sharpen_p])
        if roll < edges[0]:
            return _from_pil(_to_pil(image).filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 1.5))))
        if roll < edges[1]:
            low = max(32, int(size * rng.uniform(0.35, 0.7)))
            pil = _to_pil(image).resize((low, low), Image.Resampling.BILINEAR)
            return _from_pil(pil.resize((size, size), Image.Resampling.BILINEAR))
        if roll < edges[2]:
            buffer = io.BytesIO()
            _to_pil(image).save(buffer, format="JPEG", quality=int(rng.integers(*self.jpeg_quality)))
            return _from_pil(Image.open(io.BytesIO(buffer.getvalue())))
        if roll < edges[3]:
            noisy = image + rng.normal(0.0, rng.uniform(*self.noise_sigma), image.shape)
            return np.clip(noisy, 0.0, 1.0).astype(np.float32)
        if roll < edges[4]:
            radius, percent = rng.uniform(1.0, 3.0), int(rng.integers(50, 200))
            return _from_pil(_to_pil(image).filter(ImageFilter.UnsharpMask(radius, percent, threshold=2)))
        return image


def _central_box(size: int, side: tuple[float, float], jitter: float, rng: np.random.Generator) -> tuple[slice, slice]:
    """A random box of ``side`` share of each side of an S x S image, its centre jittered by up to ``jitter``."""
    height, width = (int(rng.uniform(*side) * size) for _ in range(2))
    cy, cx = (size / 2 + rng.uniform(-jitter, jitter) * size for _ in range(2))
    top, left = int(np.clip(cy - height / 2, 0, size - height)), int(np.clip(cx - width / 2, 0, size - width))
    return np.s_[top : top + height, left : left + width]


@dataclass(frozen=True)
class BlankLungs:
    """Hide a central box of ``side`` share of each side (its centre jittered by up to ``jitter``) under black, the
    image's mean or noise: what is left is borders, corners and markers only. Used for the counterfactual images
    of ``--blank-lungs``, which train towards the uniform distribution (see ``training.engine.EvidenceLoss``)."""

    side: tuple[float, float] = (0.45, 0.75)
    jitter: float = 0.05

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = image.copy()
        box = out[_central_box(image.shape[0], self.side, self.jitter, rng)]
        fill = rng.random()
        if fill < 0.4:
            box[...] = 0.0
        elif fill < 0.7:
            box[...] = float(image.mean())
        else:
            box[...] = rng.uniform(0.0, 1.0, box.shape)
        return out


@dataclass(frozen=True)
class SwapBorders:
    """Keep a central box of ``side`` share of each side (its centre jittered by up to ``jitter``) and take
    everything around it from ``donor``, another training image: the label stays the centre's. Borders, markers,
    body outline and exposure at the edges then come from a random hospital and class, so they cannot predict the
    label (``--swap-borders``; the probes' centre swap is the same idea at test time)."""

    side: tuple[float, float] = (0.5, 0.75)
    jitter: float = 0.05

    def __call__(self, image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = donor.copy()
        box = _central_box(image.shape[0], self.side, self.jitter, rng)
        out[box] = image[box]
        return out


@dataclass(frozen=True)
class Compose:
    """Apply transforms in order with one generator."""

    transforms: tuple[Transform, ...]

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.asarray(image, dtype=np.float32)
        for transform in self.transforms:
            out = transform(out, rng)
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def describe(self) -> list[dict[str, Any]]:
        """Every transform with its parameters, for config.json and the card."""
        return [{"op": type(t).__name__, **asdict(t)} for t in self.transforms]  # type: ignore[call-overload]


RECIPES: dict[str, Compose] = {
    "basic-v1": Compose(
        (
            Affine(),
            Degrade(),
            Exposure(gamma=(0.8, 1.25), window_p=0.0, contrast=(0.8, 1.2), brightness=0.1),
        )
    ),
    "shortcut-v2": Compose(
        (
            ResizedCrop(),
            Affine(degrees=10.0, shift=0.05, zoom=(0.95, 1.05)),
            ZoomOut(),
            BorderBands(),
            BurnedInText(),
            Exposure(),
            Degrade(blur_p=0.12, resample_p=0.15, jpeg_p=0.12, noise_p=0.1),
        )
    ),
    # basic-v1 plus what turned v4's Normal images into COVID when applied at test time (README, "v4's Normal
    # is one scanner's look"): a tighter field of view, edge enhancement and noise.
    "scanner-v3": Compose(
        (
            ResizedCrop(p=0.5, area=(0.6, 1.0), aspect=(0.85, 1.18)),
            Affine(),
            Degrade(blur_p=0.1, resample_p=0.1, jpeg_p=0.05, noise_p=0.15, sharpen_p=0.2),
            Exposure(gamma=(0.8, 1.25), window_p=0.0, contrast=(0.8, 1.2), brightness=0.1),
        )
    ),
}


def recipe(name: str) -> Compose:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"Unknown augmentation {name!r}; choose one of: {', '.join(RECIPES)}.") from None


def augment(image: np.ndarray, rng: np.random.Generator, name: str = "basic-v1") -> np.ndarray:
    """A random, label-preserving variant of a uint8 (or [0, 1] float) S x S image; float32 in [0, 1]."""
    array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    return recipe(name)(array, rng)
