"""Shortcut probes: does the network read the lungs, or borders, markers and resolution?

Each probe changes the images in one way and scores them again with the same scorer:

  * ``borders_only`` — the central 60 % (of width and of height) blacked out. A network that reads the lungs
    should fall to chance: positive-vs-rest AUC near 0.5, balanced accuracy near 1 / C.
  * ``centre_only``  — everything but that central box blacked out: how much the lungs alone carry.
  * ``centre_swap``  — the central box of another image of a different class pasted into each image's borders: the
    share of answers that follow the centre's label against the share that follow the borders'. Unlike the
    blanked probes it leaves no black box to recognise (``--blank-lungs`` trains on hidden centres).
  * ``flip``         — mirrored left-right: the share of answers that change (mirrored films are rare; a network
    that reads anatomy changes its answer for few of them).
  * ``roundtrip_64`` — down to 64 px and back: the share of answers that change (resolution as a cue).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

Scorer = Callable[[Sequence[np.ndarray]], np.ndarray]  # 2-D [0, 1] images -> N x C probabilities
CENTRE_SHARE = 0.6


def centre_box(shape: tuple[int, int], share: float = CENTRE_SHARE) -> tuple[slice, slice]:
    height, width = shape
    dy, dx = round(height * (1 - share) / 2), round(width * (1 - share) / 2)
    return slice(dy, height - dy), slice(dx, width - dx)


def borders_only(image: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[centre_box(image.shape)] = 0.0
    return out


def centre_only(image: np.ndarray) -> np.ndarray:
    out = np.zeros_like(image)
    box = centre_box(image.shape)
    out[box] = image[box]
    return out


def swap_centre(borders: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``borders`` with its central box replaced by ``centre``'s central box, resized to fit."""
    out = borders.copy()
    box = centre_box(borders.shape)
    height, width = out[box].shape
    patch = Image.fromarray(centre[centre_box(centre.shape)].astype(np.float32), mode="F")
    out[box] = np.asarray(patch.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32).clip(0.0, 1.0)
    return out


def flip(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1])


def roundtrip(image: np.ndarray, side: int = 64) -> np.ndarray:
    height, width = image.shape
    small = Image.fromarray(image.astype(np.float32), mode="F").resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(small.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32).clip(0.0, 1.0)


def _separation(y_true: np.ndarray, probabilities: np.ndarray, positive: int) -> dict[str, float | None]:
    is_positive = y_true == positive
    auc = float(roc_auc_score(is_positive, probabilities[:, positive])) if 0 < is_positive.sum() < len(y_true) else None
    return {
        "positive_vs_rest_auc": auc,
        "balanced_accuracy": float(balanced_accuracy_score(y_true, probabilities.argmax(1))),
    }


def shortcut_probes(
    score: Scorer, images: Sequence[np.ndarray], y_true: np.ndarray, positive: int, n_classes: int
) -> dict[str, Any]:
    """All four probes on ``images`` (2-D float32 [0, 1], any size) with labels ``y_true``."""
    base = score(images)
    base_labels = base.argmax(1)
    result: dict[str, Any] = {
        "n": len(images),
        "chance_balanced_accuracy": 1.0 / n_classes,
        "centre_share": CENTRE_SHARE,
        "original": _separation(y_true, base, positive),
    }
    for name, transform in (("borders_only", borders_only), ("centre_only", centre_only)):
        result[name] = _separation(y_true, score([transform(i) for i in images]), positive)
    # Each image's borders get the centre of the next image (in a fixed shuffle) of another class.
    order = np.random.default_rng(0).permutation(len(images))
    pairs = [(int(i), int(j)) for i, j in zip(order, np.roll(order, -1), strict=True) if y_true[i] != y_true[j]]
    if pairs:
        swapped = score([swap_centre(images[i], images[j]) for i, j in pairs]).argmax(1)
        result["centre_swap"] = {
            "pairs": len(pairs),
            "follows_centre": float(np.mean([p == y_true[j] for p, (_, j) in zip(swapped, pairs, strict=True)])),
            "follows_borders": float(np.mean([p == y_true[i] for p, (i, _) in zip(swapped, pairs, strict=True)])),
        }
    for name, transform in (("flip", flip), ("roundtrip_64", roundtrip)):
        changed = score([transform(i) for i in images]).argmax(1) != base_labels
        result[name] = {"changed_share": float(changed.mean())}
    return result
