"""Over-sampling weights: every class equally often, and within a class the sources in a chosen balance."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def inverse_frequency_weights(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-sample weight 1 / count(class of the sample): every class is drawn equally often in expectation."""
    y = np.asarray(labels)
    counts = np.bincount(y)
    return 1.0 / counts[y]


def sampling_weights(
    labels: Sequence[int] | np.ndarray, sources: Sequence[str] | None = None, source_balance: float = 0.0
) -> np.ndarray:
    """Per-sample weights that draw every class equally often; within a class, a source of n images gets a share
    proportional to n ** (1 - source_balance): 0 keeps the images' own mix, 1 draws every source equally often.
    (Class follows source in public COVID collections, so a big single-site source must not define a class.)"""
    y = np.asarray(labels)
    if sources is None or source_balance == 0.0:
        weights = inverse_frequency_weights(y)
    else:
        pairs = list(zip(y.tolist(), sources, strict=True))
        size = Counter(pairs)
        share = {pair: n ** (1.0 - source_balance) for pair, n in size.items()}
        class_total: Counter[int] = Counter()
        for (label, _), value in share.items():
            class_total[label] += value
        # Each class sums to 1; within it each source to share / class total, spread over its images.
        weights = np.array([share[p] / class_total[p[0]] / size[p] for p in pairs])
    return weights / weights.sum()
