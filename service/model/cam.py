"""Grad-CAM in closed form, from the CAM layer's activations and the head's weights (numpy only, no network).

For a head that is global-average-pool + linear, the gradient Grad-CAM needs is known without a backward pass.
With ``A`` the CAM layer's activations of one image (K channels, h x w positions), ``W`` (C x K) and ``b`` the
linear layer and ``f`` what the network applies between the CAM layer and the pooling:

    y_c = sum_k W_ck * (1 / hw) * sum_ij f(A_kij) + b_c
    dy_c / dA_kij = W_ck * f'(A_kij) / hw
    alpha_ck = mean_ij dy_c / dA_kij = W_ck * m_k / hw,     m_k = (1 / hw) * sum_ij f'(A_kij)
    cam_c = relu(sum_k alpha_ck * A_k)                        (an h x w map)

- ResNet-18 at ``layer4``: ``f`` is the identity (layer4 ends in a ReLU), so ``m_k = 1``: the classic CAM.
- DenseNet-121 at ``features.norm5``: ``f`` is the ReLU that ``forward`` applies after norm5, so ``m_k`` is the
  fraction of positions where ``A_k > 0`` (the ReLU mask). torchvision applies that ReLU in place, so the
  activations pytorch-grad-cam records (and the ones the graph exports) are ``relu(A)``; the mask is the same.

The map is then normalised and resized exactly as pytorch-grad-cam does (min-max, resize to the input size,
min-max again), so both engines give the same heatmap; the predictor checks that on a probe batch against
pytorch-grad-cam on the torch copy. Other heads (VGG-16's three-layer classifier) have no closed form: they are
explained on the torch copy.

What the closed form relies on can also be checked without torch, from one run of the graph: the head is
``y = W pool(f(A)) + b``, so the exported ``logits`` must equal that expression of the exported activations with
``W`` and ``b`` from weights.safetensors (:meth:`ClosedFormCam.head_logits`). That proves the weights the map
uses are the graph's head and the activations are the ones it pools; the service checks it before it is ready.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.model.preprocess import resize_gray

CAM_ACTIVATIONS_NAME = "cam_activations"  # the ONNX graph's output with the CAM layer's activations
# pytorch-grad-cam's epsilon in its min-max normalisation (kept so that near-flat maps match too).
_NORMALISE_EPS = 1e-7


@dataclass(frozen=True)
class ClosedFormHead:
    """How the head of one architecture follows its CAM layer."""

    cam_layer: str
    weight_key: str  # the linear layer's weight in the state dict
    relu_before_pool: bool

    @property
    def bias_key(self) -> str:
        """The linear layer's bias in the state dict."""
        return self.weight_key.removesuffix("weight") + "bias"


CLOSED_FORM_HEADS: dict[str, ClosedFormHead] = {
    "resnet18": ClosedFormHead("layer4", "fc.weight", relu_before_pool=False),
    "densenet121": ClosedFormHead("features.norm5", "classifier.weight", relu_before_pool=True),
}


def closed_form_head(arch: str, cam_layer: str) -> ClosedFormHead | None:
    """The closed form for ``arch`` explained at ``cam_layer``, or None when there is none (use the torch copy)."""
    head = CLOSED_FORM_HEADS.get(arch)
    return head if head is not None and head.cam_layer == cam_layer else None


def load_head_weight(weights_file: Path, head: ClosedFormHead) -> np.ndarray:
    """The head's C x K float32 weight, read from a bundle's weights.safetensors without torch."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="np") as tensors:
        return np.asarray(tensors.get_tensor(head.weight_key), dtype=np.float32)


def load_head_bias(weights_file: Path, head: ClosedFormHead) -> np.ndarray:
    """The head's C float32 bias, read from a bundle's weights.safetensors without torch."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="np") as tensors:
        return np.asarray(tensors.get_tensor(head.bias_key), dtype=np.float32)


def _normalise(maps: np.ndarray) -> np.ndarray:
    lowest = maps.min(axis=(1, 2), keepdims=True)
    shifted = maps - lowest
    return shifted / (_NORMALISE_EPS + shifted.max(axis=(1, 2), keepdims=True))


@dataclass(frozen=True)
class ClosedFormCam:
    """Grad-CAM maps of a global-pool + linear head from the CAM layer's activations."""

    weight: np.ndarray  # C x K
    relu_before_pool: bool

    def raw(self, activations: np.ndarray, target_indices: list[int]) -> np.ndarray:
        """Un-normalised maps (N x h x w): ``relu(sum_k W_ck m_k A_k) / hw`` for N x K x h x w activations."""
        acts = np.asarray(activations, dtype=np.float32)
        if acts.ndim != 4 or acts.shape[1] != self.weight.shape[1]:
            raise ValueError(f"Expected N x {self.weight.shape[1]} x h x w activations, got shape {acts.shape}.")
        if len(target_indices) != len(acts):
            raise ValueError(f"One target per image: {len(target_indices)} targets for {len(acts)} images.")
        if any(not 0 <= i < len(self.weight) for i in target_indices):
            raise ValueError(f"Target class indices {target_indices} outside 0..{len(self.weight) - 1}.")
        positions = acts.shape[2] * acts.shape[3]
        weights = self.weight[target_indices]  # N x K
        if self.relu_before_pool:
            weights = weights * (acts > 0).mean(axis=(2, 3), dtype=np.float32)
        maps = np.einsum("nk,nkhw->nhw", weights, acts) / np.float32(positions)
        return np.maximum(maps, 0.0)

    def pooled(self, activations: np.ndarray) -> np.ndarray:
        """What the head's linear layer reads (N x K): ``mean_ij f(A_kij)`` of N x K x h x w activations."""
        acts = np.asarray(activations, dtype=np.float32)
        if self.relu_before_pool:
            acts = np.maximum(acts, 0.0)  # idempotent on DenseNet's exported (already ReLU'd) activations
        return acts.mean(axis=(2, 3))

    def head_logits(self, activations: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """The logits (N x C) the head computes from these activations: ``W pool(f(A)) + b``."""
        return self.pooled(activations) @ self.weight.T + np.asarray(bias, dtype=np.float32)

    def maps(self, activations: np.ndarray, target_indices: list[int], size: int) -> np.ndarray:
        """Heatmaps (N x size x size, [0, 1]) as pytorch-grad-cam's GradCAM gives them at the CAM layer."""
        low = _normalise(self.raw(activations, target_indices))
        full = np.stack([resize_gray(m, (size, size)) for m in low])
        return np.nan_to_num(_normalise(full), nan=0.0).clip(0.0, 1.0).astype(np.float32)
