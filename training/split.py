"""Leakage-free, stratified, seeded train/val/test split.

Exact duplicates (same decoded pixels) and near-duplicates (perceptual hashes within a small Hamming
distance) are grouped, and a group never straddles two splits, so the test set holds no copy of a training
image. The split is written to ``split.csv`` and reused on later runs so results compare like with like.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from training.data import Sample

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# 64-bit pHash: re-encoded, resized or re-windowed copies differ by 0-2 bits. Chest X-rays are alike at low
# frequencies: on cxr-dev, distinct images with different labels already meet at 4 bits, so stop below that.
NEAR_DUPLICATE_BITS = 3


def perceptual_hash_bits(images: np.ndarray) -> np.ndarray:
    """The 64 pHash bits of each uint8 image (N x H x W) as an N x 64 bool array."""
    import imagehash
    from PIL import Image

    return np.stack([imagehash.phash(Image.fromarray(image)).hash.flatten() for image in images])


def duplicate_groups(images: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """Group id per image (the smallest index in its group); exact copies (distance 0) and near duplicates,
    transitively, share a group."""
    bits = perceptual_hash_bits(images)
    n = len(bits)
    rows: list[int] = []
    cols: list[int] = []
    for i in range(n - 1):
        near = i + 1 + np.nonzero(np.count_nonzero(bits[i + 1 :] != bits[i], axis=1) <= max_bits)[0]
        rows += [i] * len(near)
        cols += near.tolist()
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    first_member: dict[int, int] = {}
    return np.array([first_member.setdefault(int(c), i) for i, c in enumerate(component)])


def stratified_group_split(
    labels: Sequence[str], groups: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> list[str]:
    """Assign 'train' / 'val' / 'test' per sample, stratified by label, groups kept whole."""
    y = np.asarray(labels)
    assignment = np.full(len(y), "train", dtype=object)
    test_folds = max(2, round(1 / test_fraction))
    splitter = StratifiedGroupKFold(n_splits=test_folds, shuffle=True, random_state=seed)
    rest, test = next(splitter.split(np.zeros(len(y)), y, groups))
    assignment[test] = "test"
    val_folds = max(2, round((1 - test_fraction) / val_fraction))
    splitter = StratifiedGroupKFold(n_splits=val_folds, shuffle=True, random_state=seed + 1)
    _, val = next(splitter.split(np.zeros(len(rest)), y[rest], groups[rest]))
    assignment[rest[val]] = "val"
    return [str(s) for s in assignment]


def write_split(path: Path, samples: Sequence[Sample], splits: Sequence[str], groups: np.ndarray) -> None:
    with Path(path).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split", "group"])
        for sample, split, group in zip(samples, splits, groups, strict=True):
            writer.writerow([sample.path, sample.label, split, int(group)])


def read_split(path: Path) -> tuple[list[Sample], list[str], np.ndarray]:
    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    samples = [Sample(r["path"], r["label"]) for r in rows]
    return samples, [r["split"] for r in rows], np.array([int(r["group"]) for r in rows])


def split_hash(path: Path) -> str:
    """sha256 of the split manifest: two runs with the same hash used the same split."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
