"""The "is this a chest X-ray?" gate: its maths and its file (numpy and safetensors only, no torch).

The gate scores an image from the network's pooled features (the classifier's input; the ONNX output
``features``, from the same forward pass as the logits) with two Gaussian models of the training X-rays, both on
square-rooted features (pooled ReLU activations are skewed; their roots are closer to Gaussian) with
Ledoit-Wolf-shrunk covariances (fewer images than feature dimensions):

- ``shared``: the Mahalanobis distance to the nearest class mean with one covariance for all classes (Lee et al.
  2018, "A simple unified framework for detecting out-of-distribution samples");
- ``per class``: the same with each class's own covariance, which notices an image that is close to a class mean
  along directions where that class does not vary (brain MR slices, which the shared model let through on a
  network fine-tuned on more sources).

Each distance is divided by its own threshold (``scales``) and the score is the larger of the two: an image is
refused when either model would refuse it. The threshold on that score is chosen on held-out real chest X-rays so
that a stated share of them (``target_pass_rate``, 99 % by default) pass. All of it is fitted at export
(``training.gate.fit_bundle_gate``) and saved in ``gate.safetensors`` inside the bundle; the card's ``gate``
field describes it and its sha256 is in the card's checksums: ``load_gate`` refuses a file that differs.
Version 1 files (the shared model alone, distances unscaled) still load.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

GATE_FILE = "gate.safetensors"
GATE_FORMAT_VERSION = 2
GATE_METHOD = "mahalanobis-pooled-features-v2"
GATE_METHODS = {1: "mahalanobis-pooled-features-v1", GATE_FORMAT_VERSION: GATE_METHOD}  # the versions load_gate reads
DEFAULT_TARGET_PASS_RATE = 0.99

Array = npt.NDArray[np.float64]


class GateError(ValueError):
    """The gate file is missing, malformed or does not match the card."""


def _root(features: npt.ArrayLike) -> Array:
    return np.sqrt(np.clip(np.asarray(features, dtype=np.float64), 0.0, None))


def _shrunk_covariance(centred: Array) -> Array:
    """Ledoit-Wolf shrinkage towards a scaled identity: well-conditioned even with fewer images than dims."""
    n, d = centred.shape
    sample = centred.T @ centred / n
    mu = np.trace(sample) / d
    delta = (np.sum(sample**2) - 2.0 * mu * np.trace(sample) + mu * mu * d) / d  # ||S - mu I||_F^2 / d
    # sum_n ||x_n x_n^T - S||_F^2 = sum_n ||x_n||^4 - n ||S||_F^2, without the n x d x d outer products.
    beta = (np.sum(np.sum(centred**2, axis=1) ** 2) - n * np.sum(sample**2)) / (n * n * d)
    shrinkage = float(np.clip(beta / delta, 0.0, 1.0)) if delta > 0 else 1.0
    return shrinkage * mu * np.eye(d) + (1.0 - shrinkage) * sample


def _inverse_sqrt(covariance: Array) -> Array:
    """W with W.T @ W = covariance^-1, so a Mahalanobis distance is a Euclidean norm after x @ W.T."""
    values, vectors = np.linalg.eigh(covariance)
    values = np.clip(values, values.max() * 1e-10, None)
    return (vectors / np.sqrt(values)).T


@dataclass(frozen=True)
class FeatureDensity:
    """Class means and whitening of the square-rooted pooled features: one whitening shared by all classes
    (``whiten`` D x D) or one per class (C x D x D)."""

    means: Array  # C x D, each whitened by its class's matrix
    whiten: Array  # D x D or C x D x D

    @property
    def per_class(self) -> bool:
        return self.whiten.ndim == 3

    @classmethod
    def fit(cls, features: npt.ArrayLike, labels: npt.ArrayLike, per_class: bool = False) -> FeatureDensity:
        x = _root(features)
        y = np.asarray(labels)
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"Expected N x D features and N labels, got {x.shape} and {y.shape}.")
        classes = np.unique(y)
        means = np.stack([x[y == c].mean(axis=0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        if not per_class:
            whiten = _inverse_sqrt(_shrunk_covariance(centred))
            return cls(means=means @ whiten.T, whiten=whiten)
        whitens = np.stack([_inverse_sqrt(_shrunk_covariance(centred[y == c])) for c in classes])
        return cls(means=(whitens @ means[:, :, None])[:, :, 0], whiten=whitens)

    def score(self, features: npt.ArrayLike) -> Array:
        """Distance to the nearest class mean, in units of that class's (or the shared) standard deviation."""
        x = _root(features).astype(self.whiten.dtype)  # a loaded gate is float32: half the memory read per image
        if self.per_class:
            z = self.whiten @ x.T  # C x D x N: each image whitened by each class (matmul: BLAS, not einsum)
            return np.sqrt(((z - self.means[:, :, None]) ** 2).sum(axis=1).min(axis=0)).astype(np.float64)
        z = x @ self.whiten.T
        d2 = (z**2).sum(axis=1)[:, None] - 2.0 * z @ self.means.T + (self.means**2).sum(axis=1)[None, :]
        return np.sqrt(np.clip(d2.min(axis=1), 0.0, None)).astype(np.float64)


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class Gate:
    """A fitted gate: refuse an image whose score (the largest of its scaled distances) exceeds ``threshold``."""

    densities: tuple[FeatureDensity, ...]
    scales: tuple[float, ...]  # each density's distance is divided by its scale
    threshold: float
    target_pass_rate: float = DEFAULT_TARGET_PASS_RATE
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.densities[0].whiten.shape[-1])

    def scores(self, features: npt.ArrayLike) -> Array:
        """Gate scores of N images from their N x D pooled features (the ONNX output ``features``)."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"The gate expects N x {self.feature_dim} features, got shape {x.shape}.")
        return np.max([d.score(x) / s for d, s in zip(self.densities, self.scales, strict=True)], axis=0)

    def refused(self, features: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """True where an image is not a chest X-ray by this gate (NaN scores are refused too)."""
        return ~(self.scores(features) <= self.threshold)

    def describe(self) -> dict[str, Any]:
        """What the card's ``gate`` field records about this gate (the file name and measurements are added)."""
        return {
            "method": GATE_METHOD,
            "score": "the larger of two Mahalanobis distances of sqrt(pooled features) to the nearest class mean "
            "(shared covariance; per-class covariance), each divided by its own threshold",
            "threshold": self.threshold,
            "target_pass_rate": self.target_pass_rate,
            "feature_dim": self.feature_dim,
            "densities": [
                {"covariance": "per class" if d.per_class else "shared", "scale": s}
                for d, s in zip(self.densities, self.scales, strict=True)
            ],
            **self.info,
        }


