"""Last-layer re-training on frozen features (DFR: Kirichenko, Izmailov & Wilson, ICLR 2023), against the borders.

A network trained on collections where the class follows the hospital learns lung evidence and border, marker and
exposure cues in the same pooled features. Re-fitting only its final linear layer, a multinomial logistic
regression on the frozen features, keeps what the features know and lets the fit choose what to read: it sees the
augmented training images (weighted by class and source, as over-sampling does) and, for each, a blank-lungs
counterfactual (its centre hidden, :class:`training.augment.BlankLungs`) whose target is the uniform distribution
(one copy per class at 1/C of its weight: the same cross-entropy to uniform as ``EvidenceLoss``). Directions that
tell the class from the borders alone then cost the fit and lose weight. The body is untouched, so the pooled
features, and the bundle's gate fitted on them, stay as they were.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from service.model.backbones import LogitsAndFeatures
from service.model.preprocess import PreprocessSpec, preprocess
from training.augment import BlankLungs, augment

logger = logging.getLogger(__name__)
FEATURE_BATCH = 64
_PASS_EPOCH = 10_000  # augmentation streams of the head's passes, apart from the fit's epochs (seed, epoch, index)


@dataclass(frozen=True)
class HeadData:
    """Pooled features of the training images (clean, then each augmented pass) and of their blanked copies."""

    features: np.ndarray  # N x D
    labels: np.ndarray  # N
    weights: np.ndarray  # N, mean 1
    blanked: np.ndarray  # M x D, no labels: their target is uniform


def _augmented(images: np.ndarray, recipe: str, seed: int, passes: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(augmented image, its blank-lungs copy) for every image, ``passes`` times, seeded like ``CachedImages``."""
    for p in range(passes):
        for index, image in enumerate(images):
            rng = np.random.default_rng((seed, _PASS_EPOCH + p, index))
            shown = augment(image, rng, recipe)
            yield shown, BlankLungs()(shown, rng)


def pooled_features(
    model: torch.nn.Module, arch: str, images: Iterator[np.ndarray], spec: PreprocessSpec
) -> np.ndarray:
    """The input of ``model``'s final layer for 2-D [0, 1] images, in batches (eval mode, CPU, fp32)."""
    body = LogitsAndFeatures(model.cpu().eval(), arch)
    rows, batch, started = [], [], time.perf_counter()
    with torch.no_grad():
        for image in images:
            batch.append(image)
            if len(batch) == FEATURE_BATCH:
                rows.append(body(torch.from_numpy(preprocess(batch, spec)))[1].numpy())
                batch = []
        if batch:
            rows.append(body(torch.from_numpy(preprocess(batch, spec)))[1].numpy())
    features = np.concatenate(rows).astype(np.float32)
    logger.info("features of %d images in %.0fs", len(features), time.perf_counter() - started)
    return features


def head_data(
    model: torch.nn.Module,
    arch: str,
    images: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    spec: PreprocessSpec,
    *,
    recipe: str,
    seed: int,
    passes: int,
) -> HeadData:
    """Features of uint8 S x S ``images`` as they are and in ``passes`` augmented passes (with blanked copies)."""
    clean = pooled_features(model, arch, (i.astype(np.float32) / 255.0 for i in images), spec)
    # Each augmented image followed by its blanked copy, made as they are scored (not all held in memory).
    both = pooled_features(model, arch, (x for pair in _augmented(images, recipe, seed, passes) for x in pair), spec)
    shown, blanked = both[0::2], both[1::2]
    repeat = passes + 1
    return HeadData(
        np.concatenate([clean, shown]),
        np.tile(labels, repeat),
        np.tile(weights / weights.mean(), repeat),
        blanked,
    )


def fit_head(data: HeadData, n_classes: int, *, c: float, blank_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight C x D, bias C) of the re-fitted final layer, in the features' own units.

    c: inverse L2 strength of the logistic regression on standardised features. blank_weight: the blanked
    images' total weight against the others' (0: plain DFR on augmented images)."""
    x, y, w = data.features, data.labels, data.weights
    if blank_weight > 0:
        per_copy = blank_weight * w.sum() / len(data.blanked) / n_classes
        x = np.concatenate([x, *([data.blanked] * n_classes)])
        y = np.concatenate([y, *(np.full(len(data.blanked), k) for k in range(n_classes))])
        w = np.concatenate([w, np.full(len(data.blanked) * n_classes, per_copy)])
    mean, scale = x.mean(0), x.std(0) + 1e-6
    model = LogisticRegression(C=c, max_iter=3000, tol=1e-5).fit((x - mean) / scale, y, sample_weight=w)
    weight = model.coef_ / scale
    return weight.astype(np.float32), (model.intercept_ - weight @ mean).astype(np.float32)
