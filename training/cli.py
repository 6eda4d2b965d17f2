"""`cxr-train`: the whole run, or one stage at a time, over one run folder."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence

from training.pipeline import ARCHS, Run, RunConfig


def _archs(value: str) -> list[str]:
    archs = [a.strip() for a in value.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        raise argparse.ArgumentTypeError(f"unknown architecture(s) {unknown}; choose from {','.join(ARCHS)}")
    return archs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-train",
        description=(
            "Train VGG-16 / ResNet-18 / DenseNet-121 on labelled chest X-rays, compare them and export the winner "
            "as a model bundle. Research use only."
        ),
    )
    sub = parser.add_subparsers(dest="stage", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data", required=True, help="dataset folder (Kaggle or CLASS/*.png layout) or CSV manifest"
    )
    common.add_argument("--out", required=True, help="run folder; every output goes here")
    common.add_argument(
        "--archs", type=_archs, default=list(ARCHS), help="comma-separated (default: all three)"
    )
    common.add_argument("--image-size", type=int, default=224)
    common.add_argument("--epochs", type=int, default=30)
    common.add_argument(
        "--patience", type=int, default=6, help="epochs without val macro-F1 gain before stopping"
    )
    common.add_argument("--min-delta", type=float, default=1e-3)
    common.add_argument("--batch-size", type=int, default=32)
    common.add_argument("--lr", type=float, default=None, help="default: 1e-4 for vgg16, 1e-3 for the others")
    common.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decoupled weight decay")
    common.add_argument("--label-smoothing", type=float, default=0.1)
    common.add_argument("--weights", default="none", help="none | imagenet | PATH to a state dict")
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--num-workers", type=int, default=-1, help="data loader workers (-1: by CPU count)")
    common.add_argument("--max-bundle-mb", type=float, default=100.0)
    common.add_argument("--max-minutes", type=float, default=None, help="training time budget per network")
    common.add_argument("--name", default="cxr-triage", help="model name written into the card")
    common.add_argument("--log-level", default="INFO")
    run = sub.add_parser(
        "run", parents=[common], help="every stage: explore, split, fit, evaluate, compare, export"
    )
    run.add_argument("--resume", action="store_true", help="continue each arch from its last checkpoint")
    sub.add_parser("explore", parents=[common], help="class counts and sample grid")
    sub.add_parser("split", parents=[common], help="write (or reuse) split.csv")
    fit = sub.add_parser("fit", parents=[common], help="train the --archs")
    fit.add_argument("--resume", action="store_true")
    sub.add_parser(
        "evaluate", parents=[common], help="test-split metrics, plots and Grad-CAM for the --archs"
    )
    sub.add_parser("compare", parents=[common], help="comparison table and winner")
    export = sub.add_parser("export", parents=[common], help="export the winner (or --arch) as OUT/bundle")
    export.add_argument("--arch", choices=ARCHS, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # the job only writes plot files; never open a window
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for chatty in (
        "onnxscript",
        "onnx_ir",
        "matplotlib",
        "PIL",
    ):  # exporter/plotting internals, not our progress
        logging.getLogger(chatty).setLevel(logging.WARNING)
    command = "cxr-train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    config = RunConfig(
        data=args.data,
        out=args.out,
        archs=args.archs,
        image_size=args.image_size,
        epochs=args.epochs,
        patience=args.patience,
        min_delta=args.min_delta,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        weights=args.weights,
        device=args.device,
        seed=args.seed,
        num_workers=args.num_workers,
        max_bundle_mb=args.max_bundle_mb,
        max_minutes=args.max_minutes,
        name=args.name,
        command=command,
    )
    run = Run(config)
    try:
        if args.stage == "run":
            print(run.run_all(resume=args.resume))
        elif args.stage == "explore":
            run.explore()
        elif args.stage == "split":
            print(run.split())
        elif args.stage == "fit":
            run.write_config()
            for arch in config.archs:
                run.fit(arch, resume=args.resume)
        elif args.stage == "evaluate":
            for arch in config.archs:
                run.evaluate(arch)
        elif args.stage == "compare":
            print(run.compare()["winner"])
        elif args.stage == "export":
            print(run.export(args.arch))
    except (FileNotFoundError, ValueError) as err:
        print(f"cxr-train: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