# Below this a 99 % quantile is a guess; a run that cannot meet it stops after its split, before any training.
MIN_CALIBRATION_IMAGES = 20


def _pass_threshold(scores: Array, target_pass_rate: float) -> float:
    """The smallest score that lets at least ``target_pass_rate`` of ``scores`` pass."""
    k = int(np.ceil(target_pass_rate * len(scores))) - 1
    return float(np.sort(scores)[k])


def _rule_threshold(
    scores: Array, target_pass_rate: float, sources: npt.NDArray[np.str_] | None
) -> tuple[float, dict[str, Any]]:
    """The threshold that lets ``target_pass_rate`` of ``scores`` pass, or of every source with enough images."""
    pooled = _pass_threshold(scores, target_pass_rate)
    if sources is None:
        return pooled, {"threshold_rule": "pooled"}
    by_source = {
        str(s): _pass_threshold(scores[sources == s], target_pass_rate)
        for s in np.unique(sources)
        if np.sum(sources == s) >= MIN_CALIBRATION_IMAGES
    }
    info = {"threshold_rule": "every source", "pooled_threshold": pooled, "source_thresholds": by_source}
    return max([pooled, *by_source.values()]), info


def fit_gate(
    fit_features: npt.ArrayLike,
    fit_labels: npt.ArrayLike,
    calibration_features: npt.ArrayLike,
    target_pass_rate: float = DEFAULT_TARGET_PASS_RATE,
    calibration_sources: Sequence[str] | None = None,
) -> Gate:
    """Fit the class Gaussians on training X-rays and set the thresholds on held-out ones.

    fit_features / fit_labels: N x D pooled features and N class indices of training images.
    calibration_features: M x D features of real chest X-rays not used for fitting (M >= MIN_CALIBRATION_IMAGES);
    the threshold is the smallest score that lets at least ``target_pass_rate`` of them pass.
    calibration_sources: the collection of each calibration image. Given, the threshold lets ``target_pass_rate``
    of *every* source with at least MIN_CALIBRATION_IMAGES images pass (the largest of their thresholds): the
    service meets one hospital at a time, and a pooled quantile refuses far more of a source unlike the rest
    (leaving one source out of the shipped gate's pooled threshold refused 16 % of it).
    Each of the two densities is first scaled by its own threshold under the same rule, then the threshold of
    their maximum is set by it again (so the target holds for the score the service uses).
    """
    if not 0.5 <= target_pass_rate < 1.0:
        raise ValueError(f"target_pass_rate must be in [0.5, 1), got {target_pass_rate}.")
    calibration = np.atleast_2d(np.asarray(calibration_features, dtype=np.float64))
    if len(calibration) < MIN_CALIBRATION_IMAGES:
        raise ValueError(
            f"Need at least {MIN_CALIBRATION_IMAGES} calibration images to set a threshold, got {len(calibration)}."
        )
    sources = None if calibration_sources is None else np.asarray(calibration_sources)
    if sources is not None and len(sources) != len(calibration):
        raise ValueError(f"{len(calibration)} calibration images but {len(sources)} sources.")
    densities = tuple(FeatureDensity.fit(fit_features, fit_labels, per_class) for per_class in (False, True))
    scales = tuple(_rule_threshold(d.score(calibration), target_pass_rate, sources)[0] for d in densities)
    unscaled = Gate(densities, scales, threshold=np.inf, target_pass_rate=target_pass_rate)
    threshold, info = _rule_threshold(unscaled.scores(calibration), target_pass_rate, sources)
    return Gate(densities, scales, threshold, target_pass_rate, info)


