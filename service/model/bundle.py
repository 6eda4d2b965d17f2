"""The model bundle: a self-describing folder that training writes and the service loads.

    model.onnx            input ``image`` (N x 3 x S x S float32), outputs ``logits`` (N x C) and ``features``
                          (N x D: the classifier's input, pooled, which the gate scores), dynamic N; for
                          global-pool + linear heads also ``cam_activations`` (N x K x h x w: the CAM layer,
                          for Grad-CAM in closed form, service.model.cam)
    weights.safetensors   the same network's state dict, for Grad-CAM on a torch copy
    card.json             ModelCard: classes, input size, mean/std, preprocessing, CAM layer, checksums, metrics,
                          and optionally the decision rule, calibration, probes and per-source counts
    gate.safetensors      the "is this a chest X-ray?" gate (service.model.gate), fitted at export; the card's
                          ``gate`` field describes it
    report/               plots (confusion matrix, curves, Grad-CAM grid, comparison)
    manifest.json         sha256 of every other file of the folder (card.json and report/* included); the
                          bundle's digest is the sha256 of this file's bytes (``CXR_MODEL_SHA256`` pins it)

``load_bundle`` refuses a bundle without a manifest, with a file the manifest does not list or lacking one it
lists, or whose files do not hash to what the manifest says (so the card cannot be edited: swapped class names, a
new temperature); likewise one whose files (the gate's included) do not match the checksums in its card, or
whose ONNX graph and torch weights disagree on a probe input, logits, features and CAM activations (tolerance:
``PARITY_ATOL + PARITY_RTOL * max|value|``). Bundles exported before the gate (one output, no gate) still load;
they are served without a gate. Bundles without ``cam_activations`` load too; they are explained on the torch copy.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.model.cam import CAM_ACTIVATIONS_NAME, CLOSED_FORM_HEADS
from service.model.decision import Decision
from service.model.gate import GATE_FILE, Gate, GateError, load_gate
from service.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, PREPROCESSING_ID, PreprocessSpec
from service.model.probabilities import softmax as softmax  # re-exported for training until it imports it

if TYPE_CHECKING:
    import onnxruntime as ort
    from torch import nn

logger = logging.getLogger(__name__)

CARD_SCHEMA_VERSION = 1
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
# Third-party error text (torch's state-dict report, ORT's) is cut to this in a reason: it can run to 34,000
# characters, and a reason is shown to every client of /readyz.
MAX_DETAIL_CHARS = 240
REPORT_DIR = "report"
# Opset 18 / IR 10 (what torch's exporter writes) load in onnxruntime(-gpu) >= 1.17, inside the pinned range;
# a newer exporter's higher IR version is lowered so old runtimes keep working.
ONNX_OPSET = 18
ONNX_IR_VERSION = 10
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
FEATURES_NAME = "features"
_WHAT = {OUTPUT_NAME: "logit", FEATURES_NAME: "feature", CAM_ACTIVATIONS_NAME: "CAM activation"}  # in errors
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-3
# ORT's CUDA provider may use TF32 convolutions, which are only good to about 1e-2 relative.
PARITY_CUDA_TOL = 2e-2


class BundleError(Exception):
    """Base class: the bundle cannot be served."""


class BundleNotFound(BundleError):
    """The folder or one of its files does not exist."""


class InvalidCard(BundleError):
    """card.json is missing fields or has wrong types."""


class ChecksumMismatch(BundleError):
    """A file's sha256 differs from the one recorded in the card (tampered or corrupted)."""


class ParityMismatch(BundleError):
    """ONNX Runtime and the torch copy give different logits for the same input."""


class ManifestMissing(BundleError):
    """The bundle has no manifest.json (exported before manifests, or assembled by hand)."""


class ManifestMismatch(ChecksumMismatch):
    """A file differs from the manifest, is missing, or is not listed in it (tampered, corrupted or added)."""


def bundle_problem(error: Exception, model_dir: str | Path) -> str:
    """A sentence saying why the bundle in ``model_dir`` cannot be served and what to do about it.

    It names the folder, never its path: the sentence is shown to clients (``/readyz``, 503 bodies).
    """
    text = _without_paths(str(error), Path(model_dir))
    if isinstance(error, BundleNotFound):
        return f"{text} Train a bundle with cxr-train, or point CXR_MODEL_DIR (or --model-dir) at a bundle folder."
    return f"The model bundle {Path(model_dir).name!r} cannot be served: {text}"


