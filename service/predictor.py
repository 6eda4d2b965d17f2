"""The one predictor built from a model bundle, shared by the service, the CLI, the benchmarks and the tests.

    decoded image -> preprocess (the bundle's spec) -> ONNX Runtime logits -> softmax(logits / T)
                  -> label (the card's decision rule, or the most probable class without one)
    decoded image -> preprocess -> Grad-CAM on the torch copy (target class) -> overlay PNG

Classes, input size, statistics, temperature and decision rule all come from the bundle's card. ORT sessions
are thread-safe; Grad-CAM hooks are state on the torch model, so explanations are serialised by a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from service.errors import NotAChestXray, UnknownTargetClass
from service.model.bundle import (
    DEFAULT_PROVIDERS,
    InvalidCard,
    LoadedBundle,
    ModelCard,
    load_bundle,
    ort_logits,
    ort_logits_and_features,
)
from service.model.decision import DecisionOutcome
from service.model.gate import GatePolicy, dicom_refusal
from service.model.imaging import DecodedImage
from service.model.preprocess import preprocess
from service.model.probabilities import softmax

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

ImageInput: TypeAlias = DecodedImage | np.ndarray  # a decoded upload, or its 2-D float32 [0, 1] array
DEFAULT_ALPHA = 0.4
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class Prediction:
    """The answer for one image and where time went.

    label: the class the bundle's decision rule calls (the most probable class when it has no rule).
    argmax_label: the most probable class.
    probabilities: every class of the bundle, calibrated, summing to 1 (the rule never changes them).
    decision: the rule applied to this image, or None for a bundle without one.
    gate_score: the "is this a chest X-ray?" score (passed: at most the card's gate threshold).
    """

    label: str
    argmax_label: str
    probabilities: dict[str, float]
    decision: DecisionOutcome | None
    preprocess_ms: float
    inference_ms: float
    gate_score: float | None = None  # None: the gate is off or the bundle has none


@dataclass(frozen=True)
class Explanation:
    """An overlay PNG and the class it explains."""

    png: bytes
    target: str


def _as_array(image: ImageInput) -> np.ndarray:
    """The pixel contract at the boundary: 2-D float in [0, 1] (a uint8 array would silently saturate)."""
    if isinstance(image, DecodedImage):
        return image.array
    array = np.asarray(image)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"Expected a 2-D float image in [0, 1], got {array.dtype} with shape {array.shape}.")
    if array.size and not (array.min() >= 0.0 and array.max() <= 1.0):
        raise ValueError("Expected a 2-D float image in [0, 1]; its values fall outside that range.")
    return array.astype(np.float32, copy=False)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class Predictor:
    """Predictions and Grad-CAM explanations from one verified bundle."""

    def __init__(
        self,
        bundle: LoadedBundle,
        requested_providers: Sequence[str] = DEFAULT_PROVIDERS,
        gate_policy: GatePolicy | None = None,
    ) -> None:
        self.bundle = bundle
        self.requested_providers = tuple(requested_providers)
        self.gate_policy = gate_policy if gate_policy is not None else GatePolicy()
        self._cam_lock = threading.Lock()
        self._cam_layer: nn.Module | None = None
        if bundle.torch_model is not None:
            try:
                self._cam_layer = bundle.torch_model.get_submodule(bundle.card.cam_layer)
            except AttributeError as err:
                raise InvalidCard(
                    f"The card's cam_layer {bundle.card.cam_layer!r} is not a module of the {bundle.card.arch} network."
                ) from err

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        gate_policy: GatePolicy | None = None,
    ) -> Predictor:
        """Load and verify a bundle (checksums incl. the gate's, ONNX/torch parity); ``BundleError`` if it
        cannot be served. ``gate_policy``: how the gate is applied (default: on)."""
        bundle = load_bundle(model_dir, providers, with_torch=True)
        predictor = cls(bundle, providers, gate_policy)
        if predictor.gate_policy.enabled and bundle.gate is None:
            logger.warning("the model bundle has no chest X-ray gate: images are classified without one")
        if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in bundle.providers:
            logger.warning(
                "CUDAExecutionProvider was requested but onnxruntime is using %s (no usable GPU or CUDA "
                "libraries); inference runs on the CPU",
                ",".join(bundle.providers),
            )
        return predictor

    @property
    def card(self) -> ModelCard:
        return self.bundle.card

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.bundle.card.classes)

    @property
    def providers(self) -> list[str]:
        """The execution providers onnxruntime actually uses (not the ones asked for)."""
        return list(self.bundle.providers)

    @property
    def sha256(self) -> str:
        """sha256 of the served ONNX graph."""
        return self.bundle.onnx_sha256

    def warm_up(self) -> None:
        """Run one prediction and one explanation on a blank image, so the first request is not the slow one.

        (Importing pytorch-grad-cam and matplotlib and the first ORT/autograd passes take seconds.)
        """
        blank = np.zeros((self.card.input_size, self.card.input_size), dtype=np.float32)
        self.probabilities(preprocess(blank, self.card.spec))  # the gate would (rightly) refuse a blank image
        self.explanation(blank, self.classes[0], max_side=self.card.input_size)

    @property
    def gate_active(self) -> bool:
        """Whether images are screened by the bundle's gate (on in the settings, and the bundle has one)."""
        return self.gate_policy.enabled and self.bundle.gate is not None

    def gate_settings(self) -> dict[str, object]:
        """What /model reports about the gate as served: the policy, whether it is active, the threshold."""
        gate = self.bundle.gate
        return {
            **self.gate_policy.describe(),
            "active": self.gate_active,
            "threshold": None if gate is None else gate.threshold,
            "method": None if gate is None else (self.card.gate or {}).get("method"),
        }

    def _check_metadata(self, image: ImageInput) -> None:
        if isinstance(image, DecodedImage):
            reason = dicom_refusal(image.modality, image.body_part, self.gate_policy)
            if reason is not None:
                raise NotAChestXray(reason)

    def _screened_logits(self, batch: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Logits of a one-image batch and its gate score, from one run of the graph; NotAChestXray if refused."""
        gate = self.bundle.gate
        if not self.gate_active or gate is None:
            return ort_logits(self.bundle.session, batch), None
        logits, features = ort_logits_and_features(self.bundle.session, batch)
        score = float(gate.scores(features)[0])
        if not score <= gate.threshold:
            raise NotAChestXray(
                "This image does not look like a chest X-ray, so it was not classified: the model was only "
                f"trained on chest radiographs (gate score {score:.1f}, above the threshold {gate.threshold:.1f}).",
                score=score,
                threshold=gate.threshold,
            )
        return logits, score

    def screen(self, image: ImageInput) -> float | None:
        """Raise NotAChestXray unless ``image`` passes the gate (metadata, then score); returns the score."""
        self._check_metadata(image)
        return self._screened_logits(preprocess(_as_array(image), self.card.spec))[1]

    def class_index(self, name: str) -> int:
        """Output index of class ``name``; raises UnknownTargetClass for a class this model does not have."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise UnknownTargetClass(
                f"Unknown target class {name!r}; this model's classes are: {', '.join(self.classes)}."
            ) from None

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N x C) for a preprocessed N x 3 x S x S batch."""
        return softmax(ort_logits(self.bundle.session, batch), self.card.temperature)

    def predict_arrays(
        self,
        images: Sequence[np.ndarray],
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> np.ndarray:
        """Probabilities (N x C, columns in ``classes`` order) for 2-D [0, 1] arrays, in batches."""
        rows = [
            self.probabilities(preprocess(list(images[i : i + batch_size]), self.card.spec))
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(rows) if rows else np.empty((0, len(self.classes)))

    def predict(self, image: ImageInput) -> Prediction:
        """Label (by the card's decision rule), argmax label and per-class probabilities for one image.

        With the gate active the image is screened first (DICOM metadata, then the gate score on the same
        forward pass as the logits): ``NotAChestXray`` instead of a label for what is not a chest X-ray.
        """
        self._check_metadata(image)
        start = time.perf_counter()
        batch = preprocess(_as_array(image), self.card.spec)
        preprocess_ms = _ms_since(start)
        start = time.perf_counter()
        logits, gate_score = self._screened_logits(batch)
        (probs,) = softmax(logits, self.card.temperature)
        inference_ms = _ms_since(start)
        probabilities = {name: float(p) for name, p in zip(self.classes, probs, strict=True)}
        argmax_label = self.classes[int(np.argmax(probs))]
        decision = self.card.decision
        return Prediction(
            label=argmax_label if decision is None else decision.label(probabilities),
            argmax_label=argmax_label,
            probabilities=probabilities,
            decision=None if decision is None else decision.outcome(probabilities),
            preprocess_ms=preprocess_ms,
            inference_ms=inference_ms,
            gate_score=gate_score,
        )

    def heatmap(self, image: ImageInput, target: str) -> np.ndarray:
        """Grad-CAM map (S x S, [0, 1], in the network's input geometry) of class ``target``."""
        from service.gradcam import gradcam_maps

        index = self.class_index(target)
        if self.bundle.torch_model is None or self._cam_layer is None:
            raise RuntimeError("This bundle was loaded without its torch copy, so it cannot explain.")
        batch = preprocess(_as_array(image), self.card.spec)
        with self._cam_lock:  # hooks are state on the shared model: one explanation at a time
            (cam,) = gradcam_maps(self.bundle.torch_model, self._cam_layer, batch, [index])
        return cam

    def explanation(
        self,
        image: ImageInput,
        target: str | None = None,
        *,
        alpha: float = DEFAULT_ALPHA,
        max_side: int | None = None,
    ) -> Explanation:
        """Overlay PNG of the Grad-CAM map of ``target`` (default: the predicted class), original aspect."""
        from service.gradcam import overlay, png_bytes

        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be within [0, 1], got {alpha}.")
        if target is None:
            target = self.predict(image).label
        cam = self.heatmap(image, target)
        return Explanation(png_bytes(overlay(_as_array(image), cam, alpha, max_side)), target)
