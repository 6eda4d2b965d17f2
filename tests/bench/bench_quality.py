"""Quality of a bundle on labelled images, scored through the service's own decoder and Predictor.

    .venv/bin/python tests/bench/bench_quality.py --model-dir models/default --data ../shared/data/cxr-dev \
        --split-csv models/default/report/split.csv --split test [--robustness] [--subgroup lecuong__]
    .venv/bin/python tests/bench/bench_quality.py --model-dir models/default \
        --data ../shared/data/cxr-dev ../shared/data/cxr-ext --split-csv models/default/report/split.csv \
        --split heldout_val heldout_test --per-source --probes

Prints accuracy, macro-F1, per-class recall/specificity and the confusion matrix; with ``--robustness`` the same
for perturbed copies of every image (resampling, blur, JPEG compression, other windows/exposures), which is how
X-rays from other hospitals and scanners differ. ``--subgroup`` reports the error rate of files whose path
contains the pattern (on cxr-dev, ``lecuong__`` marks the pediatric Normal images). ``--per-source`` prints a row per
source (collection), at the card's decision rule too, and the leave-one-source-out estimate of a threshold chosen
on those images; ``--probes`` the shortcut probes (centre blanked, centre only, centre swapped, flip, 64 px
round trip). With a decision rule in the card the operating point's sensitivity/specificity are printed too. Run on
demand.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from service.model.imaging import decode_image  # noqa: E402
from service.model.labels import canonical_label  # noqa: E402
from service.model.preprocess import resize_gray  # noqa: E402
from service.predictor import Predictor  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.data import data_root, discover_all, resolve, source_from_name  # noqa: E402
from training.metrics import (  # noqa: E402
    calibration_metrics,
    classification_metrics,
    decided_labels,
    leave_one_source_out,
    per_source_metrics,
    threshold_metrics,
)
from training.probes import shortcut_probes  # noqa: E402


def _pil(a: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8))


def _jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    _pil(a).save(buffer, format="JPEG", quality=quality)
    return decode_image(buffer.getvalue()).array  # through the service's real decoder


def _central(a: np.ndarray, share: float) -> np.ndarray:
    h, w = a.shape
    dh, dw = round(h * (1 - share) / 2), round(w * (1 - share) / 2)
    return a[dh : h - dh, dw : w - dw]


def _resample(a: np.ndarray, factor: float) -> np.ndarray:
    h, w = a.shape
    small = resize_gray(a, (max(16, round(w * factor)), max(16, round(h * factor))))
    return resize_gray(small, (w, h)) if factor < 1 else small


PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda a: a,
    "downsample x0.35 and back": lambda a: _resample(a, 0.35),
    "upsample to 4x (1024 px)": lambda a: _resample(a, 4.0),
    "gaussian blur sigma 2": lambda a: np.asarray(_pil(a).filter(ImageFilter.GaussianBlur(2)), np.float32) / 255,
    "JPEG quality 30": lambda a: _jpeg(a, 30),
    "gamma 0.6 (brighter)": lambda a: a**0.6,
    "gamma 1.6 (darker)": lambda a: a**1.6,
    "narrow window (clip 10-90 %)": lambda a: np.clip((a - 0.1) / 0.8, 0, 1),
    "low contrast (x0.6)": lambda a: 0.2 + 0.6 * a,
    # Other scanners' field of view and image processing: v4 called Normal films COVID after each of these.
    "central 80 % (tighter field)": lambda a: _central(a, 0.8),
    "unsharp mask (r 2, 150 %)": lambda a: (
        np.asarray(_pil(a).filter(ImageFilter.UnsharpMask(2, 150, 3)), np.float32) / 255
    ),
    "gaussian noise sigma 0.03": lambda a: a + np.random.default_rng(0).normal(0, 0.03, a.shape).astype(np.float32),
}


def load(args: argparse.Namespace) -> tuple[list[str], list[str], list[str], Path]:
    """Paths, labels and sources of the images to score, and the folder paths are relative to."""
    root = data_root([Path(d) for d in args.data])
    if args.split_csv:
        with open(args.split_csv, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("split") in args.split]
        sources = [r.get("source") or source_from_name(r["path"], "") for r in rows]
        return [r["path"] for r in rows], [canonical_label(r["label"]) for r in rows], sources, root
    samples = discover_all([Path(d) for d in args.data])
    return [s.path for s in samples], [s.label for s in samples], [s.source for s in samples], root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="models/default")
    parser.add_argument("--data", required=True, nargs="+", help="dataset folder(s) or CSV manifest(s)")
    parser.add_argument("--split-csv", help="split.csv of a training run; with --split, score those splits only")
    parser.add_argument("--split", nargs="+", default=["test"])
    parser.add_argument("--robustness", action="store_true")
    parser.add_argument("--per-source", action="store_true")
    parser.add_argument("--probes", action="store_true")
    parser.add_argument("--subgroup", action="append", default=[], help="path pattern for a subgroup error rate")
    args = parser.parse_args()

    predictor = Predictor.load(args.model_dir, providers=["CPUExecutionProvider"])
    paths, labels, sources, root = load(args)
    classes = list(predictor.classes)
    y_true = np.array([classes.index(lab) for lab in labels])
    started = time.perf_counter()
    arrays = [decode_image(resolve(root, p).read_bytes()).array for p in paths]
    print(
        f"model {predictor.card.name} ({predictor.card.arch}, sha256 {predictor.sha256[:12]}), "
        f"{len(paths)} images from {' '.join(args.data)}" + (f" {args.split}" if args.split_csv else "")
    )
    probs = predictor.predict_arrays(arrays)
    m = classification_metrics(y_true, probs, classes)
    seconds = time.perf_counter() - started
    print(f"\naccuracy {m['accuracy']:.4f}   macro-F1 {m['macro_f1']:.4f}   ({seconds:.1f}s, decode + predict)\n")
    print(f"{'class':<18}{'recall':>8}{'precision':>11}{'specificity':>13}{'F1':>8}{'AUC':>8}{'n':>6}")
    for c in classes:
        pc = m["per_class"][c]
        auc = f"{pc['roc_auc']:.4f}" if pc["roc_auc"] is not None else "  n/a"
        print(
            f"{c:<18}{pc['recall']:>8.4f}{pc['precision']:>11.4f}{pc['specificity']:>13.4f}{pc['f1']:>8.4f}"
            f"{auc:>8}{pc['support']:>6}"
        )
    print("\nconfusion matrix (rows: true, columns: predicted)")
    print(" " * 18 + "".join(f"{c[:14]:>16}" for c in classes))
    for c, row in zip(classes, m["confusion_matrix"], strict=True):
        print(f"{c:<18}" + "".join(f"{v:>16}" for v in row))
    calibration = calibration_metrics(y_true, probs)
    print(
        f"\ncalibration: ECE {calibration['ece']:.4f} (15 bins), Brier {calibration['brier']:.4f}, "
        f"{calibration['errors_over_0_9']} errors with confidence > 0.9"
    )
    decision = predictor.card.decision
    if decision is not None:
        positive = classes.index(decision.positive_class)
        point = threshold_metrics(y_true == positive, probs[:, positive], decision.threshold)
        decided = classification_metrics(
            y_true, np.eye(len(classes))[decided_labels(probs, positive, decision.threshold)], classes
        )
        print(
            f"decision rule ({decision.positive_class} at P >= {decision.threshold:.3f}): sensitivity "
            f"{point['sensitivity']:.4f}, specificity {point['specificity']:.4f}; accuracy {decided['accuracy']:.4f}, "
            f"macro-F1 {decided['macro_f1']:.4f}"
        )
    predicted = probs.argmax(1)
    if args.per_source:
        rule = " (sens. / spec. at the decision rule)" if decision is not None else ""
        print(f"\n{'source':<16}{'n':>6}{'accuracy':>10}  recall per class{rule}")
        of = np.array(sources)
        for source, f in per_source_metrics(y_true, probs, sources, classes).items():
            recalls = ", ".join(f"{c} {r:.3f}" for c, r in f["recall"].items())
            if decision is not None:
                own = of == source
                at = threshold_metrics(y_true[own] == positive, probs[own, positive], decision.threshold)
                figures = ("-" if np.isnan(at[k]) else f"{at[k]:.3f}" for k in ("sensitivity", "specificity"))
                recalls += f"  ({' / '.join(figures)})"
            print(f"{source:<16}{f['n']:>6}{f['accuracy']:>10.4f}  {recalls}")
        if decision is not None:
            target = decision.target_sensitivity or RunConfig(data=[]).target_sensitivity
            estimate = leave_one_source_out(y_true == positive, probs[:, positive], sources, target)
            if estimate is not None:  # the threshold chosen again on these images, one source left out at a time
                print(
                    f"a threshold chosen on the other sources for sensitivity >= {target}, each source left out: "
                    f"sensitivity {estimate['sensitivity']:.4f}, specificity {estimate['specificity']:.4f}"
                )
    if args.probes:
        positive = classes.index(decision.positive_class) if decision is not None else 0
        probes = shortcut_probes(predictor.predict_arrays, arrays, y_true, positive, len(classes))
        print(f"\nshortcut probes ({classes[positive]} vs rest; chance balanced accuracy {1 / len(classes):.2f})")
        for name in ("original", "borders_only", "centre_only"):
            print(
                f"  {name:<14} AUC {probes[name]['positive_vs_rest_auc']:.4f}   balanced accuracy "
                f"{probes[name]['balanced_accuracy']:.4f}"
            )
        if "centre_swap" in probes:
            swap = probes["centre_swap"]
            print(
                f"  {'centre_swap':<14} {swap['pairs']} pairs: follows the centre {swap['follows_centre']:.1%}, "
                f"the borders {swap['follows_borders']:.1%}"
            )
        for name in ("flip", "roundtrip_64"):
            print(f"  {name:<14} answers changed {probes[name]['changed_share']:.1%}")
    for pattern in args.subgroup:
        members = np.array([pattern in p for p in paths])
        if members.any():
            errors = int((predicted[members] != y_true[members]).sum())
            print(
                f"\nsubgroup '{pattern}': {members.sum()} images, {errors} errors "
                f"({errors / members.sum():.1%}); predicted as: "
                + ", ".join(f"{c} {int((predicted[members] == k).sum())}" for k, c in enumerate(classes))
            )
    if args.robustness:
        covid = classes.index("COVID") if "COVID" in classes else 0
        print(
            f"\n{'perturbation':<32}{'accuracy':>10}{'macro-F1':>10}{'COVID recall':>14}{'others as COVID':>17}"
            f"{'changed':>9}"
        )
        others = y_true != covid
        for name, perturb in PERTURBATIONS.items():
            p = predictor.predict_arrays([np.clip(perturb(a), 0, 1).astype(np.float32) for a in arrays])
            pm = classification_metrics(y_true, p, classes)
            changed = float((p.argmax(1) != predicted).mean())
            as_covid = float((p.argmax(1)[others] == covid).mean()) if others.any() else float("nan")
            print(
                f"{name:<32}{pm['accuracy']:>10.4f}{pm['macro_f1']:>10.4f}"
                f"{pm['per_class'][classes[covid]]['recall']:>14.4f}{as_covid:>17.1%}{changed:>9.1%}"
            )


if __name__ == "__main__":
    main()