def _without_paths(text: str, bundle_dir: Path) -> str:
    """``text`` with the bundle folder's path (as given and resolved) replaced by its name."""
    for form in sorted({str(bundle_dir.resolve()), str(bundle_dir)}, key=len, reverse=True):
        if form not in ("", "."):
            text = text.replace(form + "/", "").replace(form, repr(bundle_dir.name))
    return text


def _short(error: BaseException, bundle_dir: Path) -> str:
    """The first line of a third-party error, without the bundle's path, cut to MAX_DETAIL_CHARS."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    text = _without_paths(lines[0].strip(), bundle_dir)
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


class ModelCard(BaseModel):
    """card.json. Unknown extra keys are kept so newer training jobs can add fields."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: int = CARD_SCHEMA_VERSION
    name: str
    version: str
    arch: str
    classes: list[str] = Field(min_length=2)
    input_size: int = Field(ge=32)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    preprocessing: str = PREPROCESSING_ID
    cam_layer: str
    temperature: float = Field(default=1.0, gt=0)
    sha256: dict[str, str]
    onnx_opset: int = ONNX_OPSET
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    decision: Decision | None = Field(default=None, description="The decision rule; none: the label is the argmax.")
    calibration: dict[str, Any] | None = Field(default=None, description="How the probabilities were calibrated.")
    probes: dict[str, Any] | None = Field(default=None, description="Shortcut measurements (free-form).")
    sources: dict[str, Any] | None = Field(default=None, description="Image counts per data source and split.")
    gate: dict[str, Any] | None = Field(
        default=None, description="The 'is this a chest X-ray?' gate: method, threshold, file, measured pass rates."
    )
    quantization: dict[str, Any] | None = Field(
        default=None,
        description="How model.onnx was quantised from the fp32 network in weights.safetensors (training.quantize): "
        "method, calibration, accuracy next to fp32, and ``parity_allowance`` (how far the graph may be from the "
        "torch copy on the probe batch, per output, measured at export); none: model.onnx is fp32.",
    )
    created_at: str
    git_commit: str | None = None
    disclaimer: str = "Research use only. Not a medical device; never use for diagnosis."

    @model_validator(mode="after")
    def _decision_names_a_class(self) -> ModelCard:
        if self.decision is not None and self.decision.positive_class not in self.classes:
            raise ValueError(
                f"decision.positive_class {self.decision.positive_class!r} is not one of the classes "
                f"({', '.join(self.classes)})."
            )
        return self

    @property
    def parity_allowance(self) -> dict[str, float]:
        """Per output (and ``cam`` for heatmaps): what a quantised graph may differ from the torch copy on the probe
        batch on top of the fp32 tolerance; empty for an fp32 graph."""
        allowance = (self.quantization or {}).get("parity_allowance", {})
        return {str(name): float(value) for name, value in allowance.items()}

    @property
    def spec(self) -> PreprocessSpec:
        """The preprocessing this bundle's network was trained with (what ``preprocess`` needs)."""
        return PreprocessSpec(self.input_size, self.mean, self.std, self.preprocessing)


