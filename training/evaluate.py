"""Test-split metrics (scikit-learn), confusion matrix and curve plots (matplotlib), Grad-CAM grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from service.model.bundle import softmax


def classification_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/specificity/support, one-vs-rest ROC-AUC, confusion."""
    labels = list(range(len(classes)))
    y_pred = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    # Specificity of class k = TN / (TN + FP) from the one-vs-rest confusion matrices.
    per_class_cm = multilabel_confusion_matrix(y_true, y_pred, labels=labels)
    specificity = [float(cm[0, 0] / max(cm[0, 0] + cm[0, 1], 1)) for cm in per_class_cm]
    roc_auc: dict[str, float | None] = {}
    for k, c in enumerate(classes):
        positives = y_true == k
        # One-vs-rest AUC is undefined when the class is absent (or alone) in y_true.
        roc_auc[c] = (
            float(roc_auc_score(positives, probabilities[:, k]))
            if 0 < positives.sum() < len(y_true)
            else None
        )
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


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature T minimising validation NLL of softmax(logits / T) (grid search; T=1 leaves logits as is)."""
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 121))
    nll = [
        -np.mean(np.log(softmax(logits, t)[np.arange(len(y_true)), y_true] + 1e-12)) for t in grid
    ]
    return float(grid[int(np.argmin(nll))])


def plot_confusion(metrics: dict[str, Any], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ConfusionMatrixDisplay(np.array(metrics["confusion_matrix"]), display_labels=metrics["classes"]).plot(
        ax=ax, cmap="Blues", colorbar=False
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    ax_loss.legend()
    ax_f1.plot(epochs, [h["val_macro_f1"] for h in history], color="tab:green")
    ax_f1.set(xlabel="epoch", ylabel="macro-F1", title=f"{title}: validation macro-F1", ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gradcam_grid(
    images: np.ndarray, overlays: list[np.ndarray], titles: list[str], path: Path, columns: int
) -> None:
    """Rows of (image, overlay) pairs; ``images`` uint8 S x S, ``overlays`` S x S x 3."""
    rows = max(1, int(np.ceil(len(overlays) / columns)))
    fig, axes = plt.subplots(rows, columns * 2, figsize=(columns * 4, rows * 2.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, over, title) in enumerate(zip(images, overlays, titles, strict=True)):
        r, c = divmod(i, columns)
        axes[r, 2 * c].imshow(image, cmap="gray", vmin=0, vmax=255)
        axes[r, 2 * c + 1].imshow(over)
        axes[r, 2 * c].set_title(title, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
