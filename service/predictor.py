"""The one predictor built from a model bundle, shared by the service, the CLI, the benchmarks and the tests.

    decoded image -> preprocess (the bundle's spec) -> ONNX Runtime logits -> softmax(logits / T)
                  -> label (the card's decision rule, or the most probable class without one)
    CAM-layer activations (the same ORT run) -> Grad-CAM in closed form (target class) -> overlay PNG
    (explain engine ``torch``, or a bundle without that output: Grad-CAM on the torch copy)

Classes, input size, statistics, temperature and decision rule all come from the bundle's card. ORT sessions
are thread-safe; Grad-CAM hooks are state on the torch model, so torch explanations are serialised by a lock.
The closed form needs no network: a prediction's activations give the heatmap of every class.

Verification has two parts. What is served is checked before anything is served: checksums and manifest, the
ORT session, the gate, and (onnx engine) the closed form's head against the graph in numpy. The torch
reference (the torch copy against the graph, closed-form heatmaps against pytorch-grad-cam) is what the torch
engine explains with, so it runs first there; with the onnx engine it may be deferred (``defer_reference``):
building torch and a backward pass through DenseNet take most of a cold start, and the onnx engine never uses
that copy. The service runs it in a child process (``service.reference_check``), so that its ~1 GB of torch
never enters the server, right after it is ready, and withdraws the model if it fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np

from service.errors import NotAChestXray, UnknownTargetClass
from service.model.bundle import (
    DEFAULT_PROVIDERS,
    FEATURES_NAME,
    OUTPUT_NAME,
    PARITY_ATOL,
    PARITY_CUDA_TOL,
    PARITY_RTOL,
    WEIGHTS_FILE,
    BundleError,
    InvalidCard,
    LoadedBundle,
    ModelCard,
    ParityMismatch,
    check_parity,
    has_output,
    load_bundle,
    load_torch_model,
    ort_logits,
    ort_outputs,
    probe_batch,
)
from service.model.cam import (
    CAM_ACTIVATIONS_NAME,
    ClosedFormCam,
    closed_form_head,
    load_head_bias,
    load_head_weight,
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
ExplainEngine: TypeAlias = Literal["auto", "onnx", "torch"]
# The torch reference check (torch copy vs graph, closed form vs pytorch-grad-cam): not run yet, passed, failed.
ReferenceCheck: TypeAlias = Literal["pending", "passed", "failed"]
# One run of the graph: a preprocessed N x 3 x S x S batch -> the predictor's outputs by name (Predictor.forward,
# or a micro-batcher in front of it).
Forward: TypeAlias = Callable[[np.ndarray], dict[str, np.ndarray]]
# Closed-form heatmaps vs pytorch-grad-cam on the probe batch, after normalisation (CPU; CUDA may use TF32).
CAM_PARITY_TOL = 1e-4
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
    # The CAM layer's activations of this image (K x h x w) with the onnx explain engine, else None. float16, as
    # the store keeps them, so an explanation of a stored prediction and of the same upload are the same PNG.
    activations: np.ndarray | None = field(default=None, repr=False, compare=False)


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
        explain_engine: ExplainEngine = "auto",
    ) -> None:
        self.bundle = bundle
        self.requested_providers = tuple(requested_providers)
        self.gate_policy = gate_policy if gate_policy is not None else GatePolicy()
        self._cam_lock = threading.Lock()
        self._cam_layer: nn.Module | None = None
        if bundle.torch_model is not None:
            self._cam_layer = self._cam_layer_of(bundle.torch_model)
        self._closed_form = self._closed_form_cam(explain_engine)
        self.reference_check: ReferenceCheck = "pending"
        self.output_names = [OUTPUT_NAME]
        if self.gate_active:
            self.output_names.append(FEATURES_NAME)
        if self._closed_form is not None:
            self.output_names.append(CAM_ACTIVATIONS_NAME)

    def _cam_layer_of(self, model: nn.Module) -> nn.Module:
        try:
            return model.get_submodule(self.bundle.card.cam_layer)
        except AttributeError as err:
            raise InvalidCard(
                f"The card's cam_layer {self.bundle.card.cam_layer!r} is not a module of the "
                f"{self.bundle.card.arch} network."
            ) from err

    def _closed_form_cam(self, engine: ExplainEngine) -> ClosedFormCam | None:
        """The closed-form CAM when ``engine`` asks for it and the bundle allows it; BundleError for 'onnx' if not."""
        if engine == "torch":
            return None
        card = self.bundle.card
        head = closed_form_head(card.arch, card.cam_layer)
        if head is None or not has_output(self.bundle.session, CAM_ACTIVATIONS_NAME):
            if engine == "onnx":
                raise BundleError(
                    f"CXR_EXPLAIN_ENGINE=onnx, but this {card.arch} bundle (CAM layer {card.cam_layer}) "
                    + ("has no closed-form Grad-CAM" if head is None else f"has no '{CAM_ACTIVATIONS_NAME}' output")
                    + "; use auto or torch, or export the bundle again with this version."
                )
            return None
        return ClosedFormCam(load_head_weight(self.bundle.path / WEIGHTS_FILE, head), head.relu_before_pool)

    @property
    def explain_engine(self) -> Literal["onnx", "torch"]:
        """How heatmaps are computed: ``onnx`` (closed form from the graph's activations) or ``torch``."""
        return "onnx" if self._closed_form is not None else "torch"

    def check_closed_form_head(self) -> float:
        """Max |graph logits - W pool(f(A)) - b| on one probe image (numpy, one ORT run, no torch): that the head
        weights the closed form uses are the graph's and ``cam_activations`` is what its head pools (and, with the
        ``features`` output, that those are the pooled activations). ParityMismatch above the logits tolerance."""
        if self._closed_form is None:
            raise RuntimeError("The closed-form head check needs the onnx explain engine.")
        card = self.card
        head = closed_form_head(card.arch, card.cam_layer)
        assert head is not None  # the onnx engine exists only for such heads
        names = [OUTPUT_NAME, CAM_ACTIVATIONS_NAME] + (
            [FEATURES_NAME] if has_output(self.bundle.session, FEATURES_NAME) else []
        )
        outputs = ort_outputs(self.bundle.session, probe_batch(card.spec, n=1), names)
        bias = load_head_bias(self.bundle.path / WEIGHTS_FILE, head)
        expected = {OUTPUT_NAME: self._closed_form.head_logits(outputs[CAM_ACTIVATIONS_NAME], bias)}
        if FEATURES_NAME in outputs:
            expected[FEATURES_NAME] = self._closed_form.pooled(outputs[CAM_ACTIVATIONS_NAME])
        diffs = {}
        for name, want in expected.items():
            got = outputs[name]
            if got.shape != want.shape:
                raise ParityMismatch(
                    f"The graph's {name} has shape {got.shape}; its CAM activations give {want.shape}."
                )
            diffs[name] = float(np.max(np.abs(got - want)))
            tolerance = PARITY_ATOL + PARITY_RTOL * float(np.max(np.abs(want)))
            if not diffs[name] <= tolerance:
                raise ParityMismatch(
                    f"The graph's {name} differ from what its {CAM_ACTIVATIONS_NAME} and the head in {WEIGHTS_FILE} "
                    f"give by {diffs[name]:.3g} (more than {tolerance:.3g}): the two files are not the same network; "
                    "the bundle will not be served."
                )
        return diffs[OUTPUT_NAME]

    def verify_reference(self) -> None:
        """The torch reference check: build the torch copy (unless the bundle has it), compare it with the graph on
        the probe batch (logits, features, CAM activations) and, with the onnx engine, the closed-form heatmaps
        with pytorch-grad-cam on it. Sets ``reference_check``; ParityMismatch/InvalidCard when they disagree."""
        self.reference_check = "pending"
        try:
            bundle = self.bundle
            if bundle.torch_model is None:
                model = load_torch_model(bundle.path, self.card)
                bundle.parity_max_abs_diff = check_parity(
                    bundle.session, model, self.card.spec, self.card.arch, self.card.parity_allowance
                )
                self._cam_layer = self._cam_layer_of(model)
                bundle.torch_model = model
            if self.explain_engine == "onnx":
                self.check_cam_parity()
        except BaseException:
            self.reference_check = "failed"
            raise
        self.reference_check = "passed"

    def check_cam_parity(self) -> float:
        """Max |closed form - pytorch-grad-cam| heatmap difference on the probe batch (one class per image);
        ParityMismatch above CAM_PARITY_TOL. Needs the torch copy and the onnx engine."""
        from service.gradcam import gradcam_maps

        if self._closed_form is None or self.bundle.torch_model is None or self._cam_layer is None:
            raise RuntimeError("The CAM parity check needs the onnx explain engine and the torch copy.")
        batch = probe_batch(self.card.spec)
        targets = [i % len(self.classes) for i in range(len(batch))]
        activations = ort_outputs(self.bundle.session, batch, [CAM_ACTIVATIONS_NAME])[CAM_ACTIVATIONS_NAME]
        closed = self._closed_form.maps(activations, targets, self.card.input_size)
        with self._cam_lock:
            reference = gradcam_maps(self.bundle.torch_model, self._cam_layer, batch, targets)
        diff = float(np.max(np.abs(closed - reference)))
        tolerance = PARITY_CUDA_TOL if "CUDAExecutionProvider" in self.providers else CAM_PARITY_TOL
        tolerance += self.card.parity_allowance.get("cam", 0.0)  # a quantised graph's activations are approximate
        if not diff <= tolerance:
            raise ParityMismatch(
                f"The closed-form Grad-CAM from {CAM_ACTIVATIONS_NAME} differs from Grad-CAM on the torch copy by "
                f"{diff:.3g} (more than {tolerance:g}); set CXR_EXPLAIN_ENGINE=torch or export the bundle again."
            )
        return diff

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        gate_policy: GatePolicy | None = None,
        explain_engine: ExplainEngine = "auto",
        threads: int = 0,
        *,
        defer_reference: bool = False,
    ) -> Predictor:
        """Load and verify a bundle (checksums incl. the gate's, the closed form's head against the graph, and the
        torch reference: ONNX/torch parity and closed-form CAM against Grad-CAM on the torch copy); ``BundleError``
        if it cannot be served. ``gate_policy``: how the gate is applied (default: on); ``threads``: ORT's intra-op
        threads (0: the CPU limit). ``defer_reference``: with the onnx engine, leave the torch reference to a later
        :meth:`verify_reference` (``reference_check`` stays "pending"); the torch engine always runs it here."""
        bundle = load_bundle(model_dir, providers, with_torch=False, threads=threads)
        predictor = cls(bundle, providers, gate_policy, explain_engine)
        if predictor.explain_engine == "onnx":
            predictor.check_closed_form_head()
        if not (defer_reference and predictor.explain_engine == "onnx"):
            predictor.verify_reference()
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

    def warm_up(self, max_batch: int = 1) -> None:
        """Run one prediction and one explanation on a blank image, so the first request is not the slow one.

        (The first ORT run, matplotlib's import and, with the torch engine, pytorch-grad-cam and the first
        autograd pass take seconds.) One ORT run serves both with the onnx engine. With ``max_batch`` > 1 (the
        micro-batcher's largest batch) two runs of that size come first: ORT's CPU memory arena grows to what the
        largest batch needs (DenseNet-121, 2-core CPU: 320-379 MB RSS after batch 8 against 146 MB after batch 1)
        and never shrinks, so that step is taken at start-up, inside the base RSS, not minutes into serving.
        (Four concurrent batch-1 runs need only 184 MB and reach it in the first round.)
        """
        blank = np.zeros((self.card.input_size, self.card.input_size), dtype=np.float32)
        batch = preprocess(blank, self.card.spec)
        for _ in range(2 if max_batch > 1 else 0):
            self.forward(np.repeat(batch, max_batch, axis=0))
        outputs = self.forward(batch)  # not predict(): the gate would refuse a blank
        activations = outputs.get(CAM_ACTIVATIONS_NAME)
        self.explanation(
            blank,
            self.classes[0],
            max_side=self.card.input_size,
            activations=None if activations is None else activations[0].astype(np.float16),
        )

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

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One ORT run on an N x 3 x S x S batch: ``output_names`` (logits, the gate's features when the gate is
        active, the CAM activations with the onnx engine), by name. Thread-safe."""
        return ort_outputs(self.bundle.session, batch, self.output_names)

    def _screened_outputs(
        self, batch: np.ndarray, forward: Forward | None
    ) -> tuple[dict[str, np.ndarray], float | None]:
        """The graph's outputs for a one-image batch and its gate score, from one run; NotAChestXray if refused."""
        outputs = (forward or self.forward)(batch)
        gate = self.bundle.gate
        if not self.gate_active or gate is None:
            return outputs, None
        score = float(gate.scores(outputs[FEATURES_NAME])[0])
        if not score <= gate.threshold:
            raise NotAChestXray(
                "This image does not look like a chest X-ray, so it was not classified: the model was only "
                f"trained on chest radiographs (gate score {score:.3g}, above the threshold {gate.threshold:.3g}).",
                score=score,
                threshold=gate.threshold,
            )
        return outputs, score

    def screen(self, image: ImageInput) -> float | None:
        """Raise NotAChestXray unless ``image`` passes the gate (metadata, then score); returns the score."""
        self._check_metadata(image)
        return self._screened_outputs(preprocess(_as_array(image), self.card.spec), None)[1]

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

    def predict(self, image: ImageInput, *, forward: Forward | None = None) -> Prediction:
        """Label (by the card's decision rule), argmax label and per-class probabilities for one image.

        With the gate active the image is screened first (DICOM metadata, then the gate score on the same
        forward pass as the logits): ``NotAChestXray`` instead of a label for what is not a chest X-ray.
        ``forward`` runs the graph (default: :meth:`forward`; the service passes its micro-batcher).
        """
        self._check_metadata(image)
        start = time.perf_counter()
        batch = preprocess(_as_array(image), self.card.spec)
        preprocess_ms = _ms_since(start)
        start = time.perf_counter()
        outputs, gate_score = self._screened_outputs(batch, forward)
        (probs,) = softmax(outputs[OUTPUT_NAME], self.card.temperature)
        inference_ms = _ms_since(start)
        probabilities = {name: float(p) for name, p in zip(self.classes, probs, strict=True)}
        argmax_label = self.classes[int(np.argmax(probs))]
        decision = self.card.decision
        activations = outputs.get(CAM_ACTIVATIONS_NAME)
        return Prediction(
            label=argmax_label if decision is None else decision.label(probabilities),
            argmax_label=argmax_label,
            probabilities=probabilities,
            decision=None if decision is None else decision.outcome(probabilities),
            preprocess_ms=preprocess_ms,
            inference_ms=inference_ms,
            gate_score=gate_score,
            activations=None if activations is None else activations[0].astype(np.float16),
        )

    def heatmap(self, image: ImageInput | None, target: str, activations: np.ndarray | None = None) -> np.ndarray:
        """Grad-CAM map (S x S, [0, 1], in the network's input geometry) of class ``target``.

        onnx engine: in closed form from ``activations`` (a prediction's, K x h x w: no network run) or from one
        ORT run on ``image``; torch engine: pytorch-grad-cam on the torch copy (``activations`` unused).
        """
        index = self.class_index(target)
        if self._closed_form is not None:
            if activations is None:
                if image is None:
                    raise ValueError("A heatmap needs the image or its activations.")
                batch = preprocess(_as_array(image), self.card.spec)
                activations = ort_outputs(self.bundle.session, batch, [CAM_ACTIVATIONS_NAME])[CAM_ACTIVATIONS_NAME][0]
                activations = activations.astype(np.float16)  # as a stored prediction's: the same map either way
            return self._closed_form.maps(activations[None], [index], self.card.input_size)[0]
        from service.gradcam import gradcam_maps

        if self.bundle.torch_model is None or self._cam_layer is None:
            raise RuntimeError("This bundle was loaded without its torch copy, so it cannot explain.")
        if image is None:
            raise ValueError("The torch explain engine needs the image.")
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
        activations: np.ndarray | None = None,
    ) -> Explanation:
        """Overlay PNG of the Grad-CAM map of ``target`` (default: the predicted class), original aspect.

        ``activations``: the image's CAM activations from an earlier prediction (onnx engine: no network run).
        """
        from service.gradcam import overlay, png_bytes

        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be within [0, 1], got {alpha}.")
        if target is None:
            prediction = self.predict(image)
            target, activations = prediction.label, prediction.activations
        cam = self.heatmap(image, target, activations)
        return Explanation(png_bytes(overlay(_as_array(image), cam, alpha, max_side)), target)
