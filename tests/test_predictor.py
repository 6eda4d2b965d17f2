"""The Predictor on real tiny bundles: calibrated probabilities, batching, Grad-CAM overlays, errors."""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from service.errors import UnknownTargetClass
from service.model.bundle import (
    BundleNotFound,
    ChecksumMismatch,
    InvalidCard,
    bundle_problem,
    cpu_limit,
    ort_logits,
)
from service.model.decision import Decision, DecisionOutcome
from service.model.imaging import decode_image
from service.model.preprocess import preprocess
from service.model.probabilities import softmax
from service.predictor import Predictor
from tests.fixtures.bundles import CLASSES_3, CLASSES_4, CPU
from tests.fixtures.images import png_to_array
from tests.fixtures.synthetic import xray_array, xray_png, xray_unit


def test_softmax_rows_sum_to_one_and_temperature_flattens() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [1000.0, 1000.0, 0.0]])
    probs = softmax(logits)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(probs[1], [0.5, 0.5, 0.0], atol=1e-12)  # no overflow
    hot, cool = softmax(logits[:1], 1.0)[0], softmax(logits[:1], 3.0)[0]
    assert cool.max() < hot.max() and cool.min() > hot.min()
    np.testing.assert_allclose(cool, softmax(logits[:1] / 3.0)[0])


def test_predict_is_softmax_of_the_onnx_logits(predictor: Predictor) -> None:
    image = decode_image(xray_png())
    prediction = predictor.predict(image)
    logits = ort_logits(predictor.bundle.session, preprocess(image.array, predictor.card.spec))
    expected = softmax(logits, predictor.card.temperature)[0]
    assert list(prediction.probabilities) == CLASSES_3
    np.testing.assert_allclose(list(prediction.probabilities.values()), expected, rtol=0, atol=1e-12)
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    assert prediction.label == CLASSES_3[int(np.argmax(expected))]
    assert prediction.preprocess_ms >= 0 and prediction.inference_ms > 0


def test_without_a_decision_rule_the_label_is_the_most_probable_class(predictor: Predictor) -> None:
    assert predictor.card.decision is None
    prediction = predictor.predict(xray_unit())
    assert prediction.decision is None
    most_probable = max(prediction.probabilities, key=lambda name: prediction.probabilities[name])
    assert prediction.label == prediction.argmax_label == most_probable


def test_the_cards_decision_rule_sets_the_label_and_leaves_the_probabilities(
    predictor: Predictor, decision_predictor: Predictor
) -> None:
    image = decode_image(xray_png())
    plain, decided = predictor.predict(image), decision_predictor.predict(image)
    decision = decision_predictor.card.decision
    assert decision is not None
    # The same network: the same calibrated probabilities; the rule only reads them.
    assert decided.probabilities == pytest.approx(plain.probabilities, abs=1e-9)
    assert decided.argmax_label == plain.label
    assert decided.label == decision.positive_class != decided.argmax_label
    assert decided.decision == DecisionOutcome(
        positive_class=decision.positive_class, threshold=decision.threshold, positive=True, rule=decision.rule
    )
    # Explanations default to the class the label names.
    assert decision_predictor.explanation(image).target == decided.label


def test_below_the_threshold_the_label_is_the_most_probable_other_class(predictor: Predictor) -> None:
    image = xray_unit()
    probabilities = predictor.predict(image).probabilities
    ranked = sorted(probabilities, key=lambda name: probabilities[name], reverse=True)
    # The most probable class is the positive one, but below a threshold it never reaches.
    strict = Decision(positive_class=ranked[0], threshold=0.99, rule=f"{ranked[0]} when P >= 0.99")
    card = predictor.card.model_copy(update={"decision": strict})
    prediction = Predictor(dataclasses.replace(predictor.bundle, card=card)).predict(image)
    assert (prediction.label, prediction.argmax_label) == (ranked[1], ranked[0])
    assert prediction.decision is not None and prediction.decision.positive is False
    assert prediction.probabilities == probabilities


def test_the_cards_temperature_is_applied(predictor: Predictor) -> None:
    # The same loaded network; only the calibration temperature in the card differs.
    card = predictor.card.model_copy(update={"temperature": 3.0})
    hot = Predictor(dataclasses.replace(predictor.bundle, card=card))
    image = xray_unit()
    plain = np.array(list(predictor.predict(image).probabilities.values()))
    calibrated = np.array(list(hot.predict(image).probabilities.values()))
    logits = ort_logits(predictor.bundle.session, preprocess(image, predictor.card.spec))
    np.testing.assert_allclose(calibrated, softmax(logits, 3.0)[0], atol=1e-6)
    assert not np.allclose(plain, calibrated)


def test_predict_arrays_matches_predict_one_by_one(predictor: Predictor) -> None:
    images = [xray_unit(96 + 8 * i, 96, label, seed=i) for i, label in enumerate(CLASSES_3 * 2)]
    batched = predictor.predict_arrays(images, batch_size=4)  # 6 images: a full and a partial batch
    assert batched.shape == (6, 3)
    single = np.array([list(predictor.predict(a).probabilities.values()) for a in images])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert predictor.predict_arrays([]).shape == (0, 3)


