"""The one source of training configuration: dataclasses whose fields (defaults and help) also make the CLI.

``RunConfig`` describes a run folder (data, split, archs, export); it holds a ``FitConfig`` for the loop.
``training.cli`` builds its options from these fields, so a default lives in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.model.backbones import BACKBONES
from service.model.preprocess import PREPROCESSING_ID, PREPROCESSING_IDS
from training.augment import RECIPES

# Sources kept out of training entirely. Each held-out set has all three classes from collections the
# network never sees: the validation one drives early stopping, the winner and the temperature; the
# operating point is chosen on both, and its figures come from leaving one source out at a time (one
# COVID source in heldout_val alone is one hospital's look). (Prefixes of cxr-ext's file names, see its README.)
HELDOUT_VAL_SOURCES = ("mhh", "openist", "kermanyvirus")
HELDOUT_TEST_SOURCES = ("ieee8023", "actualmed", "figure1", "shenzhen")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with CLI help text (``metadata['cli']=False`` keeps it off the command line)."""
    if isinstance(default, list | tuple):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class FitConfig:
    """The training loop of one network."""

    epochs: int = option(30, "maximum epochs")
    patience: int = option(6, "epochs without improvement of the monitored value before stopping")
    min_delta: float = option(1e-3, "smallest change of the monitored value that counts as improvement")
    batch_size: int = option(32, "images per optimiser step")
    lr: float | None = option(None, "learning rate (default: the architecture's own, see BACKBONES)")
    weight_decay: float = option(0.05, "AdamW decoupled weight decay")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing")
    monitor: str = option(
        "macro_f1", "early stopping on the selection split's macro_f1 (max) or loss (min)", choices=("macro_f1", "loss")
    )
    source_balance: float = option(
        0.5,
        "over-sampling within a class: 0 draws images of a class uniformly, 1 draws every source of the class "
        "equally often, 0.5 gives each source a share proportional to the square root of its size",
    )
    blank_lungs: float = option(
        0.0,
        "share of training images whose centre (0.45-0.75 of each side) is hidden and whose target is the uniform "
        "distribution: with the lungs gone there is no evidence, so borders and markers must not decide",
    )
    swap_borders: float = option(
        0.0,
        "share of training images that keep only their centre (0.5-0.75 of each side) and take their borders from "
        "another training image drawn at random, label unchanged: borders and markers then say nothing of the class",
    )
    seed: int = option(0, "seed of initialisation, sampling and augmentation")
    num_workers: int = option(-1, "data loader worker processes (-1: chosen from the CPU count)")
    precision: str = option(
        "auto",
        "training arithmetic: auto = bf16 autocast on CUDA and on CPUs with native bf16 (AVX-512 bf16/AMX), else fp32",
        choices=("auto", "fp32", "bf16"),
    )
    max_minutes: float | None = option(None, "training time budget per network (minutes); stops after that epoch")


@dataclass
class RunConfig:
    """A training run: one folder with every output, and what made it."""

    data: list[str] = option([], "dataset folder(s) (Kaggle or CLASS/*.png layout) or CSV manifest(s)", required=True)
    out: str = option("", "run folder; every output goes here", required=True)
    archs: list[str] = option(list(BACKBONES), "architectures to train", choices=tuple(BACKBONES))
    image_size: int = option(224, "network input side S")
    preprocessing: str = option(
        PREPROCESSING_ID,
        "preprocessing id written into the bundle (the CLAHE one equalises contrast)",
        choices=PREPROCESSING_IDS,
    )
    augmentation: str = option("shortcut-v2", "augmentation recipe", choices=tuple(RECIPES))
    weights: str = option("none", "initial weights: none | imagenet | PATH to a state dict")
    device: str = option("auto", "training device", choices=("auto", "cpu", "cuda"))
    val_fraction: float = option(0.15, "share of the training sources' images for in-distribution validation")
    test_fraction: float = option(0.15, "share of the training sources' images for the in-distribution test")
    heldout_val_sources: list[str] = option(
        list(HELDOUT_VAL_SOURCES), "held-out sources that drive early stopping, the winner and the temperature"
    )
    heldout_test_sources: list[str] = option(
        list(HELDOUT_TEST_SOURCES), "held-out sources, reported (see --operating-point-splits)"
    )
    keep_split: str | None = option(
        None, "an earlier split.csv: images it lists keep their split (e.g. to fine-tune a model it trained)"
    )
    head_c: float = option(
        0.03, "`head` stage: inverse L2 strength of the re-fitted final layer (standardised features)"
    )
    head_blank: float = option(
        1.0, "`head` stage: total weight of the blank-lungs counterfactuals (target uniform) against the images'"
    )
    head_passes: int = option(2, "`head` stage: augmented passes over the training images (each with blanked copies)")
    interpolate_alpha: float = option(
        0.5,
        "`interpolate` stage: weight of the fitted network against the one it started from (--weights, else the "
        "fit's own start): 0 gives the start back, 1 the fit",
    )
    positive_class: str = option("COVID", "the class triage looks for (its operating point and comparison column)")
    temperature_rule: str = option(
        "worst-source",
        "how the temperature is fitted on the selection split: NLL of the worst source, or of all images pooled",
        choices=("worst-source", "pooled"),
    )
    target_sensitivity: float = option(0.97, "sensitivity of the positive class that the operating point must reach")
    operating_point_splits: list[str] = option(
        ["heldout_val", "heldout_test"],
        "splits whose images set the operating point; its figures are estimated by leaving one source out at a time",
    )
    max_bundle_mb: float = option(100.0, "a network whose bundle would be larger is not shipped")
    winner_tolerance: float = option(0.005, "within this much of the best selection macro-F1 the smaller network wins")
    name: str = option("cxr-triage", "model name written into the card")
    model_version: str | None = option(
        None, "model version written into the card (default: one more than the bundle --weights comes from, else 1)"
    )
    fit: FitConfig = field(default_factory=FitConfig, metadata={"cli": False})
    command: str = field(default="", metadata={"cli": False})

    def lr_for(self, arch: str) -> float:
        return self.fit.lr if self.fit.lr is not None else BACKBONES[arch].lr
