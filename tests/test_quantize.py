"""training.quantize: an int8 QDQ copy of a bundle that loads verified (with its recorded parity allowance),
explains in closed form, records macro-F1 next to fp32, and is refused when it loses more than a point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.model.bundle import (
    CARD_FILE,
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAME,
    WEIGHTS_FILE,
    ParityMismatch,
    load_bundle,
    sha256_file,
    write_manifest,
)
from service.model.cam import CAM_ACTIVATIONS_NAME
from service.model.preprocess import PreprocessSpec
from service.predictor import Predictor
from tests.fixtures.bundles import CLASSES_3, CPU
from tests.fixtures.synthetic import write_dataset, write_split_csv, xray_unit
from training.cli import main as train_main
from training.quantize import (
    LabelledImages,
    QuantizationRefused,
    batchnorm_as_depthwise,
    concat_shared_ranges,
    head_nodes,
    macro_f1_refusal,
    quantize_bundle,
    quantize_graph,
    splits_from_csv,
)

SPLIT_OF = {0: "train", 1: "train", 2: "test", 3: "heldout_test"}  # image index mod 4 -> split


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Synthetic X-rays (flat CLASS/*.png) and a split.csv over them, paths relative to the root."""
    root = write_dataset(tmp_path_factory.mktemp("data"), {"COVID": 12, "Normal": 12, "Viral Pneumonia": 12})
    return root, write_split_csv(root, lambda i: SPLIT_OF[i % 4], lambda i: f"src{i % 2}")


@pytest.fixture(scope="module")
def int8_dir(bundle_dir: Path, dataset: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, split_csv = dataset
    out = tmp_path_factory.mktemp("int8") / "bundle-int8"
    args = ["quantize", str(bundle_dir), "--out", str(out), "--data-root", str(root), "--split-csv", str(split_csv)]
    assert train_main([*args, "--calibration-images", "16"]) == 0
    return out


def _rewrite_card(bundle: Path, change: dict[str, object]) -> None:
    card = json.loads((bundle / CARD_FILE).read_text())
    card.update(change)
    (bundle / CARD_FILE).write_text(json.dumps(card))
    write_manifest(bundle)


def test_the_int8_bundle_loads_verified_and_explains_in_closed_form(int8_dir: Path, predictor: Predictor) -> None:
    import onnx

    int8 = Predictor.load(int8_dir, CPU)
    assert int8.reference_check == "passed" and int8.explain_engine == "onnx"
    card = int8.card
    assert card.version == f"{predictor.card.version}-int8"
    assert card.quantization is not None and card.metrics["scored_with"] == "onnxruntime int8 (CPUExecutionProvider)"
    assert set(card.quantization["macro_f1"]) == {"test", "heldout_test"}
    for figures in card.quantization["macro_f1"].values():
        assert figures["n"] == 9
        assert figures["macro_f1_drop"] == pytest.approx(figures["fp32_macro_f1"] - figures["int8_macro_f1"])
    assert card.quantization["calibration_images"] == 16
    assert card.quantization["batchnorms_as_depthwise_conv"] == 0  # ResNet's BatchNorms all fold into its convs
    assert set(card.parity_allowance) == {"logits", "features", CAM_ACTIVATIONS_NAME, "cam"}
    assert card.sha256[WEIGHTS_FILE] == predictor.card.sha256[WEIGHTS_FILE]  # the fp32 torch reference, unchanged
    graph = onnx.load(str(int8_dir / ONNX_FILE)).graph
    kinds = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4 for t in graph.initializer)  # conv weights
    producers = {out: node.op_type for node in graph.node for out in node.output}
    (gemm,) = [node for node in graph.node if node.op_type == "Gemm"]
    assert gemm.name in head_nodes(graph) and gemm.input[1] not in producers  # the head is fp32: its own weights
    (head_weight,) = [t for t in graph.initializer if t.name == gemm.input[1]]
    assert head_weight.data_type == onnx.TensorProto.FLOAT
    assert int8.check_closed_form_head() < 1e-4  # logits are exactly the head of its own activations
    image = xray_unit(seed=4)
    got, want = int8.predict(image).probabilities, predictor.predict(image).probabilities
    assert max(abs(got[c] - want[c]) for c in CLASSES_3) < 0.05
    assert np.abs(int8.heatmap(image, "COVID") - predictor.heatmap(image, "COVID")).max() < 0.25


