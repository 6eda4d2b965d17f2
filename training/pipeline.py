"""The stages of a training run, each reading and writing files in one run folder.

explore   -> OUT/explore/class_counts.png, samples.png
split     -> OUT/split.csv (path, label, split, group, source; reused when present)
fit       -> OUT/<arch>/best.safetensors, checkpoint.pt, history.csv, curves.png, fit.json
head      -> (optional) OUT/<arch>/best.safetensors with a re-fitted final layer; fit_head.safetensors, head.json
interpolate -> (optional) OUT/<arch>/best.safetensors between the fit's start and the fit; fit_best.safetensors,
             interpolate.json
evaluate  -> OUT/<arch>/logits.npz (score), calibration.json (calibrate), metrics.json + plots (report),
             probes.json (shortcut probes)
compare   -> OUT/comparison.json, comparison.md (the winner and the rule that chose it)
export    -> OUT/bundle/ (the winner; card metrics re-scored through the service's own predictor)

Selection (early stopping, temperature, winner) uses the source-held-out validation split when the run has one,
else the in-distribution validation split. The operating point is chosen on both held-out splits
(``operating_point_splits``) and estimated by leaving one source out; the test splits are otherwise only reported.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from service.model import backbones
from service.model.bundle import MANIFEST_FILE, load_bundle, read_card, sha256_file, write_bundle, write_card
from service.model.decision import Decision
from service.model.labels import order_classes
from service.model.preprocess import PreprocessSpec, preprocess
from service.model.probabilities import softmax
from service.predictor import Predictor
from training import metrics as mt
from training import plots
from training.augment import recipe
from training.config import RunConfig
from training.data import Sample, data_root, discover_all, load_images, resolve
from training.engine import BEST_FILE, CachedImages, fit, pick_device, predict_logits, save_weights
from training.head import fit_head, head_data
from training.probes import shortcut_probes
from training.sampler import sampling_weights
from training.selection import WINNER_RULE, pick_winner
from training.split import (
    HELDOUT_SPLITS,
    SPLITS,
    assign_splits,
    duplicate_groups,
    kept_splits,
    read_split,
    split_hash,
    write_split,
)

logger = logging.getLogger(__name__)

REPORTED_SPLITS = ("test", "heldout_val", "heldout_test")
FIT_HEAD_FILE = "fit_head.safetensors"  # the final layer as the fit left it, before a `head` stage replaced it
FIT_WEIGHTS_FILE = "fit_best.safetensors"  # the fit's own weights, before an `interpolate` stage replaced them
PROBE_IMAGES = 300  # per probe pass; five passes over every held-out image cost more than the rest of evaluate


@dataclass(frozen=True)
class Subset:
    """One split, decoded: uint8 N x S x S images in the network's geometry, label indices, sources, paths."""

    images: np.ndarray
    labels: np.ndarray
    sources: list[str]
    paths: list[str]

    def arrays(self) -> list[np.ndarray]:
        """The images as 2-D float32 [0, 1] arrays (what the decoder gives the service)."""
        return [image.astype(np.float32) / 255.0 for image in self.images]


