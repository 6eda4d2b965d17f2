"""The training loop: over-sampled batches, AdamW + cosine schedule, early stopping, checkpoints, AMP on CUDA."""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from service.model.preprocess import PreprocessSpec, preprocess
from training.augment import augment
from training.sampler import balanced_sampler

logger = logging.getLogger(__name__)


class CachedImages(Dataset):
    """Cached uint8 S x S images -> (preprocessed 3 x S x S tensor, label), augmented when training."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, spec: PreprocessSpec, train: bool, seed: int = 0
    ):
        self.images, self.labels, self.spec, self.train, self.seed = images, labels, spec, train, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.train:
            # Seeded per (epoch, index) so a resumed run sees the same augmentations as an uninterrupted one.
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image = augment(self.images[index], rng)
        else:
            image = self.images[index].astype(np.float32) / 255.0
        return torch.from_numpy(preprocess(image, self.spec)[0]), int(self.labels[index])


@dataclass
class EarlyStopping:
    """Stop when the monitored metric has not improved by ``min_delta`` for ``patience`` epochs."""

    patience: int = 5
    min_delta: float = 1e-3
    mode: str = "max"  # "max" for macro-F1, "min" for a loss
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return (
            value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta
        )

    def step(self, value: float, epoch: int, model: nn.Module) -> bool:
        """Record an epoch's value; keep a copy of the best weights; return True when training should stop."""
        if self.improved(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "best_state"}


@dataclass
class FitConfig:
    epochs: int = 30
    patience: int = 6
    min_delta: float = 1e-3
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    seed: int = 0
    num_workers: int = 0
    monitor: str = "val_macro_f1"
    max_seconds: float | None = None  # wall-clock budget per network; stops after the epoch that crosses it


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device.")
    return torch.device(name)


@torch.no_grad()
def predict_logits(model: nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    """Logits (N x C) of a model over a non-shuffled loader."""
    model.eval()
    outputs = []
    for batch, _ in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs.append(model(batch.to(device, non_blocking=True)).float().cpu())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), np.float32)


def fit(
    model: nn.Module,
    train_set: CachedImages,
    val_set: CachedImages,
    config: FitConfig,
    device: torch.device,
    out_dir: Path,
    resume: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train with early stopping; restore the best weights; return a summary. Writes history.csv and
    checkpoint.pt (every epoch, for --resume) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model.to(device)
    loader_args: dict[str, Any] = {
        "batch_size": config.batch_size,
        "num_workers": config.num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": config.num_workers > 0,
    }
    train_loader = DataLoader(
        train_set,
        sampler=balanced_sampler(train_set.labels, config.seed),
        drop_last=len(train_set) > config.batch_size,
        **loader_args,
    )
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    stopper = EarlyStopping(config.patience, config.min_delta, "max")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    history: list[dict[str, float]] = []
    start_epoch = 0
    checkpoint_path = out_dir / "checkpoint.pt"
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        for key, value in state["early_stopping"].items():
            setattr(stopper, key, value)
        stopper.best_state = state["best_model"]
        start_epoch = state["epoch"] + 1
        logger.info("resumed %s at epoch %d", out_dir.name, start_epoch)
    stopped = stopper.bad_epochs >= stopper.patience
    out_of_time = False
    train_time = sum(h["seconds"] for h in history)
    for epoch in range(start_epoch, config.epochs):
        if stopped:
            break
        started = time.perf_counter()
        model.train()
        train_set.epoch = epoch
        total_loss, seen = 0.0, 0
        # One bar per epoch: running training loss, then the validation macro-F1 once it is known.
        bar = tqdm(
            total=len(train_loader),
            desc=f"{out_dir.name} epoch {epoch + 1}/{config.epochs}",
            dynamic_ncols=True,
            mininterval=2.0,
        )
        for batch, target in train_loader:
            batch, target = batch.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model(batch), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(target)
            seen += len(target)
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", refresh=False)
        scheduler.step()
        val_logits = predict_logits(model, val_loader, device)
        val_true = val_set.labels
        val_loss = float(loss_fn(torch.from_numpy(val_logits), torch.from_numpy(val_true).long()))
        val_f1 = float(f1_score(val_true, val_logits.argmax(1), average="macro"))
        bar.set_postfix(loss=f"{total_loss / max(seen, 1):.4f}", val_macro_f1=f"{val_f1:.4f}")
        bar.close()
        seconds = time.perf_counter() - started
        train_time += seconds
        row = {
            "epoch": epoch + 1,
            "train_loss": total_loss / max(seen, 1),
            "val_loss": val_loss,
            "val_macro_f1": val_f1,
            "val_accuracy": float((val_logits.argmax(1) == val_true).mean()),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": seconds,
        }
        history.append(row)
        stopped = stopper.step(val_f1, epoch + 1, model)
        out_of_time = config.max_seconds is not None and train_time >= config.max_seconds
        stopped = stopped or out_of_time
        logger.info(
            "%s epoch %d: train_loss %.4f val_loss %.4f val_macro_f1 %.4f (%.1fs)%s",
            out_dir.name,
            epoch + 1,
            row["train_loss"],
            val_loss,
            val_f1,
            seconds,
            " *" if stopper.best_epoch == epoch + 1 else "",
        )
        if on_epoch:
            on_epoch(row)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "epoch": epoch,
                "early_stopping": stopper.state(),
                "best_model": stopper.best_state,
            },
            checkpoint_path,
        )
        write_history(out_dir / "history.csv", history)
    stopper.restore(model)
    model.eval()
    return {
        "epochs_run": len(history),
        "best_epoch": stopper.best_epoch,
        "best_val_macro_f1": stopper.best,
        "monitor": config.monitor,
        "early_stopped": stopped and not out_of_time,
        "stopped_by_time_budget": out_of_time,
        "train_seconds": train_time,
        "seconds_per_epoch": train_time / max(len(history), 1),
        "history": history,
    }


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
