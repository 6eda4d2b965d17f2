"""Over-sampling of minority classes with inverse-frequency weights."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler


def inverse_frequency_weights(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-sample weight 1 / count(class of the sample): every class is drawn equally often in expectation."""
    y = np.asarray(labels)
    counts = np.bincount(y)
    return 1.0 / counts[y]


def balanced_sampler(
    labels: Sequence[int] | np.ndarray, seed: int, num_samples: int | None = None
) -> WeightedRandomSampler:
    """A WeightedRandomSampler (with replacement) that over-samples minority classes to a uniform mix."""
    weights = inverse_frequency_weights(labels).tolist()
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples or len(weights), replacement=True, generator=generator)