class Run:
    """One run folder and its lazily decoded data. Every stage is a method; `cxr-train` calls them."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.datasets = [Path(d) for d in config.data]
        self.spec = PreprocessSpec(config.image_size, preprocessing=config.preprocessing)
        self._decoded: dict[str, Subset] = {}

    # ---- data -------------------------------------------------------------------------------------------
    @property
    def split_path(self) -> Path:
        return self.out / "split.csv"

    @property
    def data_root(self) -> Path:
        return data_root(self.datasets)

    @cached_property
    def samples(self) -> list[Sample]:
        return discover_all(self.datasets)

    @cached_property
    def manifest(self) -> tuple[list[Sample], list[str], np.ndarray]:
        if not self.split_path.is_file():
            raise FileNotFoundError(f"{self.split_path} is missing: run `cxr-train split` first.")
        return read_split(self.split_path)

    @cached_property
    def classes(self) -> list[str]:
        return order_classes([s.label for s in self.manifest[0]])

    def has_split(self, split: str) -> bool:
        return split in self.manifest[1]

    @property
    def selection_split(self) -> str:
        """Where choices are made: whole sources the network never trained on, when the run has them."""
        return "heldout_val" if self.has_split("heldout_val") else "val"

    @property
    def positive_index(self) -> int | None:
        positive = self.config.positive_class
        return self.classes.index(positive) if positive in self.classes else None

    def subset(self, split: str) -> Subset:
        """One split, decoded once on first use."""
        if split not in self._decoded:
            samples, splits, _ = self.manifest
            index = [i for i, s in enumerate(splits) if s == split]
            started = time.perf_counter()
            images = load_images([resolve(self.data_root, samples[i].path) for i in index], self.spec.size)
            logger.info("decoded %d %s images in %.1fs", len(index), split, time.perf_counter() - started)
            self._decoded[split] = Subset(
                images,
                np.array([self.classes.index(samples[i].label) for i in index], dtype=np.int64),
                [samples[i].source for i in index],
                [samples[i].path for i in index],
            )
        return self._decoded[split]

    def dataset(self, split: str, augmentation: str | None = None) -> CachedImages:
        subset = self.subset(split)
        fit = self.config.fit  # CachedImages blanks only augmented images, so validation and test never are
        return CachedImages(
            subset.images, subset.labels, self.spec, augmentation, fit.seed, fit.blank_lungs, fit.swap_borders
        )

    def loader(self, split: str) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=64, shuffle=False, num_workers=self.num_workers)

    @property
    def num_workers(self) -> int:
        if self.config.fit.num_workers >= 0:
            return self.config.fit.num_workers
        cpus = os.cpu_count() or 1
        return 0 if cpus <= 2 else min(12, cpus - 2)

    # ---- stages -----------------------------------------------------------------------------------------
    def write_config(self) -> None:
        resolved = asdict(self.config) | {
            "lr_per_arch": {a: self.config.lr_for(a) for a in self.config.archs},
            "augmentation_ops": recipe(self.config.augmentation).describe(),
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
        plot_class_counts(Counter(s.label for s in self.samples), folder / "class_counts.png")
        plot_samples(self.samples, self.data_root, folder / "samples.png", seed=self.config.fit.seed)

    def split(self) -> Path:
        """Write OUT/split.csv unless it exists; an existing one is reused if it lists the same images."""
        samples = self.samples
        if self.split_path.is_file():
            existing = read_split(self.split_path)[0]
            if {s.path for s in existing} != {s.path for s in samples}:
                raise ValueError(f"{self.split_path} was made for a different set of images; move it away to re-split.")
            logger.info("reusing split %s", self.split_path)
            return self.split_path
        images = load_images([resolve(self.data_root, s.path) for s in samples], 64)
        groups = duplicate_groups(images)
        kept = kept_splits(samples, Path(self.config.keep_split)) if self.config.keep_split else None
        assignment = assign_splits(
            samples,
            groups,
            val_fraction=self.config.val_fraction,
            test_fraction=self.config.test_fraction,
            seed=self.config.fit.seed,
            heldout_val_sources=self.config.heldout_val_sources,
            heldout_test_sources=self.config.heldout_test_sources,
            kept=kept,
        )
        write_split(self.split_path, samples, assignment, groups)
        logger.info(
            "split %d images into %s (%d kept from %s); %d duplicate groups of >1 image",
            len(samples),
            dict(Counter(assignment)),
            len(kept or {}),
            self.config.keep_split,
            int(sum(c > 1 for c in Counter(groups).values())),
        )
        return self.split_path

    def split_summary(self) -> dict[str, Any]:
        """Images per split and label, per split and source, and the split file's hash (the card's data section)."""
        samples, splits, _ = self.manifest
        pairs = list(zip(samples, splits, strict=True))
        return {
            "datasets": [str(d) for d in self.datasets],
            "counts": {s: dict(Counter(x.label for x, y in pairs if y == s)) for s in SPLITS if s in splits},
            "sources": {s: dict(Counter(x.source for x, y in pairs if y == s)) for s in SPLITS if s in splits},
            "selection_split": self.selection_split,
            "heldout_val_sources": sorted({x.source for x, y in pairs if y == "heldout_val"}),
            "heldout_test_sources": sorted({x.source for x, y in pairs if y == "heldout_test"}),
            "split_sha256": split_hash(self.split_path),
        }

    def fit(self, arch: str, resume: bool = False) -> dict[str, Any]:
        folder = self.out / arch
        device = pick_device(self.config.device)
        model = backbones.build(arch, len(self.classes), self.config.weights)
        config = replace(self.config.fit, lr=self.config.lr_for(arch), num_workers=self.num_workers)
        train = self.subset("train")
        for stale in (FIT_HEAD_FILE, "head.json", FIT_WEIGHTS_FILE, "interpolate.json"):  # about an earlier fit
            (folder / stale).unlink(missing_ok=True)
        summary = fit(
            model,
            self.dataset("train", augmentation=self.config.augmentation),
            self.dataset(self.selection_split),
            config,
            device,
            folder,
            sample_weights=sampling_weights(train.labels, train.sources, config.source_balance),
            resume=resume,
        )
        plots.plot_curves(summary["history"], folder / "curves.png", f"{arch} (validation: {self.selection_split})")
        summary |= {
            "arch": arch,
            "selection_split": self.selection_split,
            "lr": config.lr,
            "batch_size": config.batch_size,
            "image_size": self.spec.size,
            "weights": self.config.weights,
            "augmentation": self.config.augmentation,
            "blank_lungs": config.blank_lungs,
            "swap_borders": config.swap_borders,
            "device": str(device),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        (folder / "fit.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
        return summary

    def load_trained(self, arch: str) -> torch.nn.Module:
        weights = self.out / arch / BEST_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: run `cxr-train fit` for {arch} first.")
        model = backbones.build(arch, len(self.classes))
        model.load_state_dict(load_file(str(weights)))
        return model.eval()

    def retrain_head(self, arch: str) -> dict[str, Any]:
        """Re-fit ``arch``'s final layer on its frozen features (``training.head``) into OUT/<arch>/best.safetensors.

        The fit's own layer is kept once in fit_head.safetensors and the settings in head.json. The result depends
        on the body only (features do not change with the head), so running it again gives the same layer. Run
        ``evaluate`` after it: the temperature, threshold and probes belong to the new layer."""
        folder = self.out / arch
        model = self.load_trained(arch)
        head = model.get_submodule(backbones.BACKBONES[arch].head)
        assert isinstance(head, torch.nn.Linear)  # backbones.build gives every arch a Linear head
        if not (folder / FIT_HEAD_FILE).is_file():
            save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(folder / FIT_HEAD_FILE))
        train = self.subset("train")
        config = self.config
        started = time.perf_counter()
        data = head_data(
            model,
            arch,
            train.images,
            train.labels,
            sampling_weights(train.labels, train.sources, config.fit.source_balance),
            self.spec,
            recipe=config.augmentation,
            seed=config.fit.seed,
            passes=config.head_passes,
        )
        weight, bias = fit_head(data, len(self.classes), c=config.head_c, blank_weight=config.head_blank)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(weight))
            head.bias.copy_(torch.from_numpy(bias))
        save_weights(model, folder / BEST_FILE)
        summary = {
            "method": "dfr-blank-lungs-v1",
            "c": config.head_c,
            "blank_weight": config.head_blank,
            "passes": config.head_passes,
            "augmentation": config.augmentation,
            "source_balance": config.fit.source_balance,
            "seed": config.fit.seed,
            "n_images": len(data.labels),
            "n_blanked": len(data.blanked),
            "seconds": round(time.perf_counter() - started, 1),
            "command": config.command,
        }
        (folder / "head.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def interpolate(self, arch: str) -> dict[str, Any]:
        """Weight-space ensembling (WiSE-FT, Wortsman et al. 2022) into OUT/<arch>/best.safetensors: every float
        tensor becomes (1 - alpha) x the start + alpha x the fit, with the start the --weights file (else the one
        fit.json names). A fine-tune from the start stays in its basin, so the line between them holds networks
        that keep some of what the start knew about sources the fine-tune's data pulls away from.

        The fit's own weights are kept once in fit_best.safetensors and every call mixes from them, so the stage
        can be re-run with another alpha; the settings go to interpolate.json. Run ``evaluate`` after it."""
        folder = self.out / arch
        fitted_file = folder / FIT_WEIGHTS_FILE
        if not fitted_file.is_file():
            if not (folder / BEST_FILE).is_file():
                raise FileNotFoundError(f"{folder / BEST_FILE} is missing: run `cxr-train fit` for {arch} first.")
            fitted_file.write_bytes((folder / BEST_FILE).read_bytes())
        start_path = self.config.weights
        if start_path == "none" and (fit_json := folder / "fit.json").is_file():
            start_path = json.loads(fit_json.read_text()).get("weights", "none")
        if start_path in ("none", "imagenet") or not Path(start_path).is_file():
            raise ValueError(f"interpolate needs the weights the fit of {arch} started from: pass --weights PATH.")
        alpha = self.config.interpolate_alpha
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--interpolate-alpha must be in [0, 1], got {alpha}.")
        start = backbones.load_state_dict_file(Path(start_path))
        fitted = load_file(str(fitted_file))
        if {k: v.shape for k, v in start.items()} != {k: v.shape for k, v in fitted.items()}:
            raise ValueError(f"{start_path} is not the same network as {arch}'s fit (its tensors differ).")
        mixed = {
            # Integer buffers (BatchNorm's step counts) are the fit's; running means and variances mix like weights.
            name: torch.lerp(start[name].float(), tensor.float(), alpha).to(tensor.dtype)
            if tensor.is_floating_point()
            else tensor
            for name, tensor in fitted.items()
        }
        save_file({k: v.contiguous() for k, v in mixed.items()}, str(folder / BEST_FILE))
        summary = {
            "method": "wise-ft-v1",
            "alpha": alpha,
            "start": str(start_path),
            "start_sha256": sha256_file(Path(start_path)),
            "fitted_sha256": sha256_file(fitted_file),
            "command": self.config.command,
        }
        (folder / "interpolate.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    # ---- evaluate: score -> calibrate -> report -> probes ----------------------------------------------
    def reported_splits(self) -> list[str]:
        """The scored splits: the selection split and the test splits (not train)."""
        return [s for s in dict.fromkeys((self.selection_split, *REPORTED_SPLITS)) if self.has_split(s)]

    def score(self, arch: str, model: torch.nn.Module) -> dict[str, np.ndarray]:
        """Logits of every reported split (torch), kept in OUT/<arch>/logits.npz."""
        device = pick_device(self.config.device)
        model = model.to(device)
        logits = {split: predict_logits(model, self.loader(split), device) for split in self.reported_splits()}
        np.savez_compressed(self.out / arch / "logits.npz", **logits)  # type: ignore[arg-type]
        return logits

    def calibrate(self, arch: str, logits: dict[str, np.ndarray]) -> dict[str, Any]:
        """Temperature (validation NLL, by ``temperature_rule``) on the selection split, then the positive class's
        operating point on the ``operating_point_splits`` there are (the selection split when none)."""
        split = self.selection_split
        subset = self.subset(split)
        rule = self.config.temperature_rule
        by_source = subset.sources if rule == "worst-source" else None
        temperature = mt.fit_temperature(logits[split], subset.labels, by_source)
        calibration: dict[str, Any] = {"fitted_on": split, "rule": rule, "temperature": temperature, "decision": None}
        positive = self.positive_index
        if positive is not None:
            chosen_on = [s for s in self.config.operating_point_splits if s in logits] or [split]
            calibration["decision"] = mt.operating_point_decision(
                self.config.positive_class,
                positive,
                {
                    s: (self.subset(s).labels, softmax(logits[s], temperature), self.subset(s).sources)
                    for s in chosen_on
                },
                self.config.target_sensitivity,
            )
        (self.out / arch / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
        return calibration

    def split_metrics(self, split: str, probabilities: np.ndarray, calibration: dict[str, Any]) -> dict[str, Any]:
        """Argmax metrics, per-source metrics, calibration and the operating point's figures of one split."""
        subset = self.subset(split)
        result = mt.classification_metrics(subset.labels, probabilities, self.classes)
        result["per_source"] = mt.per_source_metrics(subset.labels, probabilities, subset.sources, self.classes)
        result["calibration"] = mt.calibration_metrics(subset.labels, probabilities)
        decision, positive = calibration["decision"], self.positive_index
        if decision is not None and positive is not None:
            decided = mt.decided_labels(probabilities, positive, decision["threshold"])
            at_point = mt.classification_metrics(subset.labels, np.eye(len(self.classes))[decided], self.classes)
            result["at_operating_point"] = mt.threshold_metrics(
                subset.labels == positive, probabilities[:, positive], decision["threshold"]
            ) | {"accuracy": at_point["accuracy"], "macro_f1": at_point["macro_f1"]}
        return result

    def report(self, arch: str, logits: dict[str, np.ndarray], calibration: dict[str, Any]) -> dict[str, Any]:
        folder = self.out / arch
        temperature = calibration["temperature"]
        by_split = {s: self.split_metrics(s, softmax(v, temperature), calibration) for s, v in logits.items()}
        for split in ("test", "heldout_val", "heldout_test"):
            if split in by_split:
                plots.plot_confusion(by_split[split], folder / f"confusion_{split}.png", f"{arch} — {split}")
        if "test" in by_split:
            plots.plot_confusion(by_split["test"], folder / "confusion_matrix.png", f"{arch} — test split")
        per_source = {
            f"{split}: {source}": figures
            for split, m in by_split.items()
            if split != "val"
            for source, figures in m["per_source"].items()
        }
        plots.plot_source_confusions(per_source, self.classes, folder / "confusion_per_source.png", arch)
        plots.plot_reliability(
            {s: m["calibration"] for s, m in by_split.items() if s != "val"}, folder / "reliability.png"
        )
        return {"arch": arch, "temperature": temperature, "calibration": calibration, "splits": by_split}

    def heldout_subset(self) -> Subset | None:
        """Every image of the held-out sources (both held-out splits), for probes and Grad-CAM grids."""
        parts = [self.subset(s) for s in HELDOUT_SPLITS if self.has_split(s)]
        if not parts:
            return None
        return Subset(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]),
            [s for p in parts for s in p.sources],
            [s for p in parts for s in p.paths],
        )

    def probe(self, model: torch.nn.Module, temperature: float) -> dict[str, Any] | None:
        """Shortcut probes on the held-out sources (the in-distribution test split when there are none)."""
        heldout = self.heldout_subset()
        subset = heldout or self.subset("test")
        if self.positive_index is None:
            return None
        if len(subset.labels) > PROBE_IMAGES:  # a seeded random sample, the same for every arch of the run
            keep = np.sort(np.random.default_rng(self.config.fit.seed).permutation(len(subset.labels))[:PROBE_IMAGES])
            subset = Subset(
                subset.images[keep],
                subset.labels[keep],
                [subset.sources[i] for i in keep],
                [subset.paths[i] for i in keep],
            )
        model = model.cpu().eval()

        def scorer(images: Sequence[np.ndarray]) -> np.ndarray:
            rows = []
            with torch.no_grad():
                for start in range(0, len(images), 64):
                    batch = torch.from_numpy(preprocess(list(images[start : start + 64]), self.spec))
                    rows.append(softmax(model(batch).numpy(), temperature))
            return np.concatenate(rows)

        probes = shortcut_probes(scorer, subset.arrays(), subset.labels, self.positive_index, len(self.classes))
        images = "held-out sources" if heldout is not None else "test split"
        return probes | {"positive_class": self.config.positive_class, "images": images}

    def evaluate(self, arch: str) -> dict[str, Any]:
        folder = self.out / arch
        model = self.load_trained(arch)
        logits = self.score(arch, model)
        calibration = self.calibrate(arch, logits)
        metrics = self.report(arch, logits, calibration)
        metrics["probes"] = self.probe(model, calibration["temperature"])
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        grid = self.heldout_subset() or self.subset("test")
        self.gradcam_grid(model.cpu(), arch, grid, folder / "gradcam.png")
        return metrics

    def gradcam_grid(self, model: torch.nn.Module, arch: str, subset: Subset, path: Path, per_class: int = 4) -> None:
        """Grad-CAM of the predicted class for ``per_class`` random images of each true class."""
        from service.gradcam import gradcam_maps, overlay

        rng = np.random.default_rng(self.config.fit.seed)
        chosen = [
            int(i)
            for k in range(len(self.classes))
            for i in rng.permutation(np.nonzero(subset.labels == k)[0])[:per_class]
        ]
        if not chosen:
            return
        arrays = [subset.images[i].astype(np.float32) / 255.0 for i in chosen]
        batch = preprocess(arrays, self.spec)
        with torch.no_grad():
            predicted = model(torch.from_numpy(batch)).argmax(1).tolist()
        maps = gradcam_maps(model, backbones.cam_layer(model, arch), batch, predicted)
        overlays = [overlay(a, m) for a, m in zip(arrays, maps, strict=True)]
        titles = [
            f"{subset.sources[i]}: true {self.classes[subset.labels[i]]} / pred {self.classes[p]}"
            for i, p in zip(chosen, predicted, strict=True)
        ]
        plots.plot_gradcam_grid(subset.images[chosen], overlays, titles, path, columns=per_class)

    # ---- compare and export -----------------------------------------------------------------------------
    def comparison_row(self, arch: str) -> dict[str, Any]:
        fit_summary = json.loads((self.out / arch / "fit.json").read_text())
        metrics = json.loads((self.out / arch / "metrics.json").read_text())
        splits = metrics["splits"]
        selection = splits[fit_summary.get("selection_split", self.selection_split)]
        positive = self.config.positive_class

        def figure(split: str, *keys: str) -> Any:
            value: Any = splits.get(split)
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            return value

        bundle_mb = 2 * fit_summary["parameters"] * 4 / 1e6  # ONNX + safetensors, fp32
        probes = metrics.get("probes") or {}
        return {
            "arch": arch,
            "selection_split": fit_summary.get("selection_split", self.selection_split),
            "selection_macro_f1": selection["macro_f1"],
            "test_accuracy": figure("test", "accuracy"),
            "test_macro_f1": figure("test", "macro_f1"),
            "heldout_test_macro_f1": figure("heldout_test", "macro_f1"),
            "heldout_test_accuracy": figure("heldout_test", "accuracy"),
            "positive_class": positive,
            "positive_recall": figure("test", "per_class", positive, "recall"),
            "positive_specificity": figure("test", "per_class", positive, "specificity"),
            "heldout_test_sensitivity_at_point": figure("heldout_test", "at_operating_point", "sensitivity"),
            "heldout_test_specificity_at_point": figure("heldout_test", "at_operating_point", "specificity"),
            "borders_only_auc": (probes.get("borders_only") or {}).get("positive_vs_rest_auc"),
            "epochs_run": fit_summary["epochs_run"],
            "best_epoch": fit_summary["best_epoch"],
            "train_minutes": fit_summary["train_seconds"] / 60,
            "seconds_per_epoch": fit_summary["seconds_per_epoch"],
            "image_size": fit_summary["image_size"],
            "weights": fit_summary["weights"],
            "augmentation": fit_summary.get("augmentation"),
            "device": fit_summary["device"],
            "parameters": fit_summary["parameters"],
            "bundle_mb": bundle_mb,
            "shippable": bundle_mb <= self.config.max_bundle_mb,
        }

    def compare(self) -> dict[str, Any]:
        rows = [self.comparison_row(arch) for arch in self.config.archs]
        winner = pick_winner(rows, tolerance=self.config.winner_tolerance, max_bundle_mb=self.config.max_bundle_mb)
        result = {
            "rule": WINNER_RULE.format(tolerance=self.config.winner_tolerance, max_bundle_mb=self.config.max_bundle_mb),
            "winner": winner,
            "best_on_selection": max(rows, key=lambda r: r["selection_macro_f1"])["arch"] if rows else None,
            "rows": rows,
            "split": self.split_summary(),
        }
        (self.out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
        (self.out / "comparison.md").write_text(comparison_markdown(result))
        return result

    def provenance(self, arch: str, winner_rule: str) -> dict[str, Any]:
        """The card's training section: data, initialisation, loop settings and the commands that made it."""
        fit_summary = json.loads((self.out / arch / "fit.json").read_text())
        config_path = self.out / "config.json"
        trained_with = json.loads(config_path.read_text()) if config_path.is_file() else {}
        keys = (
            "epochs_run",
            "best_epoch",
            "monitor",
            "best_monitored",
            "lr",
            "batch_size",
            "device",
            "train_seconds",
            "stopped_by_time_budget",
            "augmentation",
            "selection_split",
        )
        return {
            "data": self.split_summary(),
            "imagenet_weights": self.config.weights == "imagenet",
            "weights_init": self.config.weights,
            **{k: fit_summary.get(k) for k in keys},
            "fit": trained_with.get("fit"),
            "augmentation_ops": trained_with.get("augmentation_ops"),
            "command": trained_with.get("command", self.config.command),
            "export_command": self.config.command,
            "torch": trained_with.get("torch", torch.__version__),
            "winner_rule": winner_rule,
            "initialised_from": self.initial_bundle(),
            "head": json.loads(head.read_text()) if (head := self.out / arch / "head.json").is_file() else None,
            "interpolation": json.loads(mix.read_text())
            if (mix := self.out / arch / "interpolate.json").is_file()
            else None,
        }

    def initial_bundle(self) -> dict[str, Any] | None:
        """Lineage when ``--weights`` is a bundle's weights file: that bundle's identity and its training stages."""
        card_path = Path(self.config.weights).parent / "card.json"
        if self.config.weights in ("none", "imagenet") or not card_path.is_file():
            return None
        card = json.loads(card_path.read_text())
        manifest = card_path.parent / MANIFEST_FILE
        earlier = card.get("training") or {}
        stages = earlier.get("stages") or [{k: earlier.get(k) for k in ("command", "device", "epochs_run")}]
        if earlier.get("initialised_from"):
            stages = earlier["initialised_from"]["stages"] + stages
        return {
            "name": card.get("name"),
            "version": card.get("version"),
            "bundle_sha256": sha256_file(manifest) if manifest.is_file() else None,
            "stages": stages,
        }

    def model_version(self) -> str:
        """--model-version, else one more than the (integer) version of the bundle this run started from, else 1."""
        if self.config.model_version:
            return self.config.model_version
        earlier = str((self.initial_bundle() or {}).get("version"))
        return str(int(earlier) + 1) if earlier.isdigit() else "1"

    def report_files(self, arch: str) -> list[Path]:
        folder = self.out / arch
        names = [
            folder / n
            for n in (
                "confusion_matrix.png",
                "confusion_heldout_val.png",
                "confusion_heldout_test.png",
                "confusion_per_source.png",
                "reliability.png",
                "curves.png",
                "gradcam.png",
                "history.csv",
            )
        ]
        names += [self.out / n for n in ("comparison.md", "comparison.json", "split.csv")]
        names += [self.out / "explore" / n for n in ("class_counts.png", "samples.png")]
        return [p for p in names if p.is_file()]

    def export(self, arch: str | None = None) -> Path:
        """Write the winner (or ``arch``) as OUT/bundle, verify it, and re-score every reported split through the
        service's predictor (ONNX Runtime): the card's figures come from the path that serves."""
        comparison_path = self.out / "comparison.json"
        comparison = json.loads(comparison_path.read_text()) if comparison_path.is_file() else None
        arch = arch or (comparison["winner"] if comparison else None)
        if arch is None:
            raise ValueError("No shippable winner: run `cxr-train compare` first, or pass --arch.")
        torch_metrics = json.loads((self.out / arch / "metrics.json").read_text())
        calibration = torch_metrics["calibration"]
        bundle_dir = self.out / "bundle"
        write_bundle(
            self.load_trained(arch),
            bundle_dir,
            name=self.config.name,
            version=self.model_version(),
            arch=arch,
            classes=self.classes,
            spec=self.spec,
            cam_layer=backbones.cam_layer_name(arch),
            temperature=calibration["temperature"],
            decision=Decision.model_validate(calibration["decision"]) if calibration["decision"] else None,
            report_files=self.report_files(arch),
            training=self.provenance(arch, comparison["rule"] if comparison else "chosen by --arch"),
            probes=torch_metrics.get("probes"),
            sources=self.split_summary()["sources"],
        )
        self.fit_gate(bundle_dir)
        bundle = load_bundle(bundle_dir, providers=["CPUExecutionProvider"])  # checksums, gate, ORT/torch parity
        card = bundle.card
        predictor = Predictor(bundle, requested_providers=["CPUExecutionProvider"])
        by_split = {
            split: self.split_metrics(split, predictor.predict_arrays(self.subset(split).arrays()), calibration)
            for split in self.reported_splits()
        }
        headline = "heldout_test" if "heldout_test" in by_split else "test"
        card.metrics = by_split.get("test", {}) | {
            "split": "test",
            "scored_with": "onnxruntime (CPUExecutionProvider)",
            "parity_max_abs_logit_diff": bundle.parity_max_abs_diff,
            "torch_accuracy": torch_metrics["splits"].get("test", {}).get("accuracy"),
            "headline_split": headline,
            "by_split": {s: m for s, m in by_split.items() if s != "test"},
        }
        card.calibration = {
            "temperature": calibration["temperature"],
            "fitted_on": calibration["fitted_on"],
            "rule": calibration.get("rule", "pooled"),  # runs evaluated before the rule existed were pooled
            **{f"{s}_{k}": m["calibration"][k] for s, m in by_split.items() for k in ("ece", "brier")},
        }
        digest = write_card(bundle_dir, card)  # the card, then manifest.json over every file: the last write
        logger.info(
            "exported %s to %s (bundle sha256 %s): ORT %s macro-F1 %.4f, test accuracy %.4f (torch %.4f)",
            arch,
            bundle_dir,
            digest,
            headline,
            by_split[headline]["macro_f1"],
            by_split.get("test", {}).get("accuracy", float("nan")),
            card.metrics["torch_accuracy"] or float("nan"),
        )
        return bundle_dir

    def quantize(self) -> Path:
        """OUT/bundle-int8: OUT/bundle quantised to int8 (training.quantize), calibrated on training images and
        compared with fp32 on the test and held-out test splits; QuantizationRefused (a ValueError) if it loses
        more than a point of macro-F1 on either."""
        from training.quantize import EVALUATED_SPLITS, LabelledImages, calibration_sample, quantize_bundle

        evaluation = {
            split: LabelledImages(subset.arrays(), subset.labels, subset.sources)
            for split in EVALUATED_SPLITS
            if self.has_split(split)
            for subset in [self.subset(split)]
        }
        out = self.out / "bundle-int8"
        calibration = calibration_sample(self.subset("train").images, seed=self.config.fit.seed)
        quantize_bundle(self.out / "bundle", out, calibration, evaluation)
        return out

    @property
    def gate_calibration_splits(self) -> list[str]:
        return [s for s in dict.fromkeys(("val", self.selection_split)) if self.has_split(s)]

    def check_gate_calibration(self) -> None:
        """Fail right after the split, not after hours of training, when export could not fit the gate."""
        from service.model.gate import MIN_CALIBRATION_IMAGES

        splits = self.manifest[1]
        count = sum(splits.count(s) for s in self.gate_calibration_splits)
        if count < MIN_CALIBRATION_IMAGES:
            raise ValueError(
                f"The validation splits ({', '.join(self.gate_calibration_splits)}) hold {count} images; the "
                f"chest X-ray gate needs at least {MIN_CALIBRATION_IMAGES} to set its threshold. Add images or "
                "raise --val-fraction."
            )

    def fit_gate(self, bundle_dir: Path) -> dict[str, Any]:
        """The chest X-ray gate: fitted on training images, its threshold set on the validation splits (in-
        distribution and, when there is one, source-held-out) so that 99 % of the real X-rays of each of their sources
        pass."""
        from training.gate import fit_bundle_gate

        size = read_card(bundle_dir).input_size
        if size != self.spec.size:  # the decoded splits are in the run's geometry, which must be the bundle's
            raise ValueError(
                f"The bundle takes {size} px images and this run {self.spec.size}: pass --image-size {size}."
            )
        train = self.subset("train")
        calibration = [self.subset(s) for s in self.gate_calibration_splits]
        return fit_bundle_gate(
            bundle_dir,
            train.arrays(),
            [image for part in calibration for image in part.arrays()],
            seed=self.config.fit.seed,
            fit_labels=train.labels,
            calibration_sources=[source for part in calibration for source in part.sources],
        )

    def run_all(self, resume: bool = False) -> Path:
        self.write_config()
        self.explore()
        self.split()
        self.check_gate_calibration()
        for arch in self.config.archs:
            self.fit(arch, resume=resume)
            self.evaluate(arch)
        self.compare()
        return self.export()


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def comparison_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    positive = rows[0]["positive_class"] if rows else "positive"
    lines = [
        f"| arch | selection macro-F1 | held-out test macro-F1 | test accuracy | test macro-F1 | {positive} recall "
        f"| {positive} specificity | borders-only AUC | epochs (best) | s/epoch | image size | init | device "
        "| bundle MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {_f(r['selection_macro_f1'])} | {_f(r['heldout_test_macro_f1'])} | "
            f"{_f(r['test_accuracy'])} | {_f(r['test_macro_f1'])} | {_f(r['positive_recall'])} | "
            f"{_f(r['positive_specificity'])} | {_f(r['borders_only_auc'])} | {r['epochs_run']} ({r['best_epoch']}) | "
            f"{r['seconds_per_epoch']:.1f} | {r['image_size']} | {r['weights']} | {r['device']} | "
            f"{r['bundle_mb']:.0f} |"
        )
    lines += [
        "",
        f"Winner: **{result['winner']}** (best on the selection split: {result['best_on_selection']}).",
        f"Rule: {result['rule']}.",
        "",
    ]
    return "\n".join(lines)
