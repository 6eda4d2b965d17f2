"""The three supported CNN backbones, their classification heads and their Grad-CAM target layers.

``build(arch, num_classes, weights)`` never downloads anything unless ``weights="imagenet"`` is asked for,
and then only through torchvision's own weight enum (which uses the local torch cache when offline).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models


@dataclass(frozen=True)
class BackboneSpec:
    factory: Callable[..., nn.Module]
    imagenet_weights: str  # attribute of torchvision's weight enum
    cam_layer: str  # dotted module path used as Grad-CAM target
    head: str  # dotted module path of the final linear layer
    lr: float  # AdamW learning rate from random init (training's default for this arch)


BACKBONES: dict[str, BackboneSpec] = {
    # Last ReLU of the conv stack (14x14 at 224 px): the deepest layer that still has spatial extent.
    # No batch norm: from random init VGG-16 diverges at the learning rate that suits the two BN networks.
    "vgg16": BackboneSpec(models.vgg16, "VGG16_Weights", "features.29", "classifier.6", lr=1e-4),
    "resnet18": BackboneSpec(models.resnet18, "ResNet18_Weights", "layer4", "fc", lr=1e-3),
    # DenseNet's features end in a BatchNorm (norm5); the ReLU is applied in forward().
    "densenet121": BackboneSpec(models.densenet121, "DenseNet121_Weights", "features.norm5", "classifier", lr=1e-3),
}


class UnknownArchError(ValueError):
    """An architecture name that is not in BACKBONES."""


def _spec(arch: str) -> BackboneSpec:
    try:
        return BACKBONES[arch]
    except KeyError:
        raise UnknownArchError(f"Unknown architecture {arch!r}; choose one of: {', '.join(BACKBONES)}.") from None


def cam_layer_name(arch: str) -> str:
    """Dotted name of the module whose activations Grad-CAM uses for ``arch``."""
    return _spec(arch).cam_layer


def cam_layer(model: nn.Module, arch: str) -> nn.Module:
    """The Grad-CAM target module of a model built by :func:`build`."""
    return model.get_submodule(cam_layer_name(arch))


class LogitsAndFeatures(nn.Module):
    """``model`` with two outputs from one forward pass: (logits N x C, features N x D).

    The features are the input of the final linear layer (``BackboneSpec.head``): DenseNet-121's
    relu(norm5) global-average-pooled (1024), ResNet-18's avgpool(layer4) (512), VGG-16's penultimate
    classifier activation (4096). The body is a copy of ``model`` whose head is an identity; the head itself is
    shared, so both outputs come from the same weights.
    """

    def __init__(self, model: nn.Module, arch: str) -> None:
        super().__init__()
        head_path = _spec(arch).head
        self.head = model.get_submodule(head_path)
        self.body = copy.deepcopy(model)
        parent_path, _, attr = head_path.rpartition(".")
        setattr(self.body.get_submodule(parent_path) if parent_path else self.body, attr, nn.Identity())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.head(features), features


class LogitsFeaturesAndCam(nn.Module):
    """``model`` with three outputs from one forward pass: (logits, features, CAM-layer activations).

    Only for the global-pool + linear heads that have a closed-form Grad-CAM (``service.model.cam``):
    ResNet-18 (``layer4``, N x 512 x h x w) and DenseNet-121 (``relu(features.norm5)``, N x 1024 x h x w: the
    values pytorch-grad-cam records, since torchvision applies that ReLU in place). Same weights, same
    arithmetic as torchvision's ``forward``.
    """

    def __init__(self, model: nn.Module, arch: str) -> None:
        super().__init__()
        if arch not in ("resnet18", "densenet121"):
            raise ValueError(f"{arch} has no global-pool + linear head after its CAM layer.")
        self.model = model
        self.arch = arch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m: Any = self.model  # a torchvision ResNet or DenseNet (nn.Module's attributes are typed loosely)
        if self.arch == "resnet18":
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            activations = m.layer4(m.layer3(m.layer2(m.layer1(x))))
            features = torch.flatten(m.avgpool(activations), 1)
            return m.fc(features), features, activations
        activations = nn.functional.relu(m.features(x))
        features = torch.flatten(nn.functional.adaptive_avg_pool2d(activations, (1, 1)), 1)
        return m.classifier(features), features, activations


def _replace_head(model: nn.Module, head_path: str, num_classes: int) -> None:
    old = model.get_submodule(head_path)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{head_path} is a {type(old).__name__}, not the expected Linear head.")
    parent_path, _, attr = head_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    # setattr registers the module, also for nn.Sequential's numbered children ("classifier.6").
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint of ours
    return state


def build(arch: str, num_classes: int, weights: str | Path = "none") -> nn.Module:
    """Build ``arch`` with a ``num_classes`` head.

    ``weights``: ``"none"`` (random init), ``"imagenet"`` (torchvision's ImageNet weights; downloads only if not
    in the torch cache) or a path to a state dict (.safetensors or .pt) of either the full model with the same
    head or an ImageNet backbone with a 1000-class head, which is then replaced.
    """
    spec = _spec(arch)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    if weights == "none":
        model = spec.factory(weights=None, num_classes=num_classes)
        return model
    if weights == "imagenet":
        enum = getattr(models, spec.imagenet_weights)
        model = spec.factory(weights=enum.IMAGENET1K_V1)
        _replace_head(model, spec.head, num_classes)
        return model
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file {path} does not exist (expected 'none', 'imagenet' or a path).")
    state = load_state_dict_file(path)
    head_weight = state.get(f"{spec.head}.weight")
    if head_weight is not None and head_weight.shape[0] == num_classes:
        # Built on the meta device and given the file's tensors: no random init, so loading a bundle neither
        # spends time initialising DenseNet nor draws from torch's global generator (which another thread, e.g. a
        # test building a seeded model, may be using).
        with torch.device("meta"):
            model = spec.factory(weights=None, num_classes=num_classes)
        model.load_state_dict(state, assign=True)
        left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"The state dict does not set {', '.join(left[:5])}.")
        return model
    model = spec.factory(weights=None)
    model.load_state_dict(state)
    _replace_head(model, spec.head, num_classes)
    return model
