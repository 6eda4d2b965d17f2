"""The operating point: chosen on the positives of several held-out sources, estimated by leaving one source out,
and re-chosen for an existing bundle by `cxr-train operating-point` (same network, a new threshold, verified)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from service.model.bundle import CARD_FILE, load_bundle
from service.model.decision import Decision
from service.model.imaging import decode_image
from service.model.probabilities import softmax
from service.predictor import Predictor
from tests.fixtures.bundles import CPU
from tests.fixtures.synthetic import write_dataset, write_split_csv
from training.cli import main as train_main
from training.config import RunConfig
from training.metrics import leave_one_source_out, operating_point, operating_point_decision
from training.operating_point import next_version
from training.pipeline import Run

SPLIT_OF = {0: "train", 1: "test", 2: "heldout_val", 3: "heldout_test"}  # image index mod 4 -> split


def test_leave_one_source_out_scores_each_source_at_the_others_threshold() -> None:
    # Hospital "a"'s COVID images score high, hospital "b"'s lower: a threshold chosen on "a" misses most of "b".
    scores = np.array([0.9, 0.85, 0.8, 0.95, 0.3, 0.35, 0.9, 0.2, 0.1, 0.5])
    positive = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    sources = ["a", "a", "a", "a", "b", "b", "a", "c", "c", "c"]
    estimate = leave_one_source_out(positive, scores, sources, 1.0)
    assert estimate is not None
    per = estimate["per_source"]
    assert per["b"]["threshold"] == pytest.approx(0.8)  # every positive of "a" kept
    assert per["b"]["sensitivity"] == 0.0 and "specificity" not in per["b"]
    assert per["a"]["threshold"] == pytest.approx(0.3) and per["a"]["sensitivity"] == 1.0
    assert per["a"]["specificity"] == 0.0  # its one negative (0.9) is over the threshold "b" needs
    assert per["c"]["threshold"] == pytest.approx(0.3) and per["c"]["specificity"] == pytest.approx(2 / 3)
    assert estimate["sensitivity"] == pytest.approx(4 / 6)  # pooled over the sources left out
    assert estimate["specificity"] == pytest.approx(2 / 4)
    # The rule itself is chosen on every source of both splits pooled: it keeps all six positives.
    labels = np.where(positive, 0, 1)  # class 0 is the positive one
    probabilities = np.stack([scores, 1 - scores], axis=1)
    parts = {
        "heldout_val": (labels[:5], probabilities[:5], sources[:5]),
        "heldout_test": (labels[5:], probabilities[5:], sources[5:]),
    }
    decision = operating_point_decision("COVID", 0, parts, 1.0)
    assert decision is not None
    assert decision["threshold"] == pytest.approx(0.3) and decision["leave_one_source_out"] == estimate
    assert "chosen on heldout_val + heldout_test" in decision["rule"]
    Decision.model_validate(decision)  # what the card takes
    assert operating_point_decision("COVID", 0, {"val": (labels[6:], probabilities[6:], sources[6:])}, 1.0) is None
    # One source of positives cannot say how the rule moves to another.
    assert leave_one_source_out(positive, scores, ["a"] * 6 + ["c"] * 4, 1.0) is None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Synthetic X-rays and a split.csv with two sources in each held-out split."""
    root = write_dataset(tmp_path_factory.mktemp("data"), {"COVID": 16, "Normal": 8, "Viral Pneumonia": 8})
    return root, write_split_csv(root, lambda i: SPLIT_OF[i % 4], lambda i: f"site{i % 8 // 4}")


def test_the_bundle_gets_a_threshold_chosen_on_the_held_out_splits(
    decision_bundle_dir: Path, dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    root, split_csv = dataset
    out = tmp_path / "rechosen"
    argv = ["operating-point", str(decision_bundle_dir), "--out", str(out), "--data-root", str(root)]
    assert train_main([*argv, "--split-csv", str(split_csv), "--on", "heldout_val,heldout_test"]) == 0
    before, after = load_bundle(decision_bundle_dir, CPU), load_bundle(out, CPU)  # the new one verifies
    card, old_rule = after.card, before.card.decision
    assert card.decision is not None and old_rule is not None
    assert card.version == next_version(before.card.version) != before.card.version
    assert card.temperature == before.card.temperature and card.sha256 == before.card.sha256  # same network
    # The threshold is what the service's own scores of the chosen images give.
    positive_class = old_rule.positive_class
    predictor = Predictor.load(out, CPU)
    with split_csv.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] in ("heldout_val", "heldout_test")]
    scores = np.array(
        [predictor.predict(decode_image((root / r["path"]).read_bytes())).probabilities[positive_class] for r in rows]
    )
    positive = np.array([r["label"] == positive_class for r in rows])
    expected = operating_point(positive, scores, 0.97)
    assert card.decision.threshold == pytest.approx(expected, abs=1e-4)
    written = json.loads((out / CARD_FILE).read_text())
    assert written["decision"]["chosen_on"] == ["heldout_val", "heldout_test"]
    estimate = written["decision"]["leave_one_source_out"]
    assert set(estimate["per_source"]) == {"site0", "site1"} and estimate["n_positive"] == int(positive.sum())
    assert written["training"]["operating_point_rechosen"]["from"]["bundle_sha256"] == before.digest
    point = written["metrics"]["by_split"]["heldout_val"]["at_operating_point"]
    assert point["threshold"] == card.decision.threshold


