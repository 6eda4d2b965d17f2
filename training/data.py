"""Dataset discovery and the in-memory image cache.

Accepted layouts (labels normalised with service.model.labels):
  * Kaggle COVID-19 Radiography Database: ``ROOT/<Class>/images/*.png`` (masks/ folders are ignored)
  * flat: ``ROOT/<Class>/*.{png,jpg,jpeg,dcm}``
  * a CSV manifest with columns ``path,label`` (paths relative to the CSV's folder or absolute)
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.model.imaging import decode_image
from service.model.labels import UnknownLabelError, canonical_label
from service.model.preprocess import resize_gray

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the dataset root when possible, so manifests are portable
    label: str


class DatasetError(ValueError):
    """The dataset folder or manifest cannot be used."""


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def discover(source: Path) -> list[Sample]:
    """List labelled images from a dataset folder (Kaggle or flat layout) or a CSV manifest."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return _from_manifest(source)
    if not source.is_dir():
        raise DatasetError(f"Dataset {source} is neither a folder nor a CSV manifest.")
    samples: list[Sample] = []
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        try:
            label = canonical_label(class_dir.name)
        except UnknownLabelError:
            logger.info("skipping folder %s: not a class name", class_dir.name)
            continue
        # Kaggle layout keeps images in CLASS/images and segmentation masks in CLASS/masks.
        folder = class_dir / "images" if (class_dir / "images").is_dir() else class_dir
        for path in _images_in(folder):
            samples.append(Sample(path.relative_to(source).as_posix(), label))
    if not samples:
        raise DatasetError(
            f"No labelled images found under {source} (expected CLASS/*.png or CLASS/images/*.png)."
        )
    return samples


def _from_manifest(manifest: Path) -> list[Sample]:
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError(f"Manifest {manifest} needs the columns 'path' and 'label'.")
        samples = [Sample(row["path"], canonical_label(row["label"])) for row in reader]
    if not samples:
        raise DatasetError(f"Manifest {manifest} lists no images.")
    return samples


def resolve(root: Path, sample_path: str) -> Path:
    """Absolute path of a sample: manifests and folders store paths relative to ``root``."""
    path = Path(sample_path)
    return path if path.is_absolute() else Path(root) / path


def _load_one(args: tuple[str, int]) -> np.ndarray:
    path, size = args
    decoded = decode_image(Path(path).read_bytes())
    square = resize_gray(decoded.array, (size, size))  # the preprocess geometry, done once
    return (np.clip(square, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def load_images(paths: Sequence[Path], size: int, workers: int | None = None) -> np.ndarray:
    """Decode every image once (in parallel) into an N x S x S uint8 cache in the network's geometry."""
    workers = workers or max(1, min(16, (os.cpu_count() or 1)))
    jobs = [(str(p), size) for p in paths]
    if workers == 1 or len(jobs) < 64:
        arrays = [_load_one(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            arrays = list(pool.map(_load_one, jobs, chunksize=32))
    return np.stack(arrays) if arrays else np.zeros((0, size, size), np.uint8)
