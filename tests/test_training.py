"""Training job: sampler, early stopping, split, metrics, export parity, and a tiny end-to-end run."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from service.model.bundle import load_bundle
from service.model.preprocess import PreprocessSpec
from tests.fixtures.synthetic import write_dataset
from training.augment import RECIPES, BlankLungs, Degrade, SwapBorders, augment
from training.cli import build_parser, config_from_args
from training.cli import main as train_main
from training.config import FitConfig, RunConfig
from training.data import Sample, discover, discover_all
from training.engine import (
    NO_EVIDENCE,
    CachedImages,
    EarlyStopping,
    EpochSampler,
    EvidenceLoss,
    fit,
    resolve_precision,
)
from training.head import HeadData, fit_head
from training.metrics import (
    calibration_metrics,
    classification_metrics,
    decided_labels,
    fit_temperature,
    operating_point,
    per_source_metrics,
    threshold_metrics,
)
from training.pipeline import Run, comparison_markdown
from training.probes import shortcut_probes
from training.sampler import inverse_frequency_weights, sampling_weights
from training.selection import pick_winner
from training.split import assign_splits, duplicate_groups, stratified_group_split


def test_sampler_draws_classes_near_uniformly() -> None:
    labels = [0] * 100 + [1] * 400 + [2] * 50
    sampler = EpochSampler(sampling_weights(labels), seed=1, num_samples=30000)
    drawn = np.array(labels)[[index for _, index in sampler]]
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.allclose(freq, 1 / 3, atol=0.02), freq
    assert inverse_frequency_weights([0, 0, 1]).tolist() == [0.5, 0.5, 1.0]


def test_source_balance_shares_a_class_between_its_sources() -> None:
    labels = [0] * 900 + [0] * 100 + [1] * 50
    sources = ["big"] * 900 + ["small"] * 100 + ["other"] * 50
    for balance, small_share in ((0.0, 0.1), (0.5, 0.25), (1.0, 0.5)):  # sqrt: 10 / (30 + 10)
        w = sampling_weights(labels, sources, balance)
        assert w.sum() == pytest.approx(1.0)
        assert w[:1000].sum() == pytest.approx(0.5)  # classes stay equally likely
        assert w[900:1000].sum() / w[:1000].sum() == pytest.approx(small_share), balance


def _epoch_batches(dataset: CachedImages, sampler: EpochSampler, workers: int, epochs: list[int]) -> list[torch.Tensor]:
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=4, num_workers=workers, persistent_workers=workers > 0
    )
    batches = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        batches.append(next(iter(loader))[0])
    return batches


def test_augmentation_changes_every_epoch_with_worker_processes_and_resumes_identically() -> None:
    # Defect: with persistent workers the dataset copy in each worker never saw the epoch, so every epoch had the
    # same distortions. The epoch now travels with the sampled index.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 40, 40), dtype=np.uint8)
    dataset = CachedImages(images, np.zeros(8, np.int64), PreprocessSpec(32), augmentation="shortcut-v2", seed=3)
    uniform = np.full(8, 1 / 8)
    first, second, third = _epoch_batches(dataset, EpochSampler(uniform, seed=5), 2, [0, 1, 2])
    assert not torch.equal(first, second) and not torch.equal(second, third)
    # A run resumed at epoch 2 (fresh sampler and workers) sees exactly the batches of the uninterrupted run.
    (resumed,) = _epoch_batches(dataset, EpochSampler(uniform, seed=5), 2, [2])
    (in_process,) = _epoch_batches(dataset, EpochSampler(uniform, seed=5), 0, [2])
    assert torch.equal(resumed, third) and torch.equal(in_process, third)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_augmentation_recipes_are_seeded_and_keep_the_pixel_contract(name: str) -> None:
    image = np.random.default_rng(1).integers(0, 255, (48, 48), dtype=np.uint8)
    a = augment(image, np.random.default_rng((0, 1, 2)), name)
    b = augment(image, np.random.default_rng((0, 1, 2)), name)
    c = augment(image, np.random.default_rng((0, 2, 2)), name)
    assert a.dtype == np.float32 and a.shape == (48, 48) and a.min() >= 0.0 and a.max() <= 1.0
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert RECIPES[name].describe()[0]["op"]


def test_sharpening_overshoots_at_edges_and_leaves_flat_areas_alone() -> None:
    step = np.full((64, 64), 0.3, np.float32)
    step[:, 32:] = 0.6
    sharpen = Degrade(blur_p=0.0, resample_p=0.0, sharpen_p=1.0)
    for seed in range(5):
        out = sharpen(step, np.random.default_rng(seed))
        # Unsharp masking: darker just left of the edge, brighter just right of it, the flat parts as they were.
        assert out[:, 30].mean() < 0.29 and out[:, 33].mean() > 0.61
        assert np.allclose(out[:, :20], 0.3, atol=1 / 255) and np.allclose(out[:, 44:], 0.6, atol=1 / 255)
    # Off unless asked for: the recipes made before it draw exactly as they did.
    assert np.array_equal(Degrade(blur_p=0.0, resample_p=0.0)(step, np.random.default_rng(0)), step)


def test_swap_borders_keeps_the_centre_takes_the_borders_from_the_donor_and_keeps_the_label() -> None:
    image, donor = np.full((100, 100), 0.8, np.float32), np.full((100, 100), 0.1, np.float32)
    for seed in range(20):
        out = SwapBorders()(image, donor, np.random.default_rng(seed))
        # The central 40 % is always the image's own, the outer 5 % band always the donor's.
        assert np.all(out[30:70, 30:70] == 0.8)
        band = np.ones((100, 100), bool)
        band[5:95, 5:95] = False
        assert np.all(out[band] == 0.1)

    # In the data set: a bright class-0 image and dark class-1 images; swapped images keep their own label and centre.
    images = np.concatenate([np.full((1, 48, 48), 250, np.uint8), np.full((63, 48, 48), 10, np.uint8)])
    labels = np.array([0] + [1] * 63, dtype=np.int64)
    dataset = CachedImages(images, labels, PreprocessSpec(48), "basic-v1", seed=0, swap_borders=1.0)
    bright = [dataset[(epoch, 0)] for epoch in range(12)]
    assert all(label == 0 for _, label in bright)
    assert all(float(x[0, 20:28, 20:28].mean()) > float(x[0, :3].mean()) + 1.0 for x, _ in bright)  # dark borders
    # Off by default: the same draws keep the bright image's own borders. Never applied without augmentation.
    plain = CachedImages(images, labels, PreprocessSpec(48), "basic-v1", seed=0)
    ring = np.ones((48, 48), bool)
    ring[6:42, 6:42] = False
    own = np.mean([float(plain[(epoch, 0)][0][0][ring].mean()) for epoch in range(12)])
    assert own > np.mean([float(x[0][ring].mean()) for x, _ in bright]) + 1.0
    unaugmented = CachedImages(images, labels, PreprocessSpec(48), None, swap_borders=1.0)
    assert torch.equal(unaugmented[0][0], CachedImages(images, labels, PreprocessSpec(48), None)[0][0])


def test_blank_lungs_hides_the_centre_keeps_the_border_and_targets_uniform() -> None:
    gradient = np.tile(np.linspace(0.0, 1.0, 100, dtype=np.float32), (100, 1))
    for seed in range(20):
        out = BlankLungs()(gradient, np.random.default_rng(seed))
        # The central 30 % is always hidden (black, the image's mean or noise), the outer 5 % band always kept.
        assert not np.allclose(out[35:65, 35:65], gradient[35:65, 35:65])
        band = np.ones((100, 100), bool)
        band[5:95, 5:95] = False
        assert np.array_equal(out[band], gradient[band])

    images = np.full((64, 48, 48), 200, dtype=np.uint8)
    dataset = CachedImages(images, np.ones(64, np.int64), PreprocessSpec(48), "basic-v1", seed=0, blank_lungs=0.5)
    labels = [dataset[(0, i)][1] for i in range(64)]
    assert set(labels) == {1, NO_EVIDENCE} and 16 <= labels.count(NO_EVIDENCE) <= 48
    # Without augmentation (validation, test) nothing is blanked.
    plain = CachedImages(images, np.ones(64, np.int64), PreprocessSpec(48), None, blank_lungs=1.0)
    assert [plain[i][1] for i in range(8)] == [1] * 8

    loss = EvidenceLoss(label_smoothing=0.0)
    target = torch.tensor([NO_EVIDENCE, NO_EVIDENCE])
    assert float(loss(torch.zeros(2, 3), target)) == pytest.approx(np.log(3), abs=1e-6)  # its minimum
    assert float(loss(torch.tensor([[9.0, 0.0, 0.0]] * 2), target)) > 2.5
    # Labelled rows are plain cross-entropy, and the mean runs over the whole batch.
    mixed = loss(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([0, NO_EVIDENCE]))
    labelled = torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]))
    assert float(mixed) == pytest.approx((float(labelled) + np.log(3)) / 2, abs=1e-6)


def test_pick_winner_uses_a_real_tolerance_and_the_bundle_limit() -> None:
    def row(arch: str, f1: float, params: int, mb: float) -> dict[str, object]:
        return {"arch": arch, "selection_macro_f1": f1, "parameters": params, "bundle_mb": mb}

    # Defect: F1 was cut into fixed 0.005 bands, so 0.9024 and 0.9026 could land in different bands.
    rows = [row("big", 0.9026, 11_000_000, 90), row("small", 0.9024, 7_000_000, 56)]
    assert pick_winner(rows, tolerance=0.005) == "small"
    assert pick_winner([row("big", 0.9080, 11, 90), row("small", 0.9024, 7, 56)], tolerance=0.005) == "big"
    assert pick_winner([row("big", 0.9074, 11, 90), row("small", 0.9024, 7, 56)], tolerance=0.005) == "small"  # edge
    # A network over the size limit neither wins nor sets the bar.
    rows = [row("vgg", 0.99, 134, 1074), row("resnet", 0.90, 11, 89), row("densenet", 0.93, 7, 56)]
    assert pick_winner(rows, max_bundle_mb=100) == "densenet"
    assert pick_winner(rows, max_bundle_mb=10) is None


def test_comparison_table_takes_the_positive_class_from_the_run() -> None:
    # Defect: "COVID" was hard-coded, and a dataset without it crashed the table.
    row = {
        "arch": "resnet18",
        "selection_macro_f1": 0.8,
        "heldout_test_macro_f1": None,
        "test_accuracy": 0.9,
        "test_macro_f1": 0.85,
        "positive_class": "Pneumonia",
        "positive_recall": None,
        "positive_specificity": 0.7,
        "borders_only_auc": None,
        "epochs_run": 3,
        "best_epoch": 2,
        "seconds_per_epoch": 1.0,
        "image_size": 64,
        "weights": "none",
        "device": "cpu",
        "bundle_mb": 89.0,
    }
    text = comparison_markdown({"rows": [row], "winner": "resnet18", "best_on_selection": "resnet18", "rule": "r"})
    assert "Pneumonia recall" in text and "| resnet18 | 0.8000 |" in text


def _tiny_fit(tmp_path: Path, monitor: str) -> dict[str, Any]:
    from service.model import backbones

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 36, 36), dtype=np.uint8)
    labels = np.array([0, 1, 2] * 4)
    spec = PreprocessSpec(32)
    model = backbones.build("resnet18", 3)
    config = FitConfig(epochs=3, patience=3, batch_size=4, lr=1e-3, monitor=monitor, num_workers=0)
    return fit(
        model,
        CachedImages(images, labels, spec, "basic-v1"),
        CachedImages(images, labels, spec),
        config,
        torch.device("cpu"),
        tmp_path / monitor,
    )


def test_early_stopping_follows_the_configured_monitor(tmp_path: Path) -> None:
    # Defect: FitConfig.monitor was recorded but early stopping always used macro-F1.
    summary = _tiny_fit(tmp_path, "loss")
    history = summary["history"]
    assert summary["monitor"] == "loss"
    losses = [h["val_loss"] for h in history]
    assert summary["best_epoch"] == 1 + int(np.argmin(losses))
    assert summary["best_monitored"] == pytest.approx(min(losses))
    assert (tmp_path / "loss" / "best.safetensors").is_file() and (tmp_path / "loss" / "checkpoint.pt").is_file()
    # The checkpoint loads without unpickling arbitrary objects.
    state = torch.load(tmp_path / "loss" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["early_stopping"]["mode"] == "min"


def test_precision_auto_is_bf16_on_cuda_and_explicit_choices_hold() -> None:
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")


def test_fine_tuning_a_bundle_records_its_lineage(bundle_dir: Path, tmp_path: Path) -> None:
    card = json.loads((bundle_dir / "card.json").read_text())
    run = Run(
        RunConfig(data=[str(tmp_path)], out=str(tmp_path / "run"), weights=str(bundle_dir / "weights.safetensors"))
    )
    lineage = run.initial_bundle()
    assert lineage is not None
    assert lineage["bundle_sha256"] == hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()
    assert (lineage["name"], lineage["version"]) == (card["name"], card["version"])
    assert len(lineage["stages"]) == 1
    assert run.model_version() == str(int(card["version"]) + 1)  # a fine-tune is the next version
    scratch = Run(RunConfig(data=[str(tmp_path)], out=str(tmp_path / "scratch")))
    assert scratch.initial_bundle() is None and scratch.model_version() == "1"
    named = RunConfig(data=[str(tmp_path)], out=str(tmp_path / "named"), model_version="2027-01")
    assert Run(named).model_version() == "2027-01"


def test_interpolate_mixes_the_fit_with_its_start_and_can_be_rerun(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from service.model import backbones

    folder = tmp_path / "run" / "resnet18"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    start = backbones.build("resnet18", 3).state_dict()
    torch.manual_seed(1)
    fitted = {
        k: v + 1 if k.endswith("num_batches_tracked") else v
        for k, v in backbones.build("resnet18", 3).state_dict().items()
    }
    save_file(start, str(tmp_path / "start.safetensors"))
    save_file(fitted, str(folder / "best.safetensors"))
    (folder / "fit.json").write_text(json.dumps({"weights": str(tmp_path / "start.safetensors")}))
    argv = ["interpolate", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--archs", "resnet18"]

    def mixed(alpha: str) -> dict[str, torch.Tensor]:
        assert train_main([*argv, "--interpolate-alpha", alpha]) == 0  # the start comes from fit.json
        return load_file(str(folder / "best.safetensors"))

    quarter = mixed("0.25")
    weight = "layer1.0.conv1.weight"
    assert torch.allclose(quarter[weight], 0.75 * start[weight] + 0.25 * fitted[weight], atol=1e-6)
    assert torch.allclose(
        quarter["bn1.running_var"], 0.75 * start["bn1.running_var"] + 0.25 * fitted["bn1.running_var"]
    )
    assert torch.equal(quarter["bn1.num_batches_tracked"], fitted["bn1.num_batches_tracked"])  # counts are the fit's
    assert torch.equal(load_file(str(folder / "fit_best.safetensors"))[weight], fitted[weight])
    # A second call mixes from the kept fit, not from the first mix; the ends give back the two networks.
    assert all(torch.equal(mixed("1")[k], fitted[k]) for k in fitted)
    assert all(torch.allclose(mixed("0")[k].float(), start[k].float()) for k in start if start[k].is_floating_point())
    recorded = json.loads((folder / "interpolate.json").read_text())
    assert (recorded["method"], recorded["alpha"]) == ("wise-ft-v1", 0.0)
    assert recorded["start_sha256"] == hashlib.sha256((tmp_path / "start.safetensors").read_bytes()).hexdigest()
    # Another network as the start, or no start at all, is refused with a message (exit 2), the weights kept.
    save_file(backbones.build("resnet18", 2).state_dict(), str(tmp_path / "other.safetensors"))
    before = (folder / "best.safetensors").read_bytes()
    assert train_main([*argv, "--weights", str(tmp_path / "other.safetensors")]) == 2
    (folder / "fit.json").write_text(json.dumps({"weights": "none"}))
    assert train_main(argv) == 2
    assert (folder / "best.safetensors").read_bytes() == before


def test_early_stopping_stops_and_records_best_epoch() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.01, mode="max")
    scores = [0.5, 0.7, 0.705, 0.6]  # epoch 3 is within min_delta of epoch 2: not an improvement
    improved, stops = [], []
    for epoch, score in enumerate(scores, start=1):
        improved.append(stopper.step(score, epoch))
        stops.append(stopper.should_stop)
    assert improved == [True, True, False, False]
    assert stops == [False, False, False, True]
    assert stopper.best_epoch == 2 and stopper.best == 0.7
    assert EarlyStopping(mode="min").improved(1.0) and not EarlyStopping(mode="min", best=0.5).improved(0.6)


def test_split_keeps_duplicates_together_and_stratifies() -> None:
    rng = np.random.default_rng(0)
    base = np.stack([np.kron(rng.integers(0, 255, (8, 8)), np.ones((4, 4))).astype(np.uint8) for _ in range(120)])
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


def test_heldout_sources_and_kept_assignments_decide_first() -> None:
    samples = [
        Sample(f"{src}__{i}.png", lab, src)
        for i, (src, lab) in enumerate(
            [("a", "X")] * 30 + [("a", "Y")] * 30 + [("h", "X")] * 5 + [("t", "Y")] * 4 + [("k", "Y")] * 2
        )
    ]
    groups = np.arange(len(samples))
    groups[2] = 60  # a training-source image that duplicates a held-out one goes with it
    kept = {65 + 4: "test", 65 + 5: "val"}
    splits = assign_splits(
        samples,
        groups,
        val_fraction=0.2,
        test_fraction=0.2,
        seed=0,
        heldout_val_sources=["h"],
        heldout_test_sources=["t"],
        kept=kept,
    )
    assert [splits[i] for i in range(60, 65)] == ["heldout_val"] * 5 and splits[2] == "heldout_val"
    assert [splits[i] for i in range(65, 69)] == ["heldout_test"] * 4
    assert splits[69] == "test" and splits[70] == "val"
    rest = Counter(splits[i] for i in range(60) if i != 2)
    assert set(rest) == {"train", "val", "test"} and rest["train"] > rest["val"]


def test_sources_from_provenance_prefix_and_several_folders(tmp_path: Path) -> None:
    write_dataset(tmp_path / "one", {"COVID": 2}, size=40)
    write_dataset(tmp_path / "two", {"Normal": 2}, size=40)
    for path in (tmp_path / "two" / "Normal").iterdir():
        path.rename(path.with_name("siteb__" + path.name))
    samples = discover_all([tmp_path / "one", tmp_path / "two"])
    assert {s.path.split("/")[0] for s in samples} == {"one", "two"}
    assert Counter(s.source for s in samples) == {"one": 2, "siteb": 2}
    (tmp_path / "one" / "provenance.csv").write_text(
        "file,source\n" + "".join(f"{s.path.split('/', 1)[1]},hospitalA\n" for s in samples if s.label == "COVID")
    )
    assert Counter(s.source for s in discover_all([tmp_path / "one"])) == {"hospitalA": 2}


def test_operating_point_reaches_the_target_sensitivity() -> None:
    positive = np.array([1] * 100 + [0] * 100)
    scores = np.concatenate([np.linspace(0.05, 1.0, 100), np.linspace(0.0, 0.5, 100)])
    threshold = operating_point(positive, scores, 0.97)
    figures = threshold_metrics(positive, scores, threshold)
    assert figures["sensitivity"] == pytest.approx(0.97)
    assert threshold == pytest.approx(np.sort(scores[:100])[3])  # the most specific threshold that keeps 97 of 100
    probs = np.array([[0.3, 0.6, 0.1], [0.1, 0.2, 0.7], [0.25, 0.35, 0.4]])
    assert decided_labels(probs, 0, 0.28).tolist() == [0, 2, 2]


def test_calibration_and_per_source_figures() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.95, 0.05], [0.05, 0.95]])
    cal = calibration_metrics(y, probs, bins=10)
    # Bin 0.9-1.0 holds all four at confidence 0.95 with accuracy 3/4.
    assert cal["ece"] == pytest.approx(0.2) and cal["errors_over_0_9"] == 1
    assert cal["brier"] == pytest.approx((3 * 2 * 0.05**2 + 2 * 0.95**2) / 4)
    per_source = per_source_metrics(y, probs, ["a", "a", "b", "b"], ["P", "Q"])
    assert per_source["a"] == {"n": 2, "accuracy": 1.0, "recall": {"P": 1.0}, "confusion_matrix": [[2, 0], [0, 0]]}
    assert per_source["b"]["recall"] == {"Q": 0.5}


def test_shortcut_probes_catch_a_border_reader() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    images = [np.full((50, 50), 0.5, np.float32) for _ in y]
    for image, label in zip(images, y, strict=True):
        image[0, :] = 1.0 if label == 0 else 0.0  # the class is written in the top border only
        image[20:30, 20:30] = rng.random((10, 10))

    def border_reader(batch: Sequence[np.ndarray]) -> np.ndarray:
        top = np.array([b[0].mean() for b in batch])
        return np.stack([top, 1 - top], axis=1)

    probes = shortcut_probes(border_reader, images, y, positive=0, n_classes=2)
    assert probes["borders_only"]["positive_vs_rest_auc"] == pytest.approx(1.0)
    assert probes["centre_only"]["balanced_accuracy"] == pytest.approx(0.5)
    assert probes["flip"]["changed_share"] == 0.0
    # The other class's centre pasted in: the border reader keeps answering from the borders.
    swap = probes["centre_swap"]
    assert swap["pairs"] > 5 and swap["follows_borders"] == 1.0 and swap["follows_centre"] == 0.0


def test_head_refit_against_blanked_copies_stops_reading_the_borders() -> None:
    # Feature 0 tells the class from the borders (it survives blanking); feature 1 from the lungs (it does not).
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 200)
    signal = np.eye(3)[y] * 2.0 - 1.0  # +1 for the true class, -1 otherwise
    border, lungs = signal + rng.normal(0, 0.5, signal.shape), signal + rng.normal(0, 0.8, signal.shape)
    features = np.concatenate([border, lungs], axis=1).astype(np.float32)
    blanked = np.concatenate([border, rng.normal(0, 1.0, lungs.shape)], axis=1).astype(np.float32)
    data = HeadData(features, y, np.ones(len(y)), blanked)

    def border_share(weight: np.ndarray) -> float:
        return float(np.abs(weight[:, :3]).sum() / np.abs(weight).sum())

    plain, _ = fit_head(data, 3, c=1.0, blank_weight=0.0)
    weight, bias = fit_head(data, 3, c=1.0, blank_weight=1.0)
    assert border_share(plain) > 0.6 and border_share(weight) < 0.45  # the plain fit leans on the sharper cue
    blanked_probabilities = torch.softmax(torch.from_numpy(blanked @ weight.T + bias), 1).numpy()
    assert blanked_probabilities.max(1).mean() < 0.6  # near uniform (1/3) with the lungs hidden
    assert (np.argmax(features @ weight.T + bias, 1) == y).mean() > 0.9  # and still right with them


def test_cli_options_come_from_the_config_dataclasses() -> None:
    args = build_parser().parse_args(["fit", "--data", "a", "b", "--out", "o", "--archs", "resnet18", "--lr", "1e-4"])
    config = config_from_args(args)
    assert config.data == ["a", "b"] and config.archs == ["resnet18"] and config.fit.lr == 1e-4
    defaults = config_from_args(build_parser().parse_args(["fit", "--data", "a", "--out", "o"]))
    assert defaults.fit == FitConfig() and defaults.heldout_val_sources == RunConfig().heldout_val_sources
    assert defaults.lr_for("vgg16") == 1e-4 and defaults.lr_for("resnet18") == 1e-3


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


def test_worst_source_temperature_is_fitted_for_the_source_read_worst() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 1000)
    logits = rng.normal(0, 1, (1000, 3))
    logits[np.arange(1000), y] += np.where(np.arange(1000) < 500, 3.0, 1.0)  # "a" easy, "b" hard
    logits[500:] *= 4.0  # and "b" four times overconfident, "a" calibrated as it is
    sources = np.array(["a"] * 500 + ["b"] * 500)
    pooled, worst = fit_temperature(logits, y), fit_temperature(logits, y, sources)
    assert 1.0 < pooled < worst <= 4.4  # the pooled fit splits the difference; the worst-source one serves "b"

    def nll(t: float, rows: slice) -> float:
        z = logits[rows] / t
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), y[rows]]))

    def worst_nll(t: float) -> float:
        return max(nll(t, slice(0, 500)), nll(t, slice(500, None)))

    assert worst_nll(worst) < worst_nll(pooled)
    few = sources.copy()
    few[:10] = "c"  # fewer than 20 images: not a source of its own for the rule
    assert fit_temperature(logits, y, few) == pytest.approx(worst, rel=0.05)


def test_discover_kaggle_flat_and_manifest(tmp_path: Path) -> None:
    write_dataset(tmp_path / "kaggle", {"COVID": 2, "Normal": 3}, size=40, layout="kaggle")
    (tmp_path / "kaggle" / "COVID" / "masks").mkdir()  # ignored: Kaggle ships segmentation masks beside images
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
def test_a_run_too_small_for_the_gate_stops_after_its_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_dataset(tmp_path / "data", {"COVID": 12, "Normal": 12, "Viral Pneumonia": 12}, size=48, seed=1)
    out = tmp_path / "run"
    argv = ["run", "--data", str(data), "--out", str(out), "--image-size", "32", "--epochs", "1", "--num-workers", "0"]
    assert train_main(argv) == 2
    assert "gate needs at least 20" in capsys.readouterr().err
    assert (out / "split.csv").is_file()
    assert not any(out.glob("*/history.csv")), "no network may be trained when export could not fit the gate"


def test_tiny_run_all_archs_beats_chance_and_exports(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", {"COVID": 40, "Normal": 80, "Viral Pneumonia": 40}, size=72, seed=3)
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
        for name in (
            "metrics.json",
            "confusion_matrix.png",
            "history.csv",
            "curves.png",
            "gradcam.png",
            "reliability.png",
            "calibration.json",
            "logits.npz",
        ):
            assert (out / arch / name).stat().st_size > 0, (arch, name)
        metrics = json.loads((out / arch / "metrics.json").read_text())
        assert set(metrics["splits"]["test"]["per_class"]) == {"COVID", "Normal", "Viral Pneumonia"}
        assert metrics["probes"]["borders_only"]["balanced_accuracy"] is not None
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
    assert card["decision"]["positive_class"] == "COVID" and 0 < card["decision"]["threshold"] < 1
    assert card["decision"]["chosen_on"] == ["val"]  # no held-out sources here: the in-distribution validation
    assert card["mean"] == list(PreprocessSpec(64).mean) and card["input_size"] == 64
    assert card["probes"]["centre_share"] == 0.6 and card["sources"]["train"]
    assert card["gate"]["file"] in card["sha256"] and card["gate"]["calibration_pass_rate"] >= 0.9
    best = max(r["test_accuracy"] for r in comparison["rows"])
    assert best > 0.5, comparison["rows"]  # chance is 1/3 (and 0.5 for always-Normal)
    fitted = json.loads((out / "resnet18" / "fit.json").read_text())
    assert fitted["precision"] == resolve_precision("auto", torch.device("cpu"))
    load_bundle(out / "bundle")  # verifies checksums and parity
    assert card["gate"]["threshold_rule"] == "every source"
    gate_argv = ["gate", "--data", str(data), "--out", str(out), "--seed", "0"]
    assert train_main(gate_argv) == 2  # the bundle takes 64 px, the default is 224
    assert train_main([*gate_argv, "--image-size", "64"]) == 0  # seeded: the refit is the same gate
    assert json.loads((out / "bundle" / "card.json").read_text())["gate"]["threshold"] == card["gate"]["threshold"]
    load_bundle(out / "bundle")  # the refit rewrote card and manifest
    # The head stage re-fits only the final layer (the fit's own is kept), the same layer on a second run.
    before_head = load_file(str(out / "resnet18" / "best.safetensors"))
    head_argv = ["head", "--data", str(data), "--out", str(out), "--archs", "resnet18", "--image-size", "64"]
    assert train_main([*head_argv, "--head-passes", "1", "--augmentation", "basic-v1"]) == 0
    after_head = load_file(str(out / "resnet18" / "best.safetensors"))
    changed = {k for k in before_head if not torch.equal(before_head[k], after_head[k])}
    assert changed == {"fc.weight", "fc.bias"}
    assert torch.equal(load_file(str(out / "resnet18" / "fit_head.safetensors"))["weight"], before_head["fc.weight"])
    n_train = sum(r["split"] == "train" for r in csv.DictReader((out / "split.csv").open()))
    recorded = json.loads((out / "resnet18" / "head.json").read_text())
    assert (recorded["n_blanked"], recorded["n_images"]) == (n_train, 2 * n_train)  # one pass: clean + augmented
    assert train_main([*head_argv, "--head-passes", "1", "--augmentation", "basic-v1"]) == 0
    assert torch.equal(load_file(str(out / "resnet18" / "best.safetensors"))["fc.weight"], after_head["fc.weight"])
    assert train_main(["evaluate", *head_argv[1:]]) == 0
    # Re-running reuses the split file.
    before = (out / "split.csv").read_bytes()
    assert train_main(["split", "--data", str(data), "--out", str(out)]) == 0
    assert (out / "split.csv").read_bytes() == before