def test_the_cli_says_why_it_cannot_rechoose(
    bundle_dir: Path,
    decision_bundle_dir: Path,
    dataset: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, split_csv = dataset
    common = ["--out", str(tmp_path / "x"), "--data-root", str(root), "--split-csv", str(split_csv)]
    assert train_main(["operating-point", str(bundle_dir), *common]) == 2
    assert "no decision rule" in capsys.readouterr().err
    assert train_main(["operating-point", str(decision_bundle_dir), *common, "--on", "heldout_elsewhere"]) == 2
    assert "No labelled images of ['heldout_elsewhere']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_run_chooses_its_operating_point_on_both_held_out_splits(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data", {"COVID": 20, "Normal": 20, "Viral Pneumonia": 20}, size=64)
    for i, path in enumerate(sorted(root.glob("*/*.png"))):  # sources from the file-name prefix
        path.rename(path.with_name(f"{('a', 'a', 'h1', 'h2', 't1')[i % 5]}__{path.name}"))
    config = RunConfig(
        data=[str(root)],
        out=str(tmp_path / "run"),
        image_size=64,
        heldout_val_sources=["h1", "h2"],
        heldout_test_sources=["t1"],
    )
    run = Run(config)
    run.split()
    (run.out / "resnet18").mkdir()
    rng = np.random.default_rng(0)
    logits = {s: rng.normal(size=(len(run.subset(s).labels), 3)) for s in run.reported_splits()}
    decision = run.calibrate("resnet18", logits)["decision"]
    assert decision["chosen_on"] == ["heldout_val", "heldout_test"]
    held = [run.subset(s) for s in ("heldout_val", "heldout_test")]
    temperature = json.loads((run.out / "resnet18" / "calibration.json").read_text())["temperature"]
    scores = np.concatenate([softmax(logits[s], temperature)[:, 0] for s in ("heldout_val", "heldout_test")])
    positive = np.concatenate([h.labels for h in held]) == 0
    assert decision["threshold"] == pytest.approx(operating_point(positive, scores, 0.97))
    assert set(decision["leave_one_source_out"]["per_source"]) == {"h1", "h2", "t1"}


def test_a_clinic_chooses_the_threshold_on_its_own_labelled_images(
    decision_bundle_dir: Path, dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    root, split_csv = dataset
    with split_csv.open(newline="") as fh:
        rows = [r | {"split": "local", "source": "our-scanner"} for r in csv.DictReader(fh)]
    local = tmp_path / "local.csv"
    with local.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split", "source"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "ours"
    argv = ["operating-point", str(decision_bundle_dir), "--out", str(out), "--data-root", str(root)]
    assert train_main([*argv, "--split-csv", str(local), "--on", "local", "--target-sensitivity", "1.0"]) == 0
    written = json.loads((out / CARD_FILE).read_text())
    positive_class = written["decision"]["positive_class"]
    point = written["metrics"]["by_split"]["local"]["at_operating_point"]
    assert point["sensitivity"] == 1.0 and point["n_positive"] == sum(r["label"] == positive_class for r in rows)
    assert written["decision"]["leave_one_source_out"] is None  # one site: nothing to leave out
    assert "chosen on local" in written["decision"]["rule"]
    Predictor.load(out, CPU)
    # Chosen again without the option: the bundle's own target holds, not the training default (0.97).
    again = tmp_path / "again"
    argv = ["operating-point", str(out), "--out", str(again), "--data-root", str(root)]
    assert train_main([*argv, "--split-csv", str(local), "--on", "local"]) == 0
    rechosen = load_bundle(again, CPU).card.decision
    assert rechosen is not None and rechosen.target_sensitivity == 1.0
