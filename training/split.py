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
from sklearn.model_selection import StratifiedGroupKFold

from training.data import Sample

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# 64-bit pHash: re-encoded, resized or re-windowed copies differ by 0-2 bits. Chest X-rays are alike at low
# frequencies: on cxr-dev, distinct images with different labels already meet at 4 bits, so stop below that.
NEAR_DUPLICATE_BITS = 3


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """64-bit pHash of each uint8 image (N x H x W) as uint64."""
    import imagehash
    from PIL import Image

    hashes = np.empty(len(images), dtype=np.uint64)
    for i, image in enumerate(images):
        bits = imagehash.phash(Image.fromarray(image)).hash.flatten()
        hashes[i] = np.uint64(int("".join("1" if b else "0" for b in bits), 2))
    return hashes


def duplicate_groups(images: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """Group id per image; images that are exact or near duplicates (transitively) share a group."""
    n = len(images)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    exact: dict[bytes, int] = {}
    for i, image in enumerate(images):
        key = hashlib.sha256(image.tobytes()).digest()
        if key in exact:
            union(exact[key], i)
        else:
            exact[key] = i
    hashes = perceptual_hashes(images)
    bits = np.unpackbits(hashes.view(np.uint8).reshape(n, 8), axis=1).astype(np.uint8)
    for i in range(n - 1):
        distances = np.count_nonzero(bits[i + 1 :] != bits[i], axis=1)
        for j in np.nonzero(distances <= max_bits)[0]:
            union(i, i + 1 + int(j))
    return np.array([find(i) for i in range(n)])


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
