"""Wall time of one training epoch per architecture on this machine, at the default image size.

    .venv/bin/python tests/bench/bench_train_epoch.py --data ../shared/data/cxr-dev [--steps 3] [--size 224]
        [--precisions fp32,bf16]

Times ``--steps + 1`` optimiser steps of the real ``train_one_epoch`` (after a one-step warm-up) — cached
images, augmentation, preprocessing, over-sampling, forward/backward, AdamW, channels-last as ``fit`` runs it —
in each precision, and extrapolates to one epoch over the training split (70 % of the data). Run on demand;
prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from service.model import backbones  # noqa: E402
from service.model.labels import order_classes  # noqa: E402
from service.model.preprocess import PreprocessSpec  # noqa: E402
from training.data import discover, load_images, resolve  # noqa: E402
from training.engine import CachedImages, EpochSampler, train_one_epoch  # noqa: E402
from training.sampler import sampling_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--archs", default="resnet18,densenet121,vgg16")
    parser.add_argument("--augmentation", default="shortcut-v2")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    args = parser.parse_args()

    samples = discover(Path(args.data))
    torch.manual_seed(0)
    classes = order_classes([s.label for s in samples])
    epoch_images = round(0.7 * len(samples))
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(samples), size=args.batch_size * (args.steps + 1), replace=False)
    images = load_images([resolve(Path(args.data), samples[i].path) for i in chosen], args.size)
    labels = np.array([classes.index(samples[i].label) for i in chosen])
    dataset = CachedImages(images, labels, PreprocessSpec(args.size), augmentation=args.augmentation)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, image size {args.size}, "
        f"batch {args.batch_size}, epoch = {epoch_images} images ({args.data})"
    )
    print(f"{'arch':<14}{'precision':>10}{'s/step':>9}{'img/s':>8}{'s/epoch (extrapolated)':>25}")
    for arch, precision in [(a, p) for a in args.archs.split(",") for p in args.precisions.split(",")]:
        model = backbones.build(arch, len(classes)).train().to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        loader = DataLoader(
            dataset, batch_size=args.batch_size, sampler=EpochSampler(sampling_weights(labels), 0), drop_last=True
        )
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
        # The real loop: one warm-up epoch of a single step pays one-off allocation costs, then the timed epoch.
        warm = DataLoader(
            dataset, batch_size=args.batch_size, sampler=EpochSampler(sampling_weights(labels), 1, args.batch_size)
        )
        train_one_epoch(model, warm, optimizer, loss_fn, torch.device("cpu"), f"{arch} warm-up", precision)
        started = time.perf_counter()
        train_one_epoch(model, loader, optimizer, loss_fn, torch.device("cpu"), arch, precision)
        times = [(time.perf_counter() - started) / len(loader)]
        per_step = float(np.median(times))
        per_epoch = per_step * epoch_images / args.batch_size
        print(f"{arch:<14}{precision:>10}{per_step:>9.2f}{args.batch_size / per_step:>8.1f}{per_epoch:>25.0f}")


if __name__ == "__main__":
    main()
