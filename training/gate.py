"""Building the "is this a chest X-ray?" gate of a bundle (the maths and the file live in service.model.gate).

    synthetic_negatives(rng, n_per_kind, xrays)   junk that is not a chest radiograph, made on the fly
    fit_bundle_gate(bundle_dir, fit, calib, seed) features through the bundle -> fit -> threshold -> gate file
                                                  + the card's ``gate`` field and its checksum

The negatives are made, never read from disk, so a benchmark on real non-chest images (``../shared/data/not-cxr``)
judges the gate on kinds it was not fitted on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from service.model.bundle import LoadedBundle, load_bundle, ort_logits_and_features, read_card, write_card
from service.model.gate import DEFAULT_TARGET_PASS_RATE, GATE_FILE, fit_gate, save_gate
from service.model.preprocess import preprocess

logger = logging.getLogger(__name__)

_WORDS = (
    "patient",
    "report",
    "findings",
    "the",
    "of",
    "and",
    "chest",
    "result",
    "figure",
    "table",
    "page",
    "value",
    "mean",
    "total",
    "sample",
    "score",
    "method",
    "analysis",
    "data",
    "control",
    "group",
    "model",
    "image",
    "section",
    "study",
    "2020",
    "0.95",
    "p",
    "<",
    "0.001",
    "n",
    "=",
    "42",
    "abstract",
)


def _size(rng: np.random.Generator, lo: int = 96, hi: int = 512) -> tuple[int, int]:
    """A random (height, width), aspect ratio between 1:2 and 2:1."""
    short = int(rng.integers(lo, hi))
    long = int(short * rng.uniform(1.0, 2.0))
    return (short, long) if rng.random() < 0.5 else (long, short)


def unit_range(a: np.ndarray) -> np.ndarray:
    """``a`` min-max scaled to float32 [0, 1] (all zeros when it is constant)."""
    a = np.asarray(a, dtype=np.float64)
    span = a.max() - a.min()
    return ((a - a.min()) / span if span > 0 else np.zeros_like(a)).astype(np.float32)


def _noise_uniform(rng: np.random.Generator, _: Sequence[np.ndarray]) -> np.ndarray:
    lo = rng.uniform(0.0, 0.5)
    return rng.uniform(lo, rng.uniform(lo + 0.1, 1.0), _size(rng)).astype(np.float32)


def _noise_gaussian(rng: np.random.Generator, _: Sequence[np.ndarray]) -> np.ndarray:
    image = rng.normal(rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3), _size(rng))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _blank(rng: np.random.Generator, _: Sequence[np.ndarray]) -> np.ndarray:
    image = np.full(_size(rng), rng.uniform(0.0, 1.0)) + rng.normal(0.0, rng.uniform(0.0, 0.01), (1, 1))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _gradient(rng: np.random.Generator, _: Sequence[np.ndarray]) -> np.ndarray:
    h, w = _size(rng)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        image = np.cos(angle) * xx + np.sin(angle) * yy
    else:
        cy, cx = rng.uniform(0, h / max(h, w)), rng.uniform(0, w / max(h, w))
        image = np.hypot(yy - cy, xx - cx)
        if rng.random() < 0.5:
            image = -image
    return unit_range(image) * rng.uniform(0.5, 1.0) + rng.uniform(0.0, 0.2)


def _text(rng: np.random.Generator, _: Sequence[np.ndarray]) -> np.ndarray:
    """A page of words (dark on light, sometimes light on dark), like a document or a screenshot."""
    h, w = _size(rng, 200, 700)
    paper, ink = (255, int(rng.integers(0, 80))) if rng.random() < 0.8 else (int(rng.integers(0, 60)), 255)
    page = Image.new("L", (w, h), paper)
    draw = ImageDraw.Draw(page)
    font_size = int(rng.integers(8, 28))
    try:
        font: ImageFont.FreeTypeFont | ImageFont.ImageFont = ImageFont.load_default(size=font_size)
    except (OSError, TypeError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    y = int(rng.integers(4, 30))
    while y < h - font_size:
        line = " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 14))))
        draw.text((int(rng.integers(4, 40)), y), line, fill=ink, font=font)
        y += int(font_size * rng.uniform(1.2, 2.2))
    return np.asarray(page, dtype=np.float32) / 255.0


def _texture(rng: np.random.Generator, _: Sequence[np.ndarray]) -> np.ndarray:
    """1/f^a noise: the power spectrum of natural photographs (a in 1.5..3 from fine grain to smooth scenes)."""
    h, w = _size(rng)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    radius = np.hypot(fy, fx)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)) / radius ** rng.uniform(1.5, 3.0)
    spectrum[0, 0] = 0.0
    image = unit_range(np.fft.irfft2(spectrum, s=(h, w)))
    return np.clip(image * rng.uniform(0.6, 1.2) + rng.uniform(-0.2, 0.3), 0.0, 1.0).astype(np.float32)


def _shapes(rng: np.random.Generator, _: Sequence[np.ndarray]) -> np.ndarray:
    """Filled ellipses, rectangles and lines on a plain background, blurred a little: a scene or a drawing."""
    h, w = _size(rng)
    canvas = Image.new("L", (w, h), int(rng.integers(0, 256)))
    draw = ImageDraw.Draw(canvas)
    for _shape in range(int(rng.integers(3, 25))):
        x0, x1 = sorted(rng.integers(0, w, 2).tolist())
        y0, y1 = sorted(rng.integers(0, h, 2).tolist())
        fill = int(rng.integers(0, 256))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.line((x0, y0, x1, y1), fill=fill, width=int(rng.integers(1, 8)))
    canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 3.0))))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _pick_xray(rng: np.random.Generator, xrays: Sequence[np.ndarray]) -> np.ndarray:
    if not xrays:
        raise ValueError("inverted and cropped X-ray negatives need real X-ray images")
    return np.asarray(xrays[int(rng.integers(len(xrays)))], dtype=np.float32)


def _inverted_xray(rng: np.random.Generator, xrays: Sequence[np.ndarray]) -> np.ndarray:
    return (1.0 - _pick_xray(rng, xrays)).astype(np.float32)


def _cropped_xray(rng: np.random.Generator, xrays: Sequence[np.ndarray]) -> np.ndarray:
    """A tight crop (15-35 % of each side) of an X-ray, blown up: a detail, not a chest radiograph."""
    image = _pick_xray(rng, xrays)
    h, w = image.shape
    ch, cw = max(8, int(h * rng.uniform(0.15, 0.35))), max(8, int(w * rng.uniform(0.15, 0.35)))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(np.ascontiguousarray(image[y : y + ch, x : x + cw]), mode="F")
    return np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32).clip(0.0, 1.0)


NEGATIVE_KINDS: dict[str, Callable[[np.random.Generator, Sequence[np.ndarray]], np.ndarray]] = {
    "noise_uniform": _noise_uniform,
    "noise_gaussian": _noise_gaussian,
    "blank": _blank,
    "gradient": _gradient,
    "text": _text,
    "texture": _texture,
    "shapes": _shapes,
    "inverted_xray": _inverted_xray,
    "cropped_xray": _cropped_xray,
}
XRAY_KINDS = ("inverted_xray", "cropped_xray")


def synthetic_negatives(
    rng: np.random.Generator,
    n_per_kind: int,
    xrays: Sequence[np.ndarray] = (),
    kinds: Sequence[str] | None = None,
) -> list[tuple[str, np.ndarray]]:
    """``n_per_kind`` images of every kind in ``NEGATIVE_KINDS`` (or ``kinds``), as (kind, 2-D float32 [0, 1]).

    ``xrays`` (2-D float [0, 1] chest X-rays) are needed for the inverted and cropped kinds; without them those
    kinds are left out unless asked for by name.
    """
    chosen = list(kinds) if kinds is not None else [k for k in NEGATIVE_KINDS if xrays or k not in XRAY_KINDS]
    unknown = [k for k in chosen if k not in NEGATIVE_KINDS]
    if unknown:
        raise ValueError(f"Unknown negative kind(s) {unknown}; choose from {', '.join(NEGATIVE_KINDS)}.")
    return [
        (kind, np.clip(NEGATIVE_KINDS[kind](rng, xrays), 0.0, 1.0).astype(np.float32))
        for kind in chosen
        for _ in range(n_per_kind)
    ]


# --------------------------------------------------------------------------- fitting a bundle's gate

FEATURE_BATCH = 16
# Enough for a shared covariance of 1024 features (with shrinkage); more only lengthens the export.
MAX_FIT_IMAGES = 2000
N_NEGATIVES_PER_KIND = 8


def bundle_features(
    bundle: LoadedBundle, images: Sequence[np.ndarray], batch_size: int = FEATURE_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """(logits N x C, pooled features N x D) of 2-D [0, 1] images through the bundle's ONNX graph."""
    spec = bundle.card.spec
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        batch = preprocess([np.asarray(a, dtype=np.float32) for a in images[start : start + batch_size]], spec)
        batch_logits, batch_features = ort_logits_and_features(bundle.session, batch)
        logits.append(batch_logits)
        features.append(batch_features)
    if not logits:
        raise ValueError("No images given.")
    return np.concatenate(logits), np.concatenate(features)