def test_a_four_class_bundle_needs_no_code_change(predictor4: Predictor) -> None:
    prediction = predictor4.predict(xray_unit(label="Normal"))
    assert list(prediction.probabilities) == CLASSES_4
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0)
    png = predictor4.explanation(xray_unit(), "Lung Opacity").png
    assert png_to_array(png).shape == (96, 160, 3)


def test_overlay_keeps_the_aspect_ratio_and_caps_the_long_side(predictor: Predictor) -> None:
    image = decode_image(xray_png(160, 96))
    assert png_to_array(predictor.explanation(image).png).shape == (96, 160, 3)
    assert png_to_array(predictor.explanation(image, max_side=80).png).shape == (48, 80, 3)


def test_alpha_zero_is_the_plain_image_and_alpha_blends_a_heatmap(predictor: Predictor) -> None:
    gray = xray_unit(160, 96)
    plain = np.repeat(xray_array(160, 96)[..., None], 3, axis=2).astype(int)
    untouched = png_to_array(predictor.explanation(gray, "COVID", alpha=0.0).png).astype(int)
    assert np.abs(untouched - plain).max() <= 1
    blended = png_to_array(predictor.explanation(gray, "COVID", alpha=0.5).png).astype(int)
    assert np.abs(blended - plain).mean() > 10
    assert np.abs(blended[..., 0] - blended[..., 2]).max() > 50  # coloured, not gray


def test_each_target_class_has_its_own_heatmap(predictor: Predictor) -> None:
    image = xray_unit()
    maps = {name: predictor.heatmap(image, name) for name in CLASSES_3}
    for cam in maps.values():
        assert cam.shape == (96, 96) and cam.min() >= 0.0 and cam.max() <= 1.0
    names = list(maps)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not np.allclose(maps[first], maps[second]), (first, second)


def test_default_target_is_the_predicted_class(predictor: Predictor) -> None:
    image = xray_unit()
    label = predictor.predict(image).label
    explanation = predictor.explanation(image)
    assert explanation.target == label
    assert explanation.png == predictor.explanation(image, label).png


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.full((8, 8), 2.0), np.zeros((8, 8, 3))])
def test_arrays_outside_the_pixel_contract_are_refused(predictor: Predictor, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="Expected a 2-D float image"):
        predictor.predict(bad)


def test_unknown_target_class_is_a_typed_error(predictor: Predictor) -> None:
    with pytest.raises(UnknownTargetClass) as raised:
        predictor.explanation(xray_unit(), "Lung Opacity")
    assert raised.value.detail == (
        "Unknown target class 'Lung Opacity'; this model's classes are: COVID, Normal, Viral Pneumonia."
    )
    assert raised.value.status_code == 422


def test_concurrent_explanations_equal_sequential_ones_and_leave_no_hooks(predictor: Predictor) -> None:
    images = [xray_unit(label=label, seed=i) for i, label in enumerate(CLASSES_3)]
    expected = [predictor.explanation(image, "COVID").png for image in images]
    results: dict[int, bytes] = {}

    def run(i: int) -> None:
        results[i] = predictor.explanation(images[i % 3], "COVID").png

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(6)] == expected * 2
    model = predictor.bundle.torch_model
    assert model is not None
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_load_reports_providers_and_warns_when_cuda_is_not_used(
    bundle_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="service.predictor")
    loaded = Predictor.load(bundle_dir, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert loaded.providers == list(loaded.bundle.session.get_providers())
    warned = [r for r in caplog.records if "CUDAExecutionProvider was requested" in r.getMessage()]
    assert bool(warned) == ("CUDAExecutionProvider" not in loaded.providers)
    assert loaded.requested_providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_the_session_uses_the_cpu_limit_and_idle_threads_do_not_spin(predictor: Predictor) -> None:
    options = predictor.bundle.session.get_session_options()
    assert options.intra_op_num_threads == cpu_limit() and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_bundle_problem_says_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    with pytest.raises(BundleNotFound) as raised:
        Predictor.load(missing, CPU)
    assert bundle_problem(raised.value, missing) == (
        "No model bundle at 'nothing': the folder does not exist. Train a bundle with cxr-train, or point "
        "CXR_MODEL_DIR (or --model-dir) at a bundle folder."
    )
    tampered = ChecksumMismatch(f"model.onnx in {tmp_path / 'x'} does not match its card")
    assert bundle_problem(tampered, tmp_path / "x") == (
        "The model bundle 'x' cannot be served: model.onnx in 'x' does not match its card"
    )


def test_a_card_whose_cam_layer_is_not_in_the_network_is_refused(predictor: Predictor) -> None:
    card = predictor.card.model_copy(update={"cam_layer": "layer9"})
    with pytest.raises(InvalidCard) as raised:
        Predictor(dataclasses.replace(predictor.bundle, card=card))
    assert str(raised.value) == "The card's cam_layer 'layer9' is not a module of the resnet18 network."