# --------------------------------------------------------------------------- the file


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_gate(gate: Gate, path: Path) -> str:
    """Write ``gate`` as a safetensors file (the densities' arrays + JSON metadata; no pickle) and return its sha256."""
    from safetensors.numpy import save

    meta = {
        "format_version": GATE_FORMAT_VERSION,
        "method": GATE_METHOD,
        "threshold": gate.threshold,
        "target_pass_rate": gate.target_pass_rate,
        "scales": list(gate.scales),
        "info": gate.info,
    }
    tensors = {f"{name}.{i}": getattr(d, name) for i, d in enumerate(gate.densities) for name in ("means", "whiten")}
    # float32 on disk and when served (half the size and the memory read per image; fitted in float64).
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    data = save(arrays, metadata={"gate": json.dumps(meta)})
    Path(path).write_bytes(data)
    Path(path).chmod(0o644)  # readable by a non-root container user through a read-only mount
    return sha256_bytes(data)


def load_gate(path: Path, expected_sha256: str | None) -> Gate:
    """Read a gate file, refusing it (GateError) unless its sha256 is ``expected_sha256`` and it parses."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise GateError(f"The bundle's gate file {path.name} is missing.")
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if expected_sha256 is None or actual != expected_sha256:
        raise GateError(
            f"{path.name} does not match its card (sha256 {actual[:12]}…, expected "
            f"{(expected_sha256 or 'none')[:12]}…): the gate was modified or corrupted; the bundle will not be served."
        )
    try:
        tensors = load(data)
        meta = json.loads(_safetensors_metadata(data)["gate"])
        version = meta.get("format_version")
    except (SafetensorError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise GateError(f"{path.name} is not a valid gate file: {err}") from err
    if version not in GATE_METHODS or meta.get("method") != GATE_METHODS[version]:
        raise GateError(
            f"{path.name} is a gate of another kind or version ({meta.get('method')!r}, version {version!r})."
        )
    try:
        if version == 1:  # one shared density, distances unscaled
            arrays, scales = [(tensors["means"], tensors["whiten"])], [1.0]
        else:
            scales = [float(v) for v in meta["scales"]]
            arrays = [(tensors[f"means.{i}"], tensors[f"whiten.{i}"]) for i in range(len(scales))]
        threshold = float(meta["threshold"])
        target = float(meta["target_pass_rate"])
        info = dict(meta.get("info") or {})
    except (KeyError, TypeError, ValueError) as err:
        raise GateError(f"{path.name} is not a valid gate file: {err}") from err
    dims = {whiten.shape[-1] for _, whiten in arrays}
    shapes_ok = len(dims) == 1 and all(
        means.ndim == 2
        and whiten.shape[-2:] == (means.shape[1], means.shape[1])
        and (whiten.ndim == 2 or (whiten.ndim == 3 and len(whiten) == len(means)))
        for means, whiten in arrays
    )
    if not arrays or not shapes_ok or not np.isfinite(threshold) or not all(s > 0 for s in scales):
        raise GateError(f"{path.name} has arrays of inconsistent shapes or a non-finite threshold or scale.")
    densities = tuple(FeatureDensity(means=m, whiten=w) for m, w in arrays)  # float32, as saved
    return Gate(densities, tuple(scales), threshold, target, info)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its JSON header), which safetensors.numpy.load drops."""
    if len(data) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


# --------------------------------------------------------------------------- the service's policy


@dataclass(frozen=True)
class GatePolicy:
    """How the service applies the gate (``CXR_GATE*`` settings).

    enabled: off lets every decodable image through (no score, no metadata check).
    dicom_modalities / dicom_body_parts: a DICOM file whose Modality / BodyPartExamined is present and not in
        the list is refused on its metadata alone; an empty list turns that check off.
    """

    enabled: bool = True
    dicom_modalities: tuple[str, ...] = ("CR", "DX", "DR")
    dicom_body_parts: tuple[str, ...] = ("CHEST",)

    def describe(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "dicom_modalities": list(self.dicom_modalities),
            "dicom_body_parts": list(self.dicom_body_parts),
        }


def dicom_refusal(modality: str | None, body_part: str | None, policy: GatePolicy) -> str | None:
    """Why a DICOM file's metadata says it is not a chest radiograph, or None when it does not say so."""
    if not policy.enabled:
        return None
    allowed_modalities = {m.strip().upper() for m in policy.dicom_modalities}
    allowed_parts = {b.strip().upper() for b in policy.dicom_body_parts}
    if modality and allowed_modalities and modality.strip().upper() not in allowed_modalities:
        return (
            f"This DICOM file is a {modality.strip()} image (Modality), not a radiograph "
            f"({', '.join(sorted(allowed_modalities))}); only chest X-rays are classified."
        )
    if body_part and allowed_parts and body_part.strip().upper() not in allowed_parts:
        return (
            f"This DICOM file shows the {body_part.strip()} (BodyPartExamined), not the chest; only chest X-rays "
            f"are classified."
        )
    return None
