"""Training job: sampler, early stopping, split, metrics, export parity, and a tiny end-to-end run."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.model.bundle import load_bundle
from tests.fixtures.synthetic import write_dataset
from training.cli import main as train_main
from training.data import discover
from training.engine import EarlyStopping
from training.evaluate import classification_metrics, fit_temperature
from training.sampler import balanced_sampler, inverse_frequency_weights
from training.split import duplicate_groups, stratified_group_split


def test_sampler_draws_classes_near_uniformly() -> None:
    labels = [0] * 100 + [1] * 400 + [2] * 50
    drawn = np.array(labels)[list(balanced_sampler(labels, seed=1, num_samples=30000))]
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.allclose(freq, 1 / 3, atol=0.02), freq
    assert inverse_frequency_weights([0, 0, 1]).tolist() == [0.5, 0.5, 1.0]


def test_early_stopping_stops_and_restores_best_epoch() -> None:
    model = nn.Linear(2, 2)
    stopper = EarlyStopping(patience=2, min_delta=0.01, mode="max")
    scores = [0.5, 0.7, 0.705, 0.6]  # epoch 3 is within min_delta of epoch 2: not an improvement
    stops = []
    for epoch, score in enumerate(scores, start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        stops.append(stopper.step(score, epoch, model))
    assert stops == [False, False, False, True]
    assert stopper.best_epoch == 2 and stopper.best == 0.7
    stopper.restore(model)
    assert torch.all(model.weight == 2)


def test_split_keeps_duplicates_together_and_stratifies() -> None:
    rng = np.random.default_rng(0)
    base = np.stack(
        [np.kron(rng.integers(0, 255, (8, 8)), np.ones((4, 4))).astype(np.uint8) for _ in range(120)]
    )
    labels = ["A"] * 60 + ["B"] * 40 + ["C"] * 20
    # Exact copies and a slightly brightened near-copy of some images.
    extra = [base[3], base[70], np.clip(base[100].astype(int) + 3, 0, 255).astype(np.uint8)]
    images = np.concatenate([base, np.stack(extra)])
    labels += ["A", "B", "C"]
    groups = duplicate_groups(images)
    assert groups[120] == groups[3] and groups[121] == groups[70] and groups[122] == groups[100]
    assert len(set(groups)) == 120
    splits = stratified_group_split(labels, groups, 0.15, 0.15, seed=0)
    for g in set(groups):
        assert len({s for s, gg in zip(splits, groups, strict=True) if gg == g}) == 1
    for split, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        counts = Counter(lab for lab, s in zip(labels, splits, strict=True) if s == split)
        for label, total in Counter(labels).items():
            assert abs(counts[label] / total - share) < 0.08, (split, label, counts)


def test_metrics_match_hand_computed_case() -> None:
    # 4 samples of class 0, 2 of class 1; one class-0 sample predicted as class 1.
    y_true = np.array([0, 0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6], [0.2, 0.8], [0.1, 0.9]])
    m = classification_metrics(y_true, probs, ["A", "B"])
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[3, 1], [0, 2]]
    assert m["per_class"]["A"]["recall"] == pytest.approx(0.75)
    assert m["per_class"]["A"]["precision"] == pytest.approx(1.0)
    assert m["per_class"]["B"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["A"]["specificity"] == pytest.approx(1.0)  # no B predicted as A
    assert m["per_class"]["B"]["specificity"] == pytest.approx(0.75)
    f1_a, f1_b = 2 * 0.75 / 1.75, 2 * (2 / 3) / (1 + 2 / 3)
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
    assert m["per_class"]["B"]["roc_auc"] == pytest.approx(1.0)


def test_temperature_fit_recovers_overconfidence() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    true_logits = rng.normal(0, 1, (2000, 3))
    true_logits[np.arange(2000), y] += 1.0
    assert fit_temperature(true_logits * 3.0, y) == pytest.approx(3.0, rel=0.15)


def test_discover_kaggle_flat_and_manifest(tmp_path: Path) -> None:
    write_dataset(tmp_path / "kaggle", {"COVID": 2, "Normal": 3}, size=40, layout="kaggle")
    (
        tmp_path / "kaggle" / "COVID" / "masks"
    ).mkdir()  # ignored: Kaggle ships segmentation masks beside images
    (tmp_path / "kaggle" / "COVID" / "masks" / "m.png").write_bytes(b"x")
    assert Counter(s.label for s in discover(tmp_path / "kaggle")) == {"COVID": 2, "Normal": 3}
    write_dataset(tmp_path / "flat", {"Viral Pneumonia": 2, "Normal": 1}, size=40)
    flat = discover(tmp_path / "flat")
    assert Counter(s.label for s in flat) == {"Viral Pneumonia": 2, "Normal": 1}
    manifest = tmp_path / "flat" / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows([[s.path, s.label.replace(" ", "_")] for s in flat])
    assert discover(manifest) == flat


@pytest.mark.slow
def test_tiny_run_all_archs_beats_chance_and_exports(tmp_path: Path) -> None:
    data = write_dataset(
        tmp_path / "data", {"COVID": 24, "Normal": 48, "Viral Pneumonia": 24}, size=72, seed=3
    )
    out = tmp_path / "run"
    argv = [
        "run",
        "--data",
        str(data),
        "--out",
        str(out),
        "--image-size",
        "64",
        "--epochs",
        "3",
        "--patience",
        "3",
        "--batch-size",
        "16",
        "--num-workers",
        "0",
        "--seed",
        "0",
        "--max-bundle-mb",
        "150",
    ]
    assert train_main(argv) == 0
    for name in (
        "config.json",
        "split.csv",
        "explore/class_counts.png",
        "explore/samples.png",
        "comparison.json",
        "comparison.md",
        "bundle/model.onnx",
        "bundle/weights.safetensors",
        "bundle/card.json",
    ):
        assert (out / name).is_file(), name
    for arch in ("vgg16", "resnet18", "densenet121"):
        for name in ("metrics.json", "confusion_matrix.png", "history.csv", "curves.png", "gradcam.png"):
            assert (out / arch / name).stat().st_size > 0, (arch, name)
        metrics = json.loads((out / arch / "metrics.json").read_text())
        assert set(metrics["per_class"]) == {"COVID", "Normal", "Viral Pneumonia"}
    comparison = json.loads((out / "comparison.json").read_text())
    winner = comparison["winner"]
    assert winner in {"resnet18", "densenet121"}  # vgg16's bundle (~1 GB at any size) exceeds 150 MB
    card = json.loads((out / "bundle" / "card.json").read_text())
    assert card["arch"] == winner and card["classes"] == ["COVID", "Normal", "Viral Pneumonia"]
    assert card["training"]["imagenet_weights"] is False
    assert card["training"]["data"]["counts"]["test"]
    assert card["metrics"]["scored_with"].startswith("onnxruntime")
    # The ORT re-score equals the torch score (same argmax on every test image).
    assert card["metrics"]["accuracy"] == pytest.approx(card["metrics"]["torch_accuracy"])
    best = max(r["test_accuracy"] for r in comparison["rows"])
    assert best > 0.5, comparison["rows"]  # chance is 1/3 (and 0.5 for always-Normal)
    load_bundle(out / "bundle")  # verifies checksums and parity
    # Re-running reuses the split file.
    before = (out / "split.csv").read_bytes()
    assert train_main(["split", "--data", str(data), "--out", str(out)]) == 0
    assert (out / "split.csv").read_bytes() == before
