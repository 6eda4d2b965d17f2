"""Metrics of a scored split (scikit-learn): per class, per source, calibration, and the operating point."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from service.model.probabilities import softmax


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/specificity/support, one-vs-rest ROC-AUC, confusion."""
    labels = list(range(len(classes)))
    y_pred = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    # Specificity of class k = TN / (TN + FP) from the one-vs-rest confusion matrices.
    per_class_cm = multilabel_confusion_matrix(y_true, y_pred, labels=labels)
    specificity = [float(cm[0, 0] / max(cm[0, 0] + cm[0, 1], 1)) for cm in per_class_cm]
    roc_auc: dict[str, float | None] = {}
    for k, c in enumerate(classes):
        positives = y_true == k
        # One-vs-rest AUC is undefined when the class is absent (or alone) in y_true.
        roc_auc[c] = float(roc_auc_score(positives, probabilities[:, k])) if 0 < positives.sum() < len(y_true) else None
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "specificity": specificity[i],
                "support": int(support[i]),
                "roc_auc": roc_auc[c],
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(classes),
    }


# A source needs this many images to count in the worst-source temperature rule.
MIN_SOURCE_IMAGES = 20


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, sources: Sequence[str] | np.ndarray | None = None) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) (grid search; T=1 leaves logits as is).

    With ``sources``, T minimises the NLL of the *worst* source (of those with >= MIN_SOURCE_IMAGES images) rather
    than the pooled one: the service meets one unseen hospital at a time, and a temperature that fits the pooled
    held-out images is overconfident on the source the network reads worst (group-robust calibration)."""
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 121))
    rows = np.arange(len(y_true))
    groups = [rows]
    if sources is not None:
        names = np.asarray(sources)
        groups = [rows[names == s] for s in np.unique(names) if np.sum(names == s) >= MIN_SOURCE_IMAGES] or groups
    nll = [
        max(-np.mean(np.log(softmax(logits[g], t)[np.arange(len(g)), y_true[g]] + 1e-12)) for g in groups) for t in grid
    ]
    return float(grid[int(np.argmin(nll))])


def per_source_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, sources: Sequence[str], classes: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per source: n, accuracy, recall of each class it has, and the confusion matrix (rows true, columns
    predicted, in ``classes`` order). A one-class source has no meaningful macro-F1; its accuracy is that recall."""
    out: dict[str, dict[str, Any]] = {}
    y_pred = probabilities.argmax(axis=1)
    names = np.asarray(sources)
    for source in sorted(set(sources)):
        mask = names == source
        truth, pred = y_true[mask], y_pred[mask]
        out[source] = {
            "n": int(mask.sum()),
            "accuracy": float((truth == pred).mean()),
            "recall": {classes[k]: float((pred[truth == k] == k).mean()) for k in sorted(set(truth.tolist()))},
            "confusion_matrix": confusion_matrix(truth, pred, labels=list(range(len(classes)))).tolist(),
        }
    return out


def calibration_metrics(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Top-label expected calibration error (equal-width bins), multi-class Brier score, and the reliability
    table (per bin: mean confidence, accuracy, count)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table = []
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if not in_bin.any():
            continue
        conf, acc = float(confidence[in_bin].mean()), float(correct[in_bin].mean())
        ece += in_bin.mean() * abs(conf - acc)
        table.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "confidence": conf,
                "accuracy": acc,
                "n": int(in_bin.sum()),
            }
        )
    onehot = np.eye(probabilities.shape[1])[y_true]
    return {
        "ece": float(ece),
        "brier": float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1))),
        "bins": bins,
        "reliability": table,
        "errors_over_0_9": int(np.sum(~correct & (confidence > 0.9))),
    }