@dataclass
class LoadedBundle:
    """A verified bundle: the card, an ONNX Runtime session and (optionally) the torch copy for Grad-CAM."""

    path: Path
    card: ModelCard
    session: ort.InferenceSession
    providers: list[str]
    torch_model: nn.Module | None = None
    parity_max_abs_diff: float | None = None
    gate: Gate | None = None
    digest: str = ""  # sha256 of manifest.json: the bundle's identity (CXR_MODEL_SHA256)

    @property
    def onnx_sha256(self) -> str:
        return self.card.sha256[ONNX_FILE]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_commit(cwd: Path | None = None) -> str | None:
    """The current git commit of the source tree, or None outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _graph_module(model: nn.Module, arch: str | None, with_cam: bool = True) -> tuple[nn.Module, list[str]]:
    """What is exported for ``arch`` (and run as the parity reference) and its output names, in order."""
    from service.model.backbones import LogitsAndFeatures, LogitsFeaturesAndCam

    if arch is None:
        return model, [OUTPUT_NAME]
    if with_cam and arch in CLOSED_FORM_HEADS:
        return LogitsFeaturesAndCam(model, arch).eval(), [OUTPUT_NAME, FEATURES_NAME, CAM_ACTIVATIONS_NAME]
    return LogitsAndFeatures(model, arch).eval(), [OUTPUT_NAME, FEATURES_NAME]


def export_onnx(
    model: nn.Module, path: Path, input_size: int, opset: int = ONNX_OPSET, *, arch: str | None = None
) -> None:
    """Export ``model`` (eval, CPU, fp32) to ONNX with a dynamic batch axis, opset/IR pinned for old runtimes.

    With ``arch`` the graph has a second output ``features`` (the classifier's pooled input, for the gate)
    computed on the same forward pass, and for a head with a closed-form Grad-CAM a third, ``cam_activations``;
    without it, ``logits`` only.
    """
    import onnx
    import torch

    model = model.eval().cpu().float()
    exported, outputs = _graph_module(model, arch)
    dummy = torch.zeros(1, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(
            exported,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
    graph = onnx.load(str(path))
    graph.ir_version = min(graph.ir_version, ONNX_IR_VERSION)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def write_bundle(
    model: nn.Module,
    out_dir: Path,
    *,
    name: str,
    arch: str,
    classes: Sequence[str],
    spec: PreprocessSpec,
    cam_layer: str,
    version: str = "1",
    temperature: float = 1.0,
    decision: Decision | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    probes: dict[str, Any] | None = None,
    sources: dict[str, Any] | None = None,
    report_files: Sequence[Path] = (),
) -> ModelCard:
    """Write ``model`` as a bundle folder and return its card. The folder is replaced if it exists.

    ``spec`` is the training's preprocessing: the card's input size, mean/std and preprocessing id are
    taken from it, so the service normalises exactly as training did. The card is validated (e.g. that
    ``decision.positive_class`` is one of ``classes``) before anything is exported or deleted.
    """
    from safetensors.torch import save_file

    card = ModelCard(
        name=name,
        version=version,
        arch=arch,
        classes=list(classes),
        input_size=spec.size,
        mean=spec.mean,
        std=spec.std,
        preprocessing=spec.preprocessing,
        cam_layer=cam_layer,
        temperature=temperature,
        decision=decision,
        sha256={},
        metrics=metrics or {},
        training=training or {},
        calibration=calibration,
        probes=probes,
        sources=sources,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        git_commit=git_commit(),
    )
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / REPORT_DIR).mkdir(parents=True)
    model = model.eval().cpu().float()
    export_onnx(model, out_dir / ONNX_FILE, spec.size, arch=arch)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    for served_file in (ONNX_FILE, WEIGHTS_FILE):
        # safetensors writes 0600; a read-only bind mount for a non-root container user must be able to read it.
        (out_dir / served_file).chmod(0o644)
    for report_file in report_files:
        shutil.copy2(report_file, out_dir / REPORT_DIR / Path(report_file).name)
    card.sha256 = {f: sha256_file(out_dir / f) for f in (ONNX_FILE, WEIGHTS_FILE)}
    write_card(out_dir, card)
    return card


def write_card(bundle_dir: Path, card: ModelCard) -> str:
    """(Re)write card.json, e.g. to add metrics re-scored through ONNX Runtime after export, then the manifest
    over the folder as it now is; returns the bundle digest."""
    (Path(bundle_dir) / CARD_FILE).write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return write_manifest(bundle_dir)


def read_card(bundle_dir: Path) -> ModelCard:
    """Read and validate card.json of a bundle folder."""
    card_path = Path(bundle_dir) / CARD_FILE
    if not card_path.is_file():
        raise BundleNotFound(f"No model bundle at {bundle_dir}: {CARD_FILE} is missing.")
    try:
        card = ModelCard.model_validate_json(card_path.read_text())
    except ValidationError as err:
        raise InvalidCard(f"{card_path} is not a valid model card: {err.error_count()} problem(s).") from err
    if card.schema_version != CARD_SCHEMA_VERSION:
        raise InvalidCard(f"{card_path} has schema version {card.schema_version}; expected {CARD_SCHEMA_VERSION}.")
    try:
        card.spec  # noqa: B018 - validates size and preprocessing id
    except ValueError as err:
        raise InvalidCard(str(err)) from err
    return card


def verify_checksums(bundle_dir: Path, card: ModelCard) -> None:
    """Raise ChecksumMismatch/BundleNotFound unless the model files (and the gate file, when the card has a gate)
    hash to what the card says."""
    names = [ONNX_FILE, WEIGHTS_FILE]
    if card.gate is not None or GATE_FILE in card.sha256:
        names.append(GATE_FILE)
    for name in names:
        path = Path(bundle_dir) / name
        if not path.is_file():
            raise BundleNotFound(f"Model bundle {bundle_dir} has no {name}.")
        expected = card.sha256.get(name)
        actual = sha256_file(path)
        if expected != actual:
            raise ChecksumMismatch(
                f"{name} in {bundle_dir} does not match its card (sha256 {actual[:12]}…, expected "
                f"{(expected or 'none')[:12]}…): the bundle was modified or corrupted and will not be served."
            )


def bundle_files(bundle_dir: Path) -> list[str]:
    """Every file of the bundle but the manifest, as sorted POSIX paths relative to the folder."""
    bundle_dir = Path(bundle_dir)
    return sorted(
        path.relative_to(bundle_dir).as_posix()
        for path in bundle_dir.rglob("*")
        if path.is_file() and path.relative_to(bundle_dir).as_posix() != MANIFEST_FILE
    )


def write_manifest(bundle_dir: Path) -> str:
    """Write manifest.json over every file now in ``bundle_dir`` and return the bundle digest (its sha256).

    Call it last, after every other file (the card included) is in place: a later change makes the bundle
    unservable until the manifest is written again.
    """
    bundle_dir = Path(bundle_dir)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "algorithm": "sha256",
        "files": {name: sha256_file(bundle_dir / name) for name in bundle_files(bundle_dir)},
    }
    path = bundle_dir / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    path.chmod(0o644)
    return sha256_file(path)


def verify_manifest(bundle_dir: Path) -> str:
    """Check every file of ``bundle_dir`` against manifest.json; return the bundle digest.

    Raises ManifestMissing without a manifest, ManifestMismatch for a file that is missing, differs, or is not
    listed (an added file is refused too: nothing unvetted sits in a served folder).
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise ManifestMissing(
            f"The bundle has no {MANIFEST_FILE} (the sha256 of every file, card included). "
            "Check the folder's files, then write one with `cxr-train manifest BUNDLE_DIR`."
        )
    raw = path.read_bytes()
    try:
        listed = json.loads(raw)["files"]
        if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
            raise TypeError("files is not a mapping of names to digests")
    except (ValueError, KeyError, TypeError) as err:
        raise ManifestMismatch(f"{MANIFEST_FILE} is not a valid manifest ({type(err).__name__}).") from err
    present = set(bundle_files(bundle_dir))
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise ManifestMismatch(
            f"{_count(unlisted)} not in {MANIFEST_FILE} ({_names(unlisted)}): the bundle was modified and will not "
            "be served."
        )
    missing = sorted(set(listed) - present)
    if missing:
        raise ManifestMismatch(
            f"{_count(missing)} listed in {MANIFEST_FILE} missing ({_names(missing)}): the bundle is incomplete and "
            "will not be served."
        )
    changed = sorted(name for name, digest in listed.items() if sha256_file(bundle_dir / name) != digest)
    if changed:
        raise ManifestMismatch(
            f"{_names(changed)} {'does' if len(changed) == 1 else 'do'} not match {MANIFEST_FILE}: the bundle was "
            "modified or corrupted and will not be served."
        )
    return hashlib.sha256(raw).hexdigest()


def verify_digest(digest: str, expected: str | None) -> None:
    """Refuse a bundle whose digest is not the pinned one (``CXR_MODEL_SHA256``; None pins nothing)."""
    if expected is not None and digest != expected.lower():
        raise ManifestMismatch(
            f"its digest {digest[:12]}… is not the one CXR_MODEL_SHA256 expects "
            f"({expected.lower()[:12]}…): a different bundle was put in its place."
        )


def _count(names: Sequence[str]) -> str:
    return "1 file" if len(names) == 1 else f"{len(names)} files"


def _names(names: Sequence[str], most: int = 3) -> str:
    """At most ``most`` names, for a short reason."""
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def cpu_limit() -> int:
    """CPUs this process may use: the cgroup (container) quota when there is one, else its CPU affinity.

    ``os.cpu_count()`` counts the host's cores, so an ORT pool sized by it oversubscribes a limited container.
    """
    import math
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def make_session(
    onnx_path: Path, providers: Sequence[str] = DEFAULT_PROVIDERS, threads: int = 0
) -> ort.InferenceSession:
    """An ORT session over the requested providers that this onnxruntime build has, in the given order.

    ``threads``: ORT's intra-op pool size (0: ``cpu_limit()``). One inter-op thread: these CNNs are one chain of
    operators, so a second pool would only compete with the first.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    usable = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's provider fallback warnings are reported by us via get_providers()
    options.intra_op_num_threads = threads or cpu_limit()
    options.inter_op_num_threads = 1
    # Idle pool threads sleep rather than spin: spinning takes the cores that decoding and the event loop need
    # (measured on 2 CPUs: /predict p50 93 against 136 ms, 8 clients 13.3 against 11.0 img/s, in-process b1 72
    # against 114 ms).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=usable)


def ort_logits(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """Run the bundle's ONNX graph on an N x 3 x S x S batch and return N x C logits."""
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
    return np.asarray(logits)


def has_output(session: ort.InferenceSession, name: str) -> bool:
    """Whether the graph has output ``name`` (older bundles lack ``features`` and ``cam_activations``)."""
    return name in {output.name for output in session.get_outputs()}


def has_features(session: ort.InferenceSession) -> bool:
    """Whether the graph has the ``features`` output (bundles exported before the gate do not)."""
    return has_output(session, FEATURES_NAME)


def ort_outputs(session: ort.InferenceSession, batch: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """One run of the graph on an N x 3 x S x S batch: the named outputs, by name."""
    arrays = session.run(list(names), {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
    return {name: np.asarray(array) for name, array in zip(names, arrays, strict=True)}


def ort_logits_and_features(session: ort.InferenceSession, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One run of the graph: N x C logits and N x D pooled features (raises BundleError without ``features``)."""
    if not has_features(session):
        raise BundleError(
            f"This bundle's {ONNX_FILE} has no '{FEATURES_NAME}' output (it was exported before the gate); "
            f"export it again with this version."
        )
    logits, features = session.run(
        [OUTPUT_NAME, FEATURES_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}
    )
    return np.asarray(logits), np.asarray(features)


def load_torch_model(bundle_dir: Path, card: ModelCard) -> nn.Module:
    """Rebuild the torch copy of the network from weights.safetensors (eval mode, CPU); ParityMismatch when the
    weights do not fit the card's architecture and classes."""
    from service.model.backbones import build

    try:
        model = build(card.arch, len(card.classes), Path(bundle_dir) / WEIGHTS_FILE)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ParityMismatch(
            f"weights.safetensors does not fit a {card.arch} with {len(card.classes)} classes "
            f"({_short(err, Path(bundle_dir)).rstrip(':')})."
        ) from err
    return model.eval()


def probe_batch(spec: PreprocessSpec, n: int = 2, seed: int = 0) -> np.ndarray:
    """A deterministic input batch in the network's normalised range, for parity checks."""
    return np.random.default_rng(seed).standard_normal((n, 3, spec.size, spec.size)).astype(np.float32)


def check_parity(
    session: ort.InferenceSession,
    model: nn.Module,
    spec: PreprocessSpec,
    arch: str | None = None,
    allowance: dict[str, float] | None = None,
) -> float:
    """Max |ONNX - torch| logit difference on the probe batch; raises ParityMismatch above tolerance.

    Every further output the graph has (``features``, ``cam_activations``; ``arch`` given) is checked the same way.
    ``allowance``: per output, added to the tolerance (a quantised graph's, from its card: ``parity_allowance``).
    """
    import torch

    batch = probe_batch(spec)
    with_features = arch is not None and has_features(session)
    reference, names = _graph_module(model, arch if with_features else None, has_output(session, CAM_ACTIVATIONS_NAME))
    with torch.no_grad():
        want_outputs = reference(torch.from_numpy(batch))
    if not isinstance(want_outputs, tuple):
        want_outputs = (want_outputs,)
    expected = {name: tensor.numpy() for name, tensor in zip(names, want_outputs, strict=True)}
    actual = ort_outputs(session, batch, names)
    on_cuda = "CUDAExecutionProvider" in session.get_providers()
    atol, rtol = (PARITY_CUDA_TOL, PARITY_CUDA_TOL) if on_cuda else (PARITY_ATOL, PARITY_RTOL)
    diffs = {}
    for name, want in expected.items():
        got = actual[name]
        if got.shape != want.shape:
            raise ParityMismatch(f"ONNX outputs {name} of shape {got.shape} but the torch copy {want.shape}.")
        diffs[name] = float(np.max(np.abs(got - want)))
        tolerance = atol + rtol * float(np.max(np.abs(want))) + (allowance or {}).get(name, 0.0)
        if not diffs[name] <= tolerance:
            raise ParityMismatch(
                f"model.onnx and weights.safetensors disagree: max {_WHAT[name]} difference {diffs[name]:.3g} exceeds "
                f"{tolerance:.3g}; the two files are not the same network and will not be served."
            )
    return diffs[OUTPUT_NAME]


def load_bundle_gate(bundle_dir: Path, card: ModelCard, session: ort.InferenceSession) -> Gate | None:
    """The bundle's verified gate, or None for a bundle without one; BundleError if it cannot be used."""
    if card.gate is None:
        return None
    try:
        gate = load_gate(Path(bundle_dir) / GATE_FILE, card.sha256.get(GATE_FILE))
    except GateError as err:
        raise ChecksumMismatch(str(err)) from err
    if not has_features(session):
        raise InvalidCard(f"The card has a gate but {ONNX_FILE} has no '{FEATURES_NAME}' output for it to score.")
    (width,) = [o.shape[1] for o in session.get_outputs() if o.name == FEATURES_NAME]
    if isinstance(width, int) and width != gate.feature_dim:
        raise InvalidCard(f"The gate expects {gate.feature_dim} features but {ONNX_FILE} gives {width}.")
    if float(card.gate.get("threshold", gate.threshold)) != gate.threshold:
        raise InvalidCard("The card's gate threshold differs from the one in the gate file.")
    return gate


def load_bundle(
    bundle_dir: str | Path,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    *,
    with_torch: bool = True,
    with_gate: bool = True,
    threads: int = 0,
) -> LoadedBundle:
    """Load and verify a bundle: card, checksums, ORT session, (``with_torch``) the torch copy + parity, and
    (``with_gate``) the gate, when the card has one. ``threads``: ORT's intra-op threads (0: ``cpu_limit()``)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleNotFound(f"No model bundle at {bundle_dir}: the folder does not exist.")
    card = read_card(bundle_dir)
    verify_checksums(bundle_dir, card)
    digest = verify_manifest(bundle_dir)
    try:
        session = make_session(bundle_dir / ONNX_FILE, providers, threads)
    except Exception as err:  # ORT raises its own exception types for invalid graphs
        raise BundleError(f"onnxruntime cannot load {ONNX_FILE}: {_short(err, bundle_dir)}") from err
    in_use = list(session.get_providers())
    bundle = LoadedBundle(path=bundle_dir, card=card, session=session, providers=in_use, digest=digest)
    if with_gate:
        bundle.gate = load_bundle_gate(bundle_dir, card, session)
    if with_torch:
        try:
            bundle.torch_model = load_torch_model(bundle_dir, card)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ParityMismatch(
                f"weights.safetensors does not fit a {card.arch} with {len(card.classes)} classes "
                f"({_short(err, bundle_dir).rstrip(':')})."
            ) from err
        bundle.parity_max_abs_diff = check_parity(
            session, bundle.torch_model, card.spec, card.arch, card.parity_allowance
        )
    logger.info(
        "loaded bundle %s (%s, bundle sha256 %s, model.onnx %s) on %s",
        card.name,
        card.arch,
        digest[:12],
        bundle.onnx_sha256[:12],
        ",".join(in_use),
    )
    return bundle
