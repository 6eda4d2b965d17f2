"""An int8 copy of a bundle: static QDQ quantisation of its ONNX graph with ONNX Runtime's tools.

    fp32 bundle --quant_pre_process--> shape-inferred, optimised graph (each Conv + BatchNorm folded)
                --batchnorm_as_depthwise--> the BatchNorms left, as 1 x 1 depthwise convolutions
                --quantize_static (QDQ, int8 weights per output channel, uint8 activations per tensor, MinMax
                  ranges from a few hundred training images, one range over each Concat's inputs and output)
                  --> int8 graph
                --scored on the test and source-held-out splits next to fp32--> refused when macro-F1 drops by
                  more than ``max_macro_f1_drop`` on either, else written as a separate bundle

The head stays fp32: every node after the CAM layer (pooling, reshape, the linear layer) is excluded, so the
graph's ``logits`` are exactly ``W pool(cam_activations) + b`` of its own (quantised) activations and the
closed-form Grad-CAM still holds (the predictor checks that at load, as for fp32). ``weights.safetensors`` is the
fp32 network unchanged: the torch reference. The graph is within quantisation error of it, not within 1e-3, so
the card records ``quantization.parity_allowance``: per output, twice the difference measured on the probe
batch at export (``load_bundle`` adds it to the fp32 tolerance; a different network is still far outside it).
DenseNet's BatchNorms come *before* a ReLU and its convolution (pre-activation), so no folding removes them. Left
as they are they run fp32 between dequantise/quantise pairs, and each forces a layout transpose around the int8
convolutions, which ORT runs in NHWC: measured on DenseNet-121 (2 cores with VNNI, ORT's profiler, b8), BN 25 %,
transposes 10 % and quantise/dequantise 11 % of the int8 run. A BatchNorm in eval mode is a per-channel affine map
``y = k x + b`` (``k = gamma / sqrt(var + eps)``, ``b = beta - mean k``): exactly a 1 x 1 convolution with one
group per channel. As that, it is quantised like any convolution (a per-channel int8 weight holds a single value
exactly; the bias is int32) and its ReLU fuses into the output's quantisation, so the whole chain stays int8 in
NHWC (fp32 graphs are unchanged: this runs on the copy that is quantised).

The gate file is copied: it scores the int8 graph's features, and the card records its pass rate on real X-rays
next to fp32. Calibration (temperature) and the decision threshold are the fp32 bundle's.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.model.bundle import (
    CARD_FILE,
    FEATURES_NAME,
    INPUT_NAME,
    MANIFEST_FILE,
    ONNX_FILE,
    OUTPUT_NAME,
    WEIGHTS_FILE,
    LoadedBundle,
    git_commit,
    has_output,
    load_bundle,
    make_session,
    ort_outputs,
    probe_batch,
    sha256_file,
    write_card,
)
from service.model.cam import CAM_ACTIVATIONS_NAME, ClosedFormCam, closed_form_head, load_head_weight
from service.model.preprocess import PreprocessSpec, preprocess
from service.model.probabilities import softmax
from training import metrics as mt

logger = logging.getLogger(__name__)

CPU = ["CPUExecutionProvider"]
# v2: BatchNorms quantised as depthwise convolutions, Concat groups on one range.
QUANTIZATION_METHOD = "onnxruntime-static-qdq-v2"
MAX_MACRO_F1_DROP = 0.01  # one point
CALIBRATION_IMAGES = 300
BATCH = 8
# The load-time allowance is this many times the difference measured at export (run-to-run and thread-count
# differences of int8 kernels are far smaller; a different network's are far larger).
ALLOWANCE_MARGIN = 2.0


class QuantizationRefused(ValueError):
    """The int8 graph loses more macro-F1 than allowed on a split; nothing was written."""


@dataclass(frozen=True)
class LabelledImages:
    """One scored split: 2-D float32 [0, 1] images, class indices (the bundle's order) and their sources."""

    images: Sequence[np.ndarray]
    labels: np.ndarray
    sources: Sequence[str]


class _BatchReader:
    """onnxruntime's CalibrationDataReader protocol over preprocessed batches, once."""

    def __init__(self, batches: Sequence[dict[str, np.ndarray]]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def head_nodes(graph: Any) -> list[str]:
    """Names of the nodes after the CAM layer (the tensor ``cam_activations``, else the pooled ``features`` and
    the node that pools them): the head, kept fp32."""
    outputs = {o.name for o in graph.output}
    start = CAM_ACTIVATIONS_NAME if CAM_ACTIVATIONS_NAME in outputs else FEATURES_NAME
    reached, names = {start}, []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if start == FEATURES_NAME and start in node.output:
            names.append(node.name)
        elif reached & set(node.input):
            reached |= set(node.output)
            names.append(node.name)
    return names


def batchnorm_as_depthwise(model: Any) -> int:
    """Replace, in place, every BatchNormalization node of the ONNX ``model`` by the 1 x 1 depthwise Conv of the
    same affine map (see the module docstring); drops the initializers nothing reads any more. Returns how many."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes, replaced = [], 0
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            nodes.append(node)
            continue
        x, gamma, beta, mean, var = node.input[:5]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        g, b, m, v = (numpy_helper.to_array(initializers[n]).astype(np.float64) for n in (gamma, beta, mean, var))
        scale = g / np.sqrt(v + eps)
        # Named after the output tensor: node names may be empty or repeated, tensor names are unique.
        out = node.output[0]
        weight, bias = f"{out}.depthwise.weight", f"{out}.depthwise.bias"
        graph.initializer.extend(
            [
                numpy_helper.from_array(scale.reshape(-1, 1, 1, 1).astype(np.float32), weight),
                numpy_helper.from_array((b - m * scale).astype(np.float32), bias),
            ]
        )
        nodes.append(
            helper.make_node(
                "Conv",
                [x, weight, bias],
                [out],
                name=f"{out}.depthwise",
                group=len(scale),
                kernel_shape=[1, 1],
            )
        )
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    read = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return replaced


def concat_shared_ranges(graph: Any, ranges: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The calibrated ``ranges`` of every tensor that a Concat node joins (its inputs and output, transitively: a
    DenseNet block's features and all its concatenations), widened to their group's union; other tensors are not
    in the result. With one scale and zero point on all sides, ORT's int8 Concat copies bytes instead of
    requantising each input through a lookup table."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for node in graph.node:
        if node.op_type == "Concat":
            for name in [*node.input, *node.output]:
                parent[root(name)] = root(node.output[0])
    union: dict[str, tuple[float, float]] = {}
    for name in parent:
        if name in ranges:
            low, high = union.get(root(name), ranges[name])
            union[root(name)] = (min(low, ranges[name][0]), max(high, ranges[name][1]))
    return {name: union[root(name)] for name in parent if name in ranges}


def quantize_graph(source_onnx: Path, out_onnx: Path, calibration: Sequence[np.ndarray], spec: PreprocessSpec) -> dict:
    """Write the int8 QDQ graph of ``source_onnx``; returns what was done (for the card)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, create_calibrator, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [
        {INPUT_NAME: preprocess(list(calibration[i : i + BATCH]), spec)} for i in range(0, len(calibration), BATCH)
    ]

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and ORT's basic graph optimisations first, as onnxruntime recommends for quantisation.
        quant_pre_process(str(source_onnx), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        depthwise = batchnorm_as_depthwise(model)
        onnx.save(model, str(prepared))
        excluded = head_nodes(model.graph)
        # MinMax ranges measured here first, so that Concat groups can share theirs; quantize_static measures the
        # same ranges again and takes the shared ones as overrides.
        calibrator = create_calibrator(
            prepared, augmented_model_path=str(Path(tmp) / "augmented.onnx"), calibrate_method=CalibrationMethod.MinMax
        )
        calibrator.collect_data(_BatchReader(batches))
        ranges = {
            name: (float(np.min(data.range_value[0])), float(np.max(data.range_value[1])))
            for name, data in calibrator.compute_data().items()
        }
        shared = concat_shared_ranges(model.graph, ranges)
        quantize_static(
            str(prepared),
            str(out_onnx),
            _BatchReader(batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,  # u8 activations x s8 weights: the x86 fast path
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "TensorQuantOverrides": {
                    name: [{"rmin": np.float32(low), "rmax": np.float32(high)}] for name, (low, high) in shared.items()
                }
            },
        )
    out_onnx.chmod(0o644)
    return {
        "format": "QDQ",
        "weights": "int8, symmetric, per output channel",
        "activations": "uint8, per tensor, MinMax ranges; a Concat's inputs and output share one range",
        "concat_shared_tensors": len(shared),
        "fp32_nodes": excluded,
        "batchnorms_as_depthwise_conv": depthwise,
        "calibration_images": len(calibration),
    }


def score_images(
    session: Any, spec: PreprocessSpec, images: Sequence[np.ndarray], names: list[str]
) -> dict[str, np.ndarray]:
    parts = [
        ort_outputs(session, preprocess(list(images[i : i + BATCH]), spec), names) for i in range(0, len(images), BATCH)
    ]
    return {name: np.concatenate([p[name] for p in parts]) for name in names}


def split_metrics(bundle: LoadedBundle, outputs: dict[str, np.ndarray], split: LabelledImages) -> dict[str, Any]:
    """Argmax metrics, per source, calibration and (with a decision rule) the operating point, as export records."""
    card = bundle.card
    probabilities = softmax(outputs[OUTPUT_NAME], card.temperature)
    result = mt.classification_metrics(split.labels, probabilities, card.classes)
    result["per_source"] = mt.per_source_metrics(split.labels, probabilities, list(split.sources), card.classes)
    result["calibration"] = mt.calibration_metrics(split.labels, probabilities)
    if card.decision is not None:
        positive = card.classes.index(card.decision.positive_class)
        decided = mt.decided_labels(probabilities, positive, card.decision.threshold)
        at_point = mt.classification_metrics(split.labels, np.eye(len(card.classes))[decided], card.classes)
        result["at_operating_point"] = mt.threshold_metrics(
            split.labels == positive, probabilities[:, positive], card.decision.threshold
        ) | {"accuracy": at_point["accuracy"], "macro_f1": at_point["macro_f1"]}
    if bundle.gate is not None and FEATURES_NAME in outputs:
        result["gate_pass_rate"] = float(np.mean(bundle.gate.scores(outputs[FEATURES_NAME]) <= bundle.gate.threshold))
    return result


def macro_f1_refusal(comparison: Mapping[str, Mapping[str, float]], max_drop: float) -> str | None:
    """Why the int8 graph is refused (its macro-F1 drop on some split exceeds ``max_drop``), or None."""
    worst = max(comparison, key=lambda s: comparison[s]["macro_f1_drop"])
    if comparison[worst]["macro_f1_drop"] <= max_drop:
        return None
    figures = ", ".join(f"{s} {c['int8_macro_f1']:.4f} vs fp32 {c['fp32_macro_f1']:.4f}" for s, c in comparison.items())
    return (
        f"The int8 graph loses {100 * comparison[worst]['macro_f1_drop']:.2f} points of macro-F1 on {worst} (more "
        f"than {100 * max_drop:.2f}): {figures}. No int8 bundle was written."
    )


def parity_allowance(source: LoadedBundle, int8_session: Any) -> dict[str, float]:
    """Per output, ALLOWANCE_MARGIN x |int8 - fp32| on the probe batch, and ``cam`` for the closed-form heatmaps."""
    spec, card = source.card.spec, source.card
    names = [o.name for o in int8_session.get_outputs()]
    batch = probe_batch(spec)
    fp32, int8 = ort_outputs(source.session, batch, names), ort_outputs(int8_session, batch, names)
    allowance = {name: ALLOWANCE_MARGIN * float(np.max(np.abs(int8[name] - fp32[name]))) for name in names}
    head = closed_form_head(card.arch, card.cam_layer)
    if head is not None and CAM_ACTIVATIONS_NAME in names:
        cam = ClosedFormCam(load_head_weight(source.path / WEIGHTS_FILE, head), head.relu_before_pool)
        targets = [i % len(card.classes) for i in range(len(batch))]
        maps = [cam.maps(outputs[CAM_ACTIVATIONS_NAME], targets, spec.size) for outputs in (fp32, int8)]
        allowance["cam"] = min(1.0, ALLOWANCE_MARGIN * float(np.max(np.abs(maps[1] - maps[0]))))
    return allowance


def quantize_bundle(
    source_dir: Path,
    out_dir: Path,
    calibration: Sequence[np.ndarray],
    evaluation: Mapping[str, LabelledImages],
    *,
    max_macro_f1_drop: float = MAX_MACRO_F1_DROP,
) -> dict[str, Any]:
    """Write an int8 copy of the bundle at ``source_dir`` to ``out_dir`` (replaced) and return its card's
    ``quantization`` block; QuantizationRefused (``out_dir`` untouched) when macro-F1 drops by more than
    ``max_macro_f1_drop`` on any split of ``evaluation``.

    ``calibration``: 2-D float32 [0, 1] training images (a few hundred); ``evaluation``: the test and source-held-out
    splits, scored through both graphs.
    """
    import onnxruntime

    source = load_bundle(source_dir, CPU, with_torch=False)
    if source.card.quantization is not None:
        raise ValueError(f"The bundle at {source_dir} is quantised already.")
    if not evaluation:
        raise ValueError("Quantisation needs at least one labelled split to compare macro-F1 on.")
    spec = source.card.spec
    with tempfile.TemporaryDirectory() as tmp:
        int8_onnx = Path(tmp) / ONNX_FILE
        how = quantize_graph(source_dir / ONNX_FILE, int8_onnx, calibration, spec)
        int8_session = make_session(int8_onnx, CPU)
        names = [OUTPUT_NAME] + [n for n in (FEATURES_NAME,) if has_output(int8_session, n)]
        int8_bundle = LoadedBundle(source.path, source.card, int8_session, CPU, gate=source.gate)
        by_split: dict[str, dict[str, Any]] = {}
        comparison: dict[str, dict[str, float]] = {}
        for split, labelled in evaluation.items():
            fp32_metrics = split_metrics(source, score_images(source.session, spec, labelled.images, names), labelled)
            int8_metrics = split_metrics(
                int8_bundle, score_images(int8_session, spec, labelled.images, names), labelled
            )
            by_split[split] = int8_metrics
            comparison[split] = {
                "n": len(labelled.labels),
                "fp32_macro_f1": fp32_metrics["macro_f1"],
                "int8_macro_f1": int8_metrics["macro_f1"],
                "macro_f1_drop": fp32_metrics["macro_f1"] - int8_metrics["macro_f1"],
            }
            for key in ("gate_pass_rate",):
                if key in int8_metrics:
                    comparison[split] |= {f"fp32_{key}": fp32_metrics[key], f"int8_{key}": int8_metrics[key]}
            logger.info(
                "int8 %s: macro-F1 %.4f (fp32 %.4f) on %d images",
                split,
                int8_metrics["macro_f1"],
                fp32_metrics["macro_f1"],
                len(labelled.labels),
            )
        refusal = macro_f1_refusal(comparison, max_macro_f1_drop)
        if refusal is not None:
            raise QuantizationRefused(refusal)
        quantization = {
            "method": QUANTIZATION_METHOD,
            **how,
            "onnxruntime": onnxruntime.__version__,
            "source": {
                "name": source.card.name,
                "version": source.card.version,
                "model_onnx_sha256": source.onnx_sha256,
                "bundle_sha256": source.digest,
            },
            "max_macro_f1_drop": max_macro_f1_drop,
            "macro_f1": comparison,
            "parity_allowance": parity_allowance(source, int8_session),
            "explain_engine": "onnx" if has_output(int8_session, CAM_ACTIVATIONS_NAME) else "torch",
        }
        _write(source, out_dir, int8_onnx, quantization, by_split)
    return quantization


def _write(
    source: LoadedBundle,
    out_dir: Path,
    int8_onnx: Path,
    quantization: dict[str, Any],
    by_split: dict[str, dict[str, Any]],
) -> None:
    """The source bundle's files with the int8 graph, its card re-scored and the manifest written last."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(source.path, out_dir, ignore=shutil.ignore_patterns(MANIFEST_FILE, CARD_FILE, ONNX_FILE))
    shutil.copy2(int8_onnx, out_dir / ONNX_FILE)
    card = source.card.model_copy(deep=True)
    card.version = f"{source.card.version}-int8"
    card.sha256 = {**card.sha256, ONNX_FILE: sha256_file(out_dir / ONNX_FILE)}
    headline = "heldout_test" if "heldout_test" in by_split else next(iter(by_split))
    card.metrics = by_split.get("test", {}) | {
        "split": "test" if "test" in by_split else headline,
        "scored_with": "onnxruntime int8 (CPUExecutionProvider)",
        "headline_split": headline,
        "by_split": {s: m for s, m in by_split.items() if s != "test"},
    }
    card.quantization = quantization
    card.created_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    card.git_commit = git_commit()
    write_card(out_dir, card)
    # What was written verifies as the service checks it: checksums, manifest, gate, the head, the torch reference.
    from service.predictor import Predictor

    Predictor.load(out_dir, CPU)


EVALUATED_SPLITS = ("test", "heldout_test")


def calibration_sample(images: np.ndarray, count: int = CALIBRATION_IMAGES, seed: int = 0) -> list[np.ndarray]:
    """``count`` of the N x S x S uint8 training images (seeded), as 2-D float32 [0, 1] arrays."""
    pick = np.sort(np.random.default_rng(seed).choice(len(images), min(count, len(images)), replace=False))
    return [images[i].astype(np.float32) / 255.0 for i in pick]


def splits_from_csv(
    split_csv: Path,
    data_root: Path,
    classes: Sequence[str],
    size: int,
    *,
    calibration_images: int = CALIBRATION_IMAGES,
    seed: int = 0,
) -> tuple[list[np.ndarray], dict[str, LabelledImages]]:
    """Calibration images (from ``train``) and the evaluated splits of a split.csv (``path,label,split[,source]``,
    paths relative to ``data_root``), decoded in the network's geometry: what a bundle's report/split.csv allows
    when its run folder is gone."""
    from training.data import load_images, resolve

    rows = split_rows(split_csv)
    if not rows.get("train"):
        raise ValueError(f"{split_csv} has no train images to calibrate on.")
    train = [resolve(data_root, r["path"]) for r in rows["train"]]
    pick = np.sort(np.random.default_rng(seed).choice(len(train), min(calibration_images, len(train)), replace=False))
    calibration = [a.astype(np.float32) / 255.0 for a in load_images([train[i] for i in pick], size)]
    return calibration, labelled_splits(split_csv, data_root, classes, size, EVALUATED_SPLITS)


def split_rows(split_csv: Path) -> dict[str, list[dict[str, str]]]:
    """The rows of a split.csv by split."""
    import csv

    with Path(split_csv).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_split: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_split.setdefault(row["split"], []).append(row)
    return by_split


def labelled_splits(
    split_csv: Path, data_root: Path, classes: Sequence[str], size: int, splits: Sequence[str]
) -> dict[str, LabelledImages]:
    """The ``splits`` of a split.csv that have images, decoded in the network's geometry as the run decoded them."""
    from service.model.labels import canonical_label
    from training.data import load_images, resolve

    rows = split_rows(split_csv)
    evaluation = {}
    for split in splits:
        if rows.get(split):
            part = rows[split]
            images = load_images([resolve(data_root, r["path"]) for r in part], size)
            labels = np.array([list(classes).index(canonical_label(r["label"])) for r in part], dtype=np.int64)
            evaluation[split] = LabelledImages(
                [a.astype(np.float32) / 255.0 for a in images], labels, [r.get("source", "") for r in part]
            )
    return evaluation
