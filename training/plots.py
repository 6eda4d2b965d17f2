"""Plots of a run (matplotlib, Agg selected by the CLI): confusion matrices, curves, reliability, Grad-CAM grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay


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


def plot_reliability(curves: dict[str, dict[str, Any]], path: Path) -> None:
    """Reliability diagram: accuracy against confidence per bin, one line per scored split."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, calibration in curves.items():
        table = calibration["reliability"]
        ax.plot(
            [b["confidence"] for b in table],
            [b["accuracy"] for b in table],
            marker="o",
            label=f"{name} (ECE {calibration['ece']:.3f})",
        )
    ax.set(xlabel="confidence (top label)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02), title="Reliability")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_source_confusions(per_source: dict[str, dict[str, Any]], classes: list[str], path: Path, title: str) -> None:
    """One small confusion matrix per source."""
    names = list(per_source)
    columns = min(4, max(1, len(names)))
    rows = int(np.ceil(len(names) / columns)) or 1
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 3.4, rows * 3.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    short = [c[:8] for c in classes]
    for ax, name in zip(axes.flat, names, strict=False):
        ax.axis("on")
        ConfusionMatrixDisplay(np.array(per_source[name]["confusion_matrix"]), display_labels=short).plot(
            ax=ax, cmap="Blues", colorbar=False
        )
        ax.set_title(f"{name} (n={per_source[name]['n']}, acc {per_source[name]['accuracy']:.2f})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
