"""Dataset discovery and the in-memory image cache.

Accepted layouts (labels normalised with service.model.labels):
  * Kaggle COVID-19 Radiography Database: ``ROOT/<Class>/images/*.png`` (masks/ folders are ignored)
  * flat: ``ROOT/<Class>/*.{png,jpg,jpeg,dcm}``
  * a CSV manifest with columns ``path,label`` and optionally ``source`` (paths relative to the CSV's folder or
    absolute)

Every image has a ``source`` (the collection it came from): a manifest's or ``provenance.csv``'s ``source`` column
where there is one, else the ``<source>__`` prefix of its file name, else the dataset folder's name. Several
datasets can be read at once; their paths are then relative to the folder that holds them all.
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


SOURCE_SEPARATOR = "__"


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the dataset root when possible, so manifests are portable
    label: str
    source: str = ""


class DatasetError(ValueError):
    """The dataset folder or manifest cannot be used."""


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def source_from_name(path: str, fallback: str) -> str:
    """The ``<source>__`` prefix of a file name, or ``fallback`` when it has none."""
    stem = Path(path).name
    return stem.split(SOURCE_SEPARATOR, 1)[0] if SOURCE_SEPARATOR in stem else fallback


def _provenance_sources(folder: Path) -> dict[str, str]:
    """``file -> source`` from a dataset's provenance.csv when it has a ``source`` column."""
    path = folder / "provenance.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"file", "source"} <= set(reader.fieldnames):
            return {}
        return {row["file"]: row["source"] for row in reader}


def data_root(sources: Sequence[Path]) -> Path:
    """The folder sample paths are relative to: a manifest's or dataset's own folder, or the common parent of
    several."""
    folders = [Path(p).parent if Path(p).is_file() else Path(p) for p in sources]
    if len(folders) == 1:
        return folders[0]
    return Path(os.path.commonpath([f.resolve() for f in folders]))


def discover_all(sources: Sequence[Path]) -> list[Sample]:
    """Samples of one or several datasets, paths relative to :func:`data_root` of them all."""
    root = data_root(sources)
    samples: list[Sample] = []
    for source in sources:
        prefix = Path(source).resolve().relative_to(root.resolve()) if len(sources) > 1 else Path()
        if Path(source).is_file():
            prefix = prefix.parent
        samples += [
            Sample((prefix / s.path).as_posix() if not Path(s.path).is_absolute() else s.path, s.label, s.source)
            for s in discover(Path(source))
        ]
    paths = [s.path for s in samples]
    if len(set(paths)) != len(paths):
        raise DatasetError("The datasets list some images twice; give each folder once.")
    return samples


def discover(source: Path) -> list[Sample]:
    """List labelled images from a dataset folder (Kaggle or flat layout) or a CSV manifest."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return _from_manifest(source)
    if not source.is_dir():
        raise DatasetError(f"Dataset {source} is neither a folder nor a CSV manifest.")
    samples: list[Sample] = []
    provenance = _provenance_sources(source)
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        try:
            label = canonical_label(class_dir.name)
        except UnknownLabelError:
            logger.info("skipping folder %s: not a class name", class_dir.name)
            continue
        # Kaggle layout keeps images in CLASS/images and segmentation masks in CLASS/masks.
        folder = class_dir / "images" if (class_dir / "images").is_dir() else class_dir
        for path in _images_in(folder):
            relative = path.relative_to(source).as_posix()
            origin = provenance.get(relative) or source_from_name(relative, source.name)
            samples.append(Sample(relative, label, origin))
    if not samples:
        raise DatasetError(f"No labelled images found under {source} (expected CLASS/*.png or CLASS/images/*.png).")
    return samples


def _from_manifest(manifest: Path) -> list[Sample]:
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError(f"Manifest {manifest} needs the columns 'path' and 'label'.")
        samples = [
            Sample(
                row["path"],
                canonical_label(row["label"]),
                row.get("source") or source_from_name(row["path"], manifest.parent.name),
            )
            for row in reader
        ]
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
