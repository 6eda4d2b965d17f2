"""The stages of a training run, each reading and writing files in one run folder.

explore  -> OUT/explore/class_counts.png, samples.png
split    -> OUT/split.csv (reused when present)
fit      -> OUT/<arch>/best.safetensors, history.csv, curves.png, fit.json, checkpoint.pt
evaluate -> OUT/<arch>/metrics.json, confusion_matrix.png, gradcam.png
compare  -> OUT/comparison.json, comparison.md (the winner and the rule that chose it)
export   -> OUT/bundle/ (the winner; card metrics re-scored through ONNX Runtime)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from service.model import backbones
from service.model.bundle import load_bundle, softmax, write_bundle, write_card
from service.model.preprocess import PreprocessSpec, preprocess
from service.predictor import Predictor
from training import evaluate as ev
from training.data import Sample, discover, load_images, resolve
from training.engine import CachedImages, FitConfig, fit, pick_device, predict_logits
from training.split import (
    SPLITS,
    duplicate_groups,
    read_split,
    split_hash,
    stratified_group_split,
    write_split,
)

logger = logging.getLogger(__name__)

ARCHS = ("vgg16", "resnet18", "densenet121")
# From random init VGG-16 (no batch norm) diverges at the learning rate that suits the two BN networks.
DEFAULT_LR = {"vgg16": 1e-4, "resnet18": 1e-3, "densenet121": 1e-3}
WINNER_RULE = (
    "highest validation macro-F1 at the best epoch (the test split plays no part); within 0.005 the smaller "
    "network wins; a network whose bundle would exceed max_bundle_mb is not shipped"
)


@dataclass
class RunConfig:
    data: str
    out: str
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    image_size: int = 224
    epochs: int = 30
    patience: int = 6
    min_delta: float = 1e-3
    batch_size: int = 32
    lr: float | None = None  # None: DEFAULT_LR per arch
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    weights: str = "none"
    device: str = "auto"
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    num_workers: int = -1  # -1: chosen from the CPU count
    max_bundle_mb: float = 100.0
    max_minutes: float | None = None  # per network, the same budget rule for every arch
    name: str = "cxr-triage"
    command: str = ""

    def lr_for(self, arch: str) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(arch, 1e-3)


class Run:
    """One run folder and its lazily loaded data. Every stage is a method; `cxr-train` calls them."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.out = Path(config.out)
        self.root = Path(config.data)
        self.out.mkdir(parents=True, exist_ok=True)
        self.spec = PreprocessSpec(config.image_size)
        self._decoded: dict[str, np.ndarray] = {}

    # ---- data -------------------------------------------------------------------------------------------
    @cached_property
    def samples(self) -> list[Sample]:
        return discover(self.root)

    @property
    def data_root(self) -> Path:
        """Folder that sample paths are relative to (a manifest's folder, or the dataset folder)."""
        return self.root.parent if self.root.is_file() else self.root

    @cached_property
    def manifest(self) -> tuple[list[Sample], list[str], np.ndarray]:
        path = self.out / "split.csv"
        if not path.is_file():
            self.split()
        return read_split(path)

    @cached_property
    def classes(self) -> list[str]:
        from service.model.labels import order_classes

        return order_classes([s.label for s in self.manifest[0]])

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Cached uint8 images, label indices and paths of one split; each split is decoded once, on first use."""
        samples, splits, _ = self.manifest
        index = [i for i, s in enumerate(splits) if s == split]
        if split not in self._decoded:
            started = time.perf_counter()
            self._decoded[split] = load_images(
                [resolve(self.data_root, samples[i].path) for i in index], self.config.image_size
            )
            logger.info(
                "decoded %d %s images in %.1fs (%.0f MB cache)",
                len(index),
                split,
                time.perf_counter() - started,
                self._decoded[split].nbytes / 1e6,
            )
        labels = np.array([self.classes.index(samples[i].label) for i in index], dtype=np.int64)
        return self._decoded[split], labels, [samples[i].path for i in index]

    def dataset(self, split: str, train: bool = False) -> CachedImages:
        images, labels, _ = self.subset(split)
        return CachedImages(images, labels, self.spec, train=train, seed=self.config.seed)

    def loader(self, split: str) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=64, shuffle=False, num_workers=self.num_workers)

    @property
    def num_workers(self) -> int:
        if self.config.num_workers >= 0:
            return self.config.num_workers
        cpus = os.cpu_count() or 1
        return 0 if cpus <= 2 else min(12, cpus - 2)

    # ---- stages -----------------------------------------------------------------------------------------
    def write_config(self) -> None:
        resolved = asdict(self.config) | {
            "lr_per_arch": {a: self.config.lr_for(a) for a in self.config.archs},
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "device_resolved": str(pick_device(self.config.device)),
            "num_workers_resolved": self.num_workers,
        }
        (self.out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")

    def explore(self) -> None:
        from training.explore import plot_class_counts, plot_samples

        folder = self.out / "explore"
        folder.mkdir(exist_ok=True)
        counts = Counter(s.label for s in self.samples)
        plot_class_counts(counts, folder / "class_counts.png")
        plot_samples(self.samples, self.data_root, folder / "samples.png", seed=self.config.seed)

    def split(self) -> Path:
        """Write OUT/split.csv unless it exists; an existing one is reused if it lists the same images."""
        path = self.out / "split.csv"
        samples = self.samples
        if path.is_file():
            existing = read_split(path)[0]
            if {s.path for s in existing} != {s.path for s in samples}:
                raise ValueError(f"{path} was made for a different set of images; move it away to re-split.")
            logger.info("reusing split %s", path)
            return path
        images = load_images([resolve(self.data_root, s.path) for s in samples], 64)
        groups = duplicate_groups(images)
        assignment = stratified_group_split(
            [s.label for s in samples],
            groups,
            self.config.val_fraction,
            self.config.test_fraction,
            self.config.seed,
        )
        write_split(path, samples, assignment, groups)
        logger.info(
            "split %d images into %s; %d duplicate groups of >1 image",
            len(samples),
            dict(Counter(assignment)),
            int(sum(c > 1 for c in Counter(groups).values())),
        )
        return path

    def split_summary(self) -> dict[str, Any]:
        samples, splits, _ = self.manifest
        counts = {
            s: dict(Counter(x.label for x, y in zip(samples, splits, strict=True) if y == s)) for s in SPLITS
        }
        return {
            "dataset": str(self.root),
            "counts": counts,
            "split_sha256": split_hash(self.out / "split.csv"),
        }

    def fit(self, arch: str, resume: bool = False) -> dict[str, Any]:
        folder = self.out / arch
        device = pick_device(self.config.device)
        model = backbones.build(arch, len(self.classes), self.config.weights)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        config = FitConfig(
            epochs=self.config.epochs,
            patience=self.config.patience,
            min_delta=self.config.min_delta,
            batch_size=self.config.batch_size,
            lr=self.config.lr_for(arch),
            weight_decay=self.config.weight_decay,
            label_smoothing=self.config.label_smoothing,
            seed=self.config.seed,
            num_workers=self.num_workers,
            max_seconds=self.config.max_minutes * 60 if self.config.max_minutes else None,
        )
        summary = fit(
            model,
            self.dataset("train", train=True),
            self.dataset("val"),
            config,
            device,
            folder,
            resume=resume,
        )
        model.cpu()
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "best.safetensors")
        )
        ev.plot_curves(summary["history"], folder / "curves.png", arch)
        summary |= {
            "arch": arch,
            "lr": config.lr,
            "batch_size": config.batch_size,
            "image_size": self.spec.size,
            "weights": self.config.weights,
            "device": str(device),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        (folder / "fit.json").write_text(
            json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2)
        )
        return summary

    def load_trained(self, arch: str) -> torch.nn.Module:
        weights = self.out / arch / "best.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: run `cxr-train fit` for {arch} first.")
        model = backbones.build(arch, len(self.classes))
        model.load_state_dict(load_file(str(weights)))
        return model.eval()

    def evaluate(self, arch: str) -> dict[str, Any]:
        folder = self.out / arch
        device = pick_device(self.config.device)
        model = self.load_trained(arch).to(device)
        images, y_true, _ = self.subset("test")
        logits = predict_logits(model, self.loader("test"), device)
        val_logits = predict_logits(model, self.loader("val"), device)
        temperature = ev.fit_temperature(val_logits, self.subset("val")[1])
        metrics = ev.classification_metrics(y_true, softmax(logits, temperature), self.classes)
        metrics |= {
            "arch": arch,
            "split": "test",
            "temperature": temperature,
            "scored_with": f"torch ({device})",
        }
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        ev.plot_confusion(metrics, folder / "confusion_matrix.png", f"{arch} — test split")
        self.gradcam_grid(model.cpu(), arch, images, y_true, logits, folder / "gradcam.png")
        return metrics

    def gradcam_grid(
        self,
        model: torch.nn.Module,
        arch: str,
        images: np.ndarray,
        y_true: np.ndarray,
        logits: np.ndarray,
        path: Path,
        per_class: int = 4,
    ) -> None:
        """Grad-CAM of the predicted class for ``per_class`` random test images of each true class."""
        from service.explain import gradcam_maps, overlay

        rng = np.random.default_rng(self.config.seed)
        chosen = [
            int(i)
            for k in range(len(self.classes))
            for i in rng.permutation(np.nonzero(y_true == k)[0])[:per_class]
        ]
        if not chosen:
            return
        batch = preprocess([images[i].astype(np.float32) / 255.0 for i in chosen], self.spec)
        predicted = [int(logits[i].argmax()) for i in chosen]
        maps = gradcam_maps(model, backbones.cam_layer(model, arch), batch, predicted)
        overlays = [
            overlay(images[i].astype(np.float32) / 255.0, m) for i, m in zip(chosen, maps, strict=True)
        ]
        titles = [
            f"true {self.classes[y_true[i]]} / pred {self.classes[p]}"
            for i, p in zip(chosen, predicted, strict=True)
        ]
        ev.plot_gradcam_grid(images[chosen], overlays, titles, path, columns=per_class)

    def compare(self) -> dict[str, Any]:
        rows = []
        for arch in self.config.archs:
            fit_summary = json.loads((self.out / arch / "fit.json").read_text())
            metrics = json.loads((self.out / arch / "metrics.json").read_text())
            bundle_mb = 2 * fit_summary["parameters"] * 4 / 1e6  # ONNX + safetensors, fp32
            rows.append(
                {
                    "arch": arch,
                    "val_macro_f1": fit_summary["best_val_macro_f1"],
                    "test_accuracy": metrics["accuracy"],
                    "test_macro_f1": metrics["macro_f1"],
                    "covid_recall": metrics["per_class"].get("COVID", {}).get("recall"),
                    "covid_specificity": metrics["per_class"].get("COVID", {}).get("specificity"),
                    "epochs_run": fit_summary["epochs_run"],
                    "best_epoch": fit_summary["best_epoch"],
                    "train_minutes": fit_summary["train_seconds"] / 60,
                    "seconds_per_epoch": fit_summary["seconds_per_epoch"],
                    "image_size": fit_summary["image_size"],
                    "weights": fit_summary["weights"],
                    "device": fit_summary["device"],
                    "parameters": fit_summary["parameters"],
                    "bundle_mb": bundle_mb,
                    "shippable": bundle_mb <= self.config.max_bundle_mb,
                }
            )
        ranked = sorted(rows, key=lambda r: (-round(r["val_macro_f1"] / 0.005), r["parameters"]))
        best_overall = ranked[0]["arch"]
        shippable = [r for r in ranked if r["shippable"]]
        winner = shippable[0]["arch"] if shippable else best_overall
        result = {
            "rule": WINNER_RULE,
            "max_bundle_mb": self.config.max_bundle_mb,
            "best_on_validation": best_overall,
            "winner": winner,
            "rows": rows,
            "split": self.split_summary(),
        }
        (self.out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
        (self.out / "comparison.md").write_text(comparison_markdown(result))
        return result

    def export(self, arch: str | None = None) -> Path:
        """Write the winner (or ``arch``) as OUT/bundle, verify it, and re-score the test split through ORT."""
        comparison_path = self.out / "comparison.json"
        comparison = json.loads(comparison_path.read_text()) if comparison_path.is_file() else None
        arch = arch or (comparison["winner"] if comparison else None)
        if arch is None:
            raise ValueError("No winner yet: run `cxr-train compare` first or pass --arch.")
        folder = self.out / arch
        fit_summary = json.loads((folder / "fit.json").read_text())
        torch_metrics = json.loads((folder / "metrics.json").read_text())
        report = [
            p
            for p in (
                folder / "confusion_matrix.png",
                folder / "curves.png",
                folder / "gradcam.png",
                folder / "history.csv",
                self.out / "comparison.md",
                self.out / "comparison.json",
                self.out / "explore" / "class_counts.png",
                self.out / "explore" / "samples.png",
            )
            if p.is_file()
        ]
        bundle_dir = self.out / "bundle"
        config_path = self.out / "config.json"
        trained_with = json.loads(config_path.read_text()) if config_path.is_file() else {}
        card = write_bundle(
            self.load_trained(arch),
            bundle_dir,
            name=self.config.name,
            arch=arch,
            classes=self.classes,
            input_size=self.spec.size,
            cam_layer=backbones.cam_layer_name(arch),
            temperature=torch_metrics["temperature"],
            report_files=report,
            training={
                "data": self.split_summary(),
                "imagenet_weights": self.config.weights == "imagenet",
                "weights_init": self.config.weights,
                "epochs_run": fit_summary["epochs_run"],
                "best_epoch": fit_summary["best_epoch"],
                "monitor": fit_summary["monitor"],
                "best_val_macro_f1": fit_summary["best_val_macro_f1"],
                "lr": fit_summary["lr"],
                "batch_size": fit_summary["batch_size"],
                "device": fit_summary["device"],
                "train_seconds": fit_summary["train_seconds"],
                "command": trained_with.get("command", self.config.command),
                "export_command": self.config.command,
                "torch": trained_with.get("torch", torch.__version__),
                "label_smoothing": trained_with.get("label_smoothing"),
                "weight_decay": trained_with.get("weight_decay"),
                "stopped_by_time_budget": fit_summary.get("stopped_by_time_budget", False),
                "max_minutes": trained_with.get("max_minutes"),
                "winner_rule": WINNER_RULE if comparison else "chosen by --arch",
            },
        )
        bundle = load_bundle(bundle_dir, providers=["CPUExecutionProvider"])  # checksums + ORT/torch parity
        # Re-score through the service's own predictor: the card's metrics come from the path that serves.
        predictor = Predictor(bundle, requested_providers=["CPUExecutionProvider"])
        images, y_true, _ = self.subset("test")
        probabilities = predictor.predict_arrays([image.astype(np.float32) / 255.0 for image in images])
        metrics = ev.classification_metrics(y_true, probabilities, self.classes)
        card.metrics = metrics | {
            "split": "test",
            "scored_with": "onnxruntime (CPUExecutionProvider)",
            "parity_max_abs_logit_diff": bundle.parity_max_abs_diff,
            "torch_accuracy": torch_metrics["accuracy"],
        }
        write_card(bundle_dir, card)
        logger.info(
            "exported %s to %s: ORT test accuracy %.4f macro-F1 %.4f (torch %.4f)",
            arch,
            bundle_dir,
            metrics["accuracy"],
            metrics["macro_f1"],
            torch_metrics["accuracy"],
        )
        return bundle_dir

    def run_all(self, resume: bool = False) -> Path:
        self.write_config()
        self.explore()
        self.split()
        for arch in self.config.archs:
            self.fit(arch, resume=resume)
            self.evaluate(arch)
        self.compare()
        return self.export()


def comparison_markdown(result: dict[str, Any]) -> str:
    lines = [
        "| arch | val macro-F1 | test accuracy | test macro-F1 | COVID recall | COVID specificity | epochs (best) "
        "| s/epoch | image size | init | device | bundle MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['arch']} | {r['val_macro_f1']:.4f} | {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} | "
            f"{r['covid_recall']:.4f} | {r['covid_specificity']:.4f} | {r['epochs_run']} ({r['best_epoch']}) | "
            f"{r['seconds_per_epoch']:.1f} | {r['image_size']} | {r['weights']} | {r['device']} | "
            f"{r['bundle_mb']:.0f} |"
        )
    lines += [
        "",
        f"Winner: **{result['winner']}** (best on validation: {result['best_on_validation']}).",
        f"Rule: {result['rule']} (max_bundle_mb = {result['max_bundle_mb']}).",
        "",
    ]
    return "\n".join(lines)
