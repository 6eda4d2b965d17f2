"""The one predictor built from a model bundle, shared by the service, the CLI, the benchmarks and the tests.

    decoded image -> preprocess (the bundle's spec) -> ONNX Runtime logits -> softmax(logits / T) -> label
    decoded image -> preprocess -> Grad-CAM on the torch copy (target class) -> overlay PNG

Classes, input size, statistics and temperature all come from the bundle's card. ORT sessions are
thread-safe; Grad-CAM hooks are state on the torch model, so explanations are serialised by a lock.
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

from service.errors import UnknownTargetClass
from service.model.bundle import (
    DEFAULT_PROVIDERS,
    BundleNotFound,
    InvalidCard,
    LoadedBundle,
    ModelCard,
    load_bundle,
    ort_logits,
    softmax,
)
from service.model.imaging import DecodedImage
from service.model.preprocess import preprocess

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

ImageInput: TypeAlias = DecodedImage | np.ndarray  # a decoded upload, or its 2-D float32 [0, 1] array
DEFAULT_ALPHA = 0.4
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class Prediction:
    """Class probabilities for one image (every class of the bundle, summing to 1) and where time went."""

    label: str
    probabilities: dict[str, float]
    preprocess_ms: float
    inference_ms: float


@dataclass(frozen=True)
class Explanation:
    """An overlay PNG and the class it explains."""

    png: bytes
    target: str


def bundle_problem(error: Exception, model_dir: str | Path) -> str:
    """A sentence saying why the bundle at ``model_dir`` cannot be served and what to do about it."""
    if isinstance(error, BundleNotFound):
        return (f"{error} Train a bundle with cxr-train, or point CXR_MODEL_DIR (or --model-dir) at a "
                f"bundle folder.")
    return f"The model bundle at {model_dir} cannot be served: {error}"


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

    def __init__(self, bundle: LoadedBundle, requested_providers: Sequence[str] = DEFAULT_PROVIDERS) -> None:
        self.bundle = bundle
        self.requested_providers = tuple(requested_providers)
        self._cam_lock = threading.Lock()
        self._cam_layer: nn.Module | None = None
        if bundle.torch_model is not None:
            try:
                self._cam_layer = bundle.torch_model.get_submodule(bundle.card.cam_layer)
            except AttributeError as err:
                raise InvalidCard(f"The card's cam_layer {bundle.card.cam_layer!r} is not a module of the "
                                  f"{bundle.card.arch} network.") from err

    @classmethod
    def load(cls, model_dir: str | Path, providers: Sequence[str] = DEFAULT_PROVIDERS) -> Predictor:
        """Load and verify a bundle (checksums, ONNX/torch parity); ``BundleError`` if it cannot be served."""
        bundle = load_bundle(model_dir, providers, with_torch=True)
        predictor = cls(bundle, providers)
        if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in bundle.providers:
            logger.warning(
                "CUDAExecutionProvider was requested but onnxruntime is using %s (no usable GPU or CUDA "
                "libraries); inference runs on the CPU", ",".join(bundle.providers),
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
        self.explanation(blank, None, max_side=self.card.input_size)

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
        self, images: Sequence[np.ndarray], batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> np.ndarray:
        """Probabilities (N x C, columns in ``classes`` order) for 2-D [0, 1] arrays, in batches."""
        rows = [
            self.probabilities(preprocess(list(images[i : i + batch_size]), self.card.spec))
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(rows) if rows else np.empty((0, len(self.classes)))

    def predict(self, image: ImageInput) -> Prediction:
        """Label and per-class probabilities for one decoded image."""
        start = time.perf_counter()
        batch = preprocess(_as_array(image), self.card.spec)
        preprocess_ms = _ms_since(start)
        start = time.perf_counter()
        (probs,) = self.probabilities(batch)
        inference_ms = _ms_since(start)
        return Prediction(
            label=self.classes[int(np.argmax(probs))],
            probabilities={name: float(p) for name, p in zip(self.classes, probs, strict=True)},
            preprocess_ms=preprocess_ms,
            inference_ms=inference_ms,
        )

    def heatmap(self, image: ImageInput, target: str) -> np.ndarray:
        """Grad-CAM map (S x S, [0, 1], in the network's input geometry) of class ``target``."""
        from service.explain import gradcam_maps

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
        from service.explain import overlay, png_bytes

        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be within [0, 1], got {alpha}.")
        if target is None:
            target = self.predict(image).label
        cam = self.heatmap(image, target)
        return Explanation(png_bytes(overlay(_as_array(image), cam, alpha, max_side)), target)

    def explain(
        self,
        image: ImageInput,
        target: str | None = None,
        *,
        alpha: float = DEFAULT_ALPHA,
        max_side: int | None = None,
    ) -> bytes:
        """PNG bytes of :meth:`explanation`."""
        return self.explanation(image, target, alpha=alpha, max_side=max_side).png
