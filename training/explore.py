"""Data exploration plots: images per class, and a grid of samples per class."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from service.model.imaging import decode_image
from training.data import Sample, resolve


def plot_class_counts(counts: Counter[str], path: Path) -> None:
    labels = sorted(counts)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(labels, [counts[c] for c in labels], color="tab:blue")
    ax.bar_label(bars)
    ax.set(ylabel="images", title="Images per class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(samples: Sequence[Sample], root: Path, path: Path, per_class: int = 6, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    classes = sorted({s.label for s in samples})
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 1.8, len(classes) * 2), squeeze=False)
    for row, label in enumerate(classes):
        members = [s for s in samples if s.label == label]
        for col, index in enumerate(rng.permutation(len(members))[:per_class]):
            image = decode_image(resolve(root, members[index].path).read_bytes())
            axes[row, col].imshow(image.array, cmap="gray", vmin=0, vmax=1)
        axes[row, 0].set_ylabel(label)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