def fit_bundle_gate(
    bundle_dir: str | Path,
    fit_images: Sequence[np.ndarray],
    calibration_images: Sequence[np.ndarray],
    seed: int = 0,
    *,
    fit_labels: Sequence[int] | np.ndarray | None = None,
    calibration_sources: Sequence[str] | None = None,
    target_pass_rate: float = DEFAULT_TARGET_PASS_RATE,
    max_fit: int | None = MAX_FIT_IMAGES,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict[str, Any]:
    """Fit the gate of the bundle at ``bundle_dir``, write ``gate.safetensors`` and record it in the card.

    fit_images: training chest X-rays (2-D float32 in [0, 1], any size); ``fit_labels`` their class indices in
        the card's order (default: the network's own argmax, which is what the gate sees at serving time).
    calibration_images: held-out real chest X-rays (not in training); the threshold lets ``target_pass_rate``
        of them pass. The more sources they come from, the fewer real X-rays from elsewhere are refused.
    calibration_sources: the source of each calibration image; given, ``target_pass_rate`` of every source passes
        (see ``service.model.gate.fit_gate``).
    seed: for the synthetic negatives, which are only measured (never fitted): the card records their refused
        share so a gate that fails to refuse obvious junk is visible at export; and for the subsample of at most
        ``max_fit`` fit images (None: all), which bounds the time the export spends on features.
    providers: onnxruntime providers for the feature pass (CUDA first makes it quick on a GPU machine).

    Returns the card's new ``gate`` field. The card's checksums gain the gate file's sha256.
    """
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir, providers, with_torch=False, with_gate=False)
    rng = np.random.default_rng(seed)
    if fit_labels is not None and len(fit_labels) != len(fit_images):
        raise ValueError(f"{len(fit_images)} fit images but {len(fit_labels)} labels.")
    chosen = np.arange(len(fit_images))
    if max_fit is not None and len(fit_images) > max_fit:
        chosen = np.sort(rng.permutation(len(fit_images))[:max_fit])
    fit_logits, fit_features = bundle_features(bundle, [fit_images[int(i)] for i in chosen])
    labels = np.argmax(fit_logits, axis=1) if fit_labels is None else np.asarray(fit_labels)[chosen]
    _, calibration_features = bundle_features(bundle, calibration_images)
    gate = fit_gate(fit_features, labels, calibration_features, target_pass_rate, calibration_sources)

    xray_sample = [fit_images[int(i)] for i in rng.permutation(chosen)[:64]]
    negatives = synthetic_negatives(rng, N_NEGATIVES_PER_KIND, xray_sample)
    _, negative_features = bundle_features(bundle, [image for _, image in negatives])
    negative_refused = gate.refused(negative_features)
    kinds = np.array([kind for kind, _ in negatives])
    calibration_passed = float(np.mean(~gate.refused(calibration_features)))

    sha = save_gate(gate, bundle_dir / GATE_FILE)
    record: dict[str, Any] = {
        **gate.describe(),
        "file": GATE_FILE,
        "labels": "given" if fit_labels is not None else "network argmax",
        "n_fit": len(chosen),
        "n_calibration": len(calibration_images),
        "calibration_pass_rate": calibration_passed,
        "synthetic_negatives_refused": float(np.mean(negative_refused)),
        "synthetic_negatives_refused_by_kind": {
            kind: float(np.mean(negative_refused[kinds == kind])) for kind in NEGATIVE_KINDS if kind in kinds
        },
        "seed": seed,
    }
    card = read_card(bundle_dir)
    card.gate = record
    card.sha256 = {**card.sha256, GATE_FILE: sha}
    write_card(bundle_dir, card)
    logger.info(
        "gate fitted on %d images, threshold %.2f: %.1f %% of %d calibration X-rays pass, %.1f %% of synthetic "
        "negatives refused",
        len(chosen),
        gate.threshold,
        100 * calibration_passed,
        len(calibration_images),
        100 * record["synthetic_negatives_refused"],
    )
    return record