def operating_point(positive: np.ndarray, scores: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold on ``scores`` (P(positive class)) at which at least ``target_sensitivity`` of the
    positives reach it: the most specific rule that keeps the sensitivity."""
    ranked = np.sort(scores[positive.astype(bool)])[::-1]
    if not len(ranked):
        raise ValueError("No images of the positive class to choose an operating point on.")
    needed = int(np.ceil(target_sensitivity * len(ranked)))
    return float(ranked[max(needed, 1) - 1])


def threshold_metrics(positive: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity and specificity of ``scores >= threshold`` for the positive class."""
    called = scores >= threshold
    positive = positive.astype(bool)
    return {
        "threshold": float(threshold),
        "sensitivity": float(called[positive].mean()) if positive.any() else float("nan"),
        "specificity": float((~called[~positive]).mean()) if (~positive).any() else float("nan"),
        "n_positive": int(positive.sum()),
        "n_negative": int((~positive).sum()),
    }


def leave_one_source_out(
    positive: np.ndarray, scores: np.ndarray, sources: Sequence[str], target_sensitivity: float
) -> dict[str, Any] | None:
    """How an operating point chosen on some sources holds on one it was not chosen on: each source's images
    scored at the threshold chosen (``operating_point``) on the other sources' images, then pooled. The honest
    estimate for a hospital the threshold never saw; None with fewer than two sources of positives."""
    positive = positive.astype(bool)
    of = np.asarray(sources)
    if len(np.unique(of[positive])) < 2:
        return None
    called = np.zeros(len(scores), dtype=bool)
    per_source: dict[str, dict[str, float]] = {}
    for source in np.unique(of):
        own = of == source
        threshold = operating_point(positive[~own], scores[~own], target_sensitivity)
        called[own] = scores[own] >= threshold
        figures = {"threshold": float(threshold), "n_positive": int(positive[own].sum())}
        figures["n_negative"] = int((~positive[own]).sum())
        if positive[own].any():
            figures["sensitivity"] = float(called[own & positive].mean())
        if (~positive[own]).any():
            figures["specificity"] = float((~called[own & ~positive]).mean())
        per_source[str(source)] = figures
    return {
        "sensitivity": float(called[positive].mean()),
        "specificity": float((~called[~positive]).mean()) if (~positive).any() else None,
        "n_positive": int(positive.sum()),
        "n_negative": int((~positive).sum()),
        "per_source": per_source,
    }


def operating_point_decision(
    positive_class: str,
    positive_index: int,
    chosen_on: Mapping[str, tuple[np.ndarray, np.ndarray, Sequence[str]]],
    target_sensitivity: float,
) -> dict[str, Any] | None:
    """The card's ``decision``: the threshold chosen on the images of every split in ``chosen_on`` (split ->
    labels, calibrated probabilities, sources) pooled, the rule in words, and the leave-one-source-out estimate of
    what it gives on a source it was not chosen on. None when those splits have no positive image."""
    positive = np.concatenate([labels for labels, _, _ in chosen_on.values()]) == positive_index
    if not positive.any():
        return None
    scores = np.concatenate([probabilities[:, positive_index] for _, probabilities, _ in chosen_on.values()])
    sources = [source for _, _, of in chosen_on.values() for source in of]
    threshold = operating_point(positive, scores, target_sensitivity)
    where = " + ".join(chosen_on)
    return {
        "positive_class": positive_class,
        "threshold": threshold,
        "target_sensitivity": target_sensitivity,
        "chosen_on": list(chosen_on),
        "rule": (
            f"{positive_class} suspected when P({positive_class}) >= {threshold:.3f} (chosen on {where} for "
            f"sensitivity >= {target_sensitivity}); otherwise the most probable other class"
        ),
        "leave_one_source_out": leave_one_source_out(positive, scores, sources, target_sensitivity),
    }


def decided_labels(probabilities: np.ndarray, positive_index: int, threshold: float) -> np.ndarray:
    """Labels under the decision rule: the positive class at or above its threshold, else the most probable other
    class (the same rule as service.model.decision)."""
    others = probabilities.copy()
    others[:, positive_index] = -np.inf
    labels = others.argmax(axis=1)
    labels[probabilities[:, positive_index] >= threshold] = positive_index
    return labels
