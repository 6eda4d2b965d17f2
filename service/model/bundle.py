"""The model bundle: a self-describing folder that training writes and the service loads.

    model.onnx            input ``image`` (N x 3 x S x S float32), output ``logits`` (N x C), dynamic N
    weights.safetensors   the same network's state dict, for Grad-CAM on a torch copy
    card.json             ModelCard: classes, input size, mean/std, preprocessing, CAM layer, checksums, metrics
    report/               plots (confusion matrix, curves, Grad-CAM grid, comparison)

``load_bundle`` refuses a bundle whose files do not match the checksums in its card, or whose ONNX graph and
torch weights disagree on a probe input (tolerance: ``PARITY_ATOL + PARITY_RTOL * max|logit|``).
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, PREPROCESSING_ID, PreprocessSpec

if TYPE_CHECKING:
    import onnxruntime as ort
    from torch import nn

logger = logging.getLogger(__name__)

CARD_SCHEMA_VERSION = 1
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
REPORT_DIR = "report"
# Opset 18 / IR 10 (what torch's exporter writes) load in onnxruntime(-gpu) >= 1.17, inside the pinned range;
# a newer exporter's higher IR version is lowered so old runtimes keep working.
ONNX_OPSET = 18
ONNX_IR_VERSION = 10
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
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
    created_at: str
    git_commit: str | None = None
    disclaimer: str = "Research use only. Not a medical device; never use for diagnosis."

    @property
    def spec(self) -> PreprocessSpec:
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


def export_onnx(model: nn.Module, path: Path, input_size: int, opset: int = ONNX_OPSET) -> None:
    """Export ``model`` (eval, CPU, fp32) to ONNX with a dynamic batch axis, opset/IR pinned for old runtimes."""
    import onnx
    import torch

    model = model.eval().cpu().float()
    dummy = torch.zeros(1, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
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
    input_size: int,
    cam_layer: str,
    version: str = "1",
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    temperature: float = 1.0,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    report_files: Sequence[Path] = (),
) -> ModelCard:
    """Write ``model`` as a bundle folder and return its card. The folder is replaced if it exists."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / REPORT_DIR).mkdir(parents=True)
    model = model.eval().cpu().float()
    export_onnx(model, out_dir / ONNX_FILE, input_size)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    for served_file in (ONNX_FILE, WEIGHTS_FILE):
        # safetensors writes 0600; a read-only bind mount for a non-root container user must be able to read it.
        (out_dir / served_file).chmod(0o644)
    for report_file in report_files:
        shutil.copy2(report_file, out_dir / REPORT_DIR / Path(report_file).name)
    card = ModelCard(
        name=name,
        version=version,
        arch=arch,
        classes=list(classes),
        input_size=input_size,
        mean=mean,
        std=std,
        cam_layer=cam_layer,
        temperature=temperature,
        sha256={f: sha256_file(out_dir / f) for f in (ONNX_FILE, WEIGHTS_FILE)},
        metrics=metrics or {},
        training=training or {},
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        git_commit=git_commit(),
    )
    write_card(out_dir, card)
    return card


def write_card(bundle_dir: Path, card: ModelCard) -> None:
    """(Re)write card.json, e.g. to add metrics re-scored through ONNX Runtime after export."""
    (Path(bundle_dir) / CARD_FILE).write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")


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
        raise InvalidCard(
            f"{card_path} has schema version {card.schema_version}; expected {CARD_SCHEMA_VERSION}."
        )
    try:
        card.spec  # noqa: B018 - validates size and preprocessing id
    except ValueError as err:
        raise InvalidCard(str(err)) from err
    return card


def verify_checksums(bundle_dir: Path, card: ModelCard) -> None:
    """Raise ChecksumMismatch/BundleNotFound unless both files hash to what the card says."""
    for name in (ONNX_FILE, WEIGHTS_FILE):
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


def make_session(onnx_path: Path, providers: Sequence[str] = DEFAULT_PROVIDERS) -> ort.InferenceSession:
    """An ORT session over the requested providers that this onnxruntime build has, in the given order."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    usable = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's provider fallback warnings are reported by us via get_providers()
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=usable)


def ort_logits(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """Run the bundle's ONNX graph on an N x 3 x S x S batch and return N x C logits."""
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
    return np.asarray(logits)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (N x C in, N x C out, rows sum to 1).

    With the card's temperature this turns the bundle's logits into its calibrated probabilities.
    """
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def load_torch_model(bundle_dir: Path, card: ModelCard) -> nn.Module:
    """Rebuild the torch copy of the network from weights.safetensors (eval mode, CPU)."""
    from service.model.backbones import build

    model = build(card.arch, len(card.classes), Path(bundle_dir) / WEIGHTS_FILE)
    return model.eval()


def probe_batch(spec: PreprocessSpec, n: int = 2, seed: int = 0) -> np.ndarray:
    """A deterministic input batch in the network's normalised range, for parity checks."""
    return np.random.default_rng(seed).standard_normal((n, 3, spec.size, spec.size)).astype(np.float32)


def check_parity(session: ort.InferenceSession, model: nn.Module, spec: PreprocessSpec) -> float:
    """Max |ONNX - torch| logit difference on the probe batch; raises ParityMismatch above tolerance."""
    import torch

    batch = probe_batch(spec)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    actual = ort_logits(session, batch)
    if actual.shape != expected.shape:
        raise ParityMismatch(f"ONNX outputs shape {actual.shape} but the torch copy {expected.shape}.")
    diff = float(np.max(np.abs(actual - expected)))
    on_cuda = "CUDAExecutionProvider" in session.get_providers()
    atol, rtol = (PARITY_CUDA_TOL, PARITY_CUDA_TOL) if on_cuda else (PARITY_ATOL, PARITY_RTOL)
    tolerance = atol + rtol * float(np.max(np.abs(expected)))
    if not diff <= tolerance:
        raise ParityMismatch(
            f"model.onnx and weights.safetensors disagree: max logit difference {diff:.3g} exceeds "
            f"{tolerance:.3g}; the two files are not the same network and will not be served."
        )
    return diff


def load_bundle(
    bundle_dir: str | Path,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    *,
    with_torch: bool = True,
) -> LoadedBundle:
    """Load and verify a bundle: card, checksums, ORT session, and (``with_torch``) the torch copy + parity."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleNotFound(f"No model bundle at {bundle_dir}: the folder does not exist.")
    card = read_card(bundle_dir)
    verify_checksums(bundle_dir, card)
    try:
        session = make_session(bundle_dir / ONNX_FILE, providers)
    except Exception as err:  # ORT raises its own exception types for invalid graphs
        raise BundleError(f"onnxruntime cannot load {bundle_dir / ONNX_FILE}: {err}") from err
    in_use = list(session.get_providers())
    bundle = LoadedBundle(path=bundle_dir, card=card, session=session, providers=in_use)
    if with_torch:
        try:
            bundle.torch_model = load_torch_model(bundle_dir, card)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ParityMismatch(
                f"weights.safetensors does not fit a {card.arch} with {len(card.classes)} classes: {err}"
            ) from err
        bundle.parity_max_abs_diff = check_parity(session, bundle.torch_model, card.spec)
    logger.info(
        "loaded bundle %s (%s, sha256 %s) on %s",
        card.name,
        card.arch,
        bundle.onnx_sha256[:12],
        ",".join(in_use),
    )
    return bundle
