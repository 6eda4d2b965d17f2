"""Leakage-free, stratified, seeded split, with whole sources held out.

Images of the held-out sources form ``heldout_val`` (selection: early stopping, winner, temperature) and
``heldout_test`` (reported; with ``heldout_val`` it sets the operating point); the network never trains on those
collections. The other sources' images are split into train / val / test, stratified by label.

Exact duplicates (same decoded pixels) and near-duplicates (perceptual hashes within a small Hamming distance)
are grouped, and a group never straddles two splits, so the test set holds no copy of a training image. The split
is written to ``split.csv`` and reused on later runs so results compare like with like.
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

from training.data import Sample, source_from_name

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "heldout_val", "heldout_test")
HELDOUT_SPLITS = ("heldout_val", "heldout_test")
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


def kept_splits(samples: Sequence[Sample], earlier: Path) -> dict[int, str]:
    """Index -> split for the samples an earlier split.csv lists (matched by path, or by a path that ends with
    the earlier one, so a one-folder split can be reused when several folders are read)."""
    old_samples, old_splits, _ = read_split(earlier)
    by_name = {Path(s.path).name: (s.path, split) for s, split in zip(old_samples, old_splits, strict=True)}
    kept: dict[int, str] = {}
    for i, sample in enumerate(samples):
        match = by_name.get(Path(sample.path).name)
        if match and (sample.path == match[0] or sample.path.endswith("/" + match[0])):
            kept[i] = match[1]
    return kept


def assign_splits(
    samples: Sequence[Sample],
    groups: np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    heldout_val_sources: Sequence[str] = (),
    heldout_test_sources: Sequence[str] = (),
    kept: dict[int, str] | None = None,
) -> list[str]:
    """The split of every sample: held-out sources first, then ``kept`` assignments, then a stratified group split
    of the rest. A duplicate group follows its held-out or kept member, so no group straddles two splits."""
    heldout = {s: "heldout_val" for s in heldout_val_sources} | {s: "heldout_test" for s in heldout_test_sources}
    fixed: dict[int, str] = {}  # group -> split
    for i, sample in enumerate(samples):
        if sample.source in heldout:
            fixed.setdefault(int(groups[i]), heldout[sample.source])
    for i, split in (kept or {}).items():
        fixed.setdefault(int(groups[i]), split)
    assignment = [fixed.get(int(g), "") for g in groups]
    free = np.array([i for i, a in enumerate(assignment) if not a], dtype=int)
    if len(free):
        rest = stratified_group_split([samples[i].label for i in free], groups[free], val_fraction, test_fraction, seed)
        for i, split in zip(free, rest, strict=True):
            assignment[i] = split
    return assignment


def write_split(path: Path, samples: Sequence[Sample], splits: Sequence[str], groups: np.ndarray) -> None:
    with Path(path).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split", "group", "source"])
        for sample, split, group in zip(samples, splits, groups, strict=True):
            writer.writerow([sample.path, sample.label, split, int(group), sample.source])


def read_split(path: Path) -> tuple[list[Sample], list[str], np.ndarray]:
    """Samples, split names and duplicate groups of a split.csv (files without a source column are read too)."""
    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    samples = [Sample(r["path"], r["label"], r.get("source") or source_from_name(r["path"], "")) for r in rows]
    return samples, [r["split"] for r in rows], np.array([int(r["group"]) for r in rows])


def split_hash(path: Path) -> str:
    """sha256 of the split manifest: two runs with the same hash used the same split."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