def test_the_recorded_allowance_is_what_admits_the_int8_graph(int8_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "no-allowance"
    shutil.copytree(int8_dir, copy)
    card = json.loads((copy / CARD_FILE).read_text())
    _rewrite_card(copy, {"quantization": {**card["quantization"], "parity_allowance": {}}})
    with pytest.raises(ParityMismatch, match="disagree"):
        load_bundle(copy, CPU)  # the fp32 tolerance is far tighter than int8 error


def test_another_network_is_refused_despite_the_allowance(int8_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from service.model.backbones import build

    copy = tmp_path / "other-weights"
    shutil.copytree(int8_dir, copy)
    torch.manual_seed(123)
    save_file({k: v.contiguous() for k, v in build("resnet18", 3).state_dict().items()}, str(copy / WEIGHTS_FILE))
    card = json.loads((copy / CARD_FILE).read_text())
    _rewrite_card(copy, {"sha256": {**card["sha256"], WEIGHTS_FILE: sha256_file(copy / WEIGHTS_FILE)}})
    with pytest.raises(ParityMismatch):
        Predictor.load(copy, CPU, defer_reference=True)  # its head is not the graph's: refused before any torch


@pytest.mark.parametrize(
    ("drops", "refused"),
    [((0.0, 0.01), False), ((0.004, 0.0101), True), ((-0.02, 0.0), False), ((0.3, -0.1), True)],
)
def test_the_refusal_rule(drops: tuple[float, float], refused: bool) -> None:
    comparison = {
        split: {"fp32_macro_f1": 0.9, "int8_macro_f1": 0.9 - drop, "macro_f1_drop": drop}
        for split, drop in zip(("test", "heldout_test"), drops, strict=True)
    }
    reason = macro_f1_refusal(comparison, 0.01)
    assert (reason is not None) == refused
    if reason is not None:
        worst = "test" if drops[0] > drops[1] else "heldout_test"
        assert reason.startswith(f"The int8 graph loses {100 * max(drops):.2f} points of macro-F1 on {worst}")


def test_a_refused_quantisation_writes_nothing(bundle_dir: Path, dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, split_csv = dataset
    calibration, evaluation = splits_from_csv(split_csv, root, CLASSES_3, 96, calibration_images=8)
    assert len(calibration) == 8 and {s: len(e.labels) for s, e in evaluation.items()} == {"test": 9, "heldout_test": 9}
    out = tmp_path / "int8"
    with pytest.raises(QuantizationRefused, match="No int8 bundle was written"):
        quantize_bundle(bundle_dir, out, calibration, evaluation, max_macro_f1_drop=-1.0)  # a bar nothing passes
    assert not out.exists()


def test_only_fp32_bundles_with_labelled_splits_are_quantised(int8_dir: Path, bundle_dir: Path, tmp_path: Path) -> None:
    some = [xray_unit(96, 96, seed=1)]
    with pytest.raises(ValueError, match="is quantised already"):
        quantize_bundle(int8_dir, tmp_path / "again", some, {"test": LabelledImages(some, np.zeros(1, int), ["s"])})
    with pytest.raises(ValueError, match="needs at least one labelled split"):
        quantize_bundle(bundle_dir, tmp_path / "none", some, {})


def test_the_cli_says_why_it_cannot_quantise(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["quantize", str(bundle_dir), "--out", str(tmp_path / "x"), "--data-root", str(tmp_path)]
    assert train_main([*args, "--split-csv", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_export_takes_the_quantize_option() -> None:
    from training.cli import build_parser

    args = build_parser().parse_args(["export", "--data", "d", "--out", "o", "--quantize", "int8"])
    assert args.quantize == "int8"
    assert build_parser().parse_args(["export", "--data", "d", "--out", "o"]).quantize is None


def _dense_layer_graph(seed: int = 0) -> Any:
    """image (N x 3 x 32 x 32) -> x0 = ReLU(Conv) -> x1 = Conv(ReLU(BatchNorm(x0))) -> Concat(x0, x1) -> Conv 1x1 ->
    mean -> logits: one DenseNet layer, its BatchNorm one that no folding removes, its running statistics far from
    the identity."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    tensors = {
        "conv0.w": rng.normal(0, 0.3, (4, 3, 3, 3)),
        "bn.gamma": rng.uniform(0.5, 2.0, 4),
        "bn.beta": rng.normal(0, 0.5, 4),
        "bn.mean": rng.normal(0, 1.0, 4),
        "bn.var": rng.uniform(0.1, 3.0, 4),
        "conv1.w": rng.normal(0, 1.5, (2, 4, 3, 3)),  # x1's range is several times x0's
        "conv2.w": rng.normal(0, 0.5, (3, 6, 1, 1)),
    }
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "conv0.w"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["x0"], name="relu0"),
        helper.make_node(
            "BatchNormalization", ["x0", "bn.gamma", "bn.beta", "bn.mean", "bn.var"], ["n1"], name="norm1"
        ),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv1.w"], ["x1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["x0", "x1"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "conv2.w"], ["c2"], name="conv2"),
        helper.make_node("ReduceMean", ["c2"], [OUTPUT_NAME], name="pool", axes=[2, 3], keepdims=0),
    ]
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()]
    graph = helper.make_graph(
        nodes,
        "dense-layer",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["n", 3])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: Any, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=CPU)
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])


def test_a_batchnorm_becomes_the_depthwise_convolution_of_the_same_map() -> None:
    model = _dense_layer_graph()
    batch = np.random.default_rng(1).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    before = _run(model, batch)
    assert batchnorm_as_depthwise(model) == 1
    graph = model.graph
    assert [n.op_type for n in graph.node] == ["Conv", "Relu", "Conv", "Relu", "Conv", "Concat", "Conv", "ReduceMean"]
    depthwise = graph.node[2]
    attributes = {a.name: a for a in depthwise.attribute}
    assert attributes["group"].i == 4 and list(attributes["kernel_shape"].ints) == [1, 1]
    assert not {t.name for t in graph.initializer} & {"bn.gamma", "bn.beta", "bn.mean", "bn.var"}
    np.testing.assert_allclose(_run(model, batch), before, rtol=1e-5, atol=1e-5)
    assert np.abs(before).max() > 0.1  # the outputs compared are not all near zero


def test_concat_groups_share_the_union_of_their_ranges() -> None:
    from onnx import helper

    graph = helper.make_graph(
        [
            helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),
            helper.make_node("Concat", ["ab", "c"], ["abc"], axis=1),
            helper.make_node("Concat", ["a", "c"], ["ac"], axis=1),
            helper.make_node("Relu", ["abc"], ["d"]),
            helper.make_node("Concat", ["d", "e"], ["de"], axis=1),
        ],
        "g",
        [],
        [],
    )
    ranges = {"a": (0.0, 1.0), "b": (-2.0, 0.5), "c": (0.0, 3.0), "ab": (-2.0, 1.0), "abc": (-2.0, 3.0)}
    ranges |= {"ac": (0.0, 3.0), "d": (0.0, 3.0), "e": (0.0, 7.0), "de": (0.0, 7.0), "x": (5.0, 6.0)}
    shared = concat_shared_ranges(graph, ranges)
    assert {n: shared[n] for n in ("a", "b", "c", "ab", "abc", "ac")} == dict.fromkeys(
        ("a", "b", "c", "ab", "abc", "ac"), (-2.0, 3.0)
    )
    assert shared["d"] == shared["e"] == shared["de"] == (0.0, 7.0)  # a Relu starts a new group
    assert "x" not in shared


def test_the_int8_graph_keeps_no_batchnorm_in_fp32_and_concatenates_without_requantising(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    source = tmp_path / "fp32.onnx"
    onnx.save(_dense_layer_graph(), str(source))
    images = [xray_unit(48, 48, seed=s) for s in range(8)]
    how = quantize_graph(source, tmp_path / "int8.onnx", images, PreprocessSpec(size=32))
    assert how["batchnorms_as_depthwise_conv"] == 1 and how["concat_shared_tensors"] == 3
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    assert "BatchNormalization" not in {n.op_type for n in graph.node}
    int8_weights = {tuple(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert (4, 1, 1, 1) in int8_weights  # the former BatchNorm, quantised as a convolution
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    quantised = {
        n.input[0]: (float(constants[n.input[1]]), int(constants[n.input[2]]))
        for n in graph.node
        if n.op_type == "QuantizeLinear"
    }
    assert quantised["x0"] == quantised["x1"] == quantised["cat"]  # one scale and zero point: Concat is a copy
    assert quantised["x0"][0] > 0


def test_unnamed_batchnorms_get_distinct_convolutions() -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    stats = {f"{k}{i}": np.full(2, v, np.float32) for i in (0, 1) for k, v in (("g", 2.0), ("b", 0.5), ("m", 0.1))}
    stats |= {f"v{i}": np.ones(2, np.float32) for i in (0, 1)}
    nodes = [
        helper.make_node("BatchNormalization", [x, f"g{i}", f"b{i}", f"m{i}", f"v{i}"], [y])
        for i, (x, y) in enumerate([(INPUT_NAME, "n0"), ("n0", OUTPUT_NAME)])
    ]
    graph = helper.make_graph(
        nodes,
        "unnamed",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, 2, 4, 4])],
        [numpy_helper.from_array(v, k) for k, v in stats.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    batch = np.random.default_rng(2).normal(0, 1, (1, 2, 4, 4)).astype(np.float32)
    before = _run(model, batch)
    assert batchnorm_as_depthwise(model) == 2
    onnx.checker.check_model(model)
    assert len({t.name for t in model.graph.initializer}) == 4  # two weights and two biases, none shared
    np.testing.assert_allclose(_run(model, batch), before, rtol=1e-5, atol=1e-5)
