"""Class probabilities from a bundle's logits (numpy only, so training, the service and tests share it)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (N x C in, N x C out, rows sum to 1).

    With the card's temperature this turns the bundle's logits into its calibrated probabilities.
    """
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)
