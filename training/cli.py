"""`cxr-train`: the whole run, or one stage at a time, over one run folder.

The options are made from the fields of ``RunConfig`` and ``FitConfig`` (their defaults and help text), so the
command line cannot drift from the configuration it fills.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from training.config import FitConfig, RunConfig

STAGES = {
    "run": "every stage: explore, split, fit, evaluate, compare, export",
    "explore": "class counts and sample grid",
    "split": "write (or reuse) split.csv",
    "fit": "train the --archs",
    "head": "re-fit the --archs' final layer on frozen features of augmented training images and their blank-lungs "
    "counterfactuals (last-layer re-training, DFR); run evaluate after it",
    "interpolate": "replace the --archs' fitted weights by (1 - alpha) x the weights their fit started from + alpha x "
    "the fitted ones (WiSE-FT: keeps what the start knew about sources the fine-tune never saw); run evaluate after it",
    "evaluate": "score, calibrate, report and probe the --archs on every split but train",
    "compare": "comparison table and winner",
    "export": "export the winner (or --arch) as OUT/bundle (its manifest.json last)",
    "gate": "refit the chest X-ray gate of OUT/bundle as export does (after the gate's rule changes)",
}


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _add_fields(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if not spec.metadata.get("cli", True):
            continue
        hint = hints[spec.name]
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        kwargs: dict[str, Any] = {"help": spec.metadata.get("help", "")}
        if spec.metadata.get("required"):
            kwargs["required"] = True
        else:
            kwargs["help"] += f" (default: {','.join(map(str, default)) if isinstance(default, list) else default})"
        flag = "--" + spec.name.replace("_", "-")
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # "X | None" -> X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        kind = typing.get_origin(hint) or hint
        if kind is list:
            # --archs a,b  or  --data A B: both give a list; defaults come from the dataclass.
            parser.add_argument(flag, type=_comma_list, nargs="+", default=None, **kwargs)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kwargs)
        else:
            parser.add_argument(flag, type=kind, default=default, choices=spec.metadata.get("choices"), **kwargs)


def _values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    values = {}
    for spec in dataclasses.fields(cls):
        if not spec.metadata.get("cli", True):
            continue
        value = getattr(args, spec.name)
        if isinstance(value, list) and value and isinstance(value[0], list):
            value = [item for group in value for item in group]
        if value is None and spec.default_factory is not dataclasses.MISSING:
            value = spec.default_factory()
        choices = spec.metadata.get("choices")
        if isinstance(value, list) and choices and set(value) - set(choices):
            raise argparse.ArgumentTypeError(
                f"--{spec.name.replace('_', '-')}: unknown {sorted(set(value) - set(choices))}; choose from "
                f"{','.join(choices)}"
            )
        values[spec.name] = value
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-train",
        description=(
            "Train VGG-16 / ResNet-18 / DenseNet-121 on labelled chest X-rays, compare them and export the winner "
            "as a model bundle. Research use only."
        ),
    )
    common = argparse.ArgumentParser(add_help=False)
    _add_fields(common, RunConfig)
    _add_fields(common, FitConfig)
    common.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="stage", required=True)
    for stage, text in STAGES.items():
        stage_parser = sub.add_parser(stage, parents=[common], help=text)
        if stage in ("run", "fit"):
            stage_parser.add_argument("--resume", action="store_true", help="continue each arch from its checkpoint")
        if stage == "export":
            stage_parser.add_argument("--arch", default=None, help="export this arch instead of the winner")
            stage_parser.add_argument(
                "--quantize",
                choices=("int8",),
                default=None,
                help="also write OUT/bundle-int8: static int8 (ONNX Runtime QDQ), calibrated on training images; "
                "refused when macro-F1 drops by more than 1 point on the test or held-out test split",
            )
    manifest = sub.add_parser(
        "manifest",
        help="(re)write BUNDLE/manifest.json over the files now in the folder and print the bundle digest "
        "(export writes it; use this after checking a bundle you changed by hand)",
    )
    manifest.add_argument("bundle", help="model bundle folder")
    quantize = sub.add_parser(
        "quantize",
        help="write an int8 copy of an existing bundle (as export --quantize int8 does), from a split.csv and the "
        "data it names: calibrated on its train images, compared with fp32 on its test and heldout_test images",
    )
    quantize.add_argument("bundle", help="fp32 model bundle folder")
    quantize.add_argument("--out", required=True, help="folder for the int8 bundle (replaced)")
    quantize.add_argument("--data-root", required=True, help="folder the split's image paths are relative to")
    quantize.add_argument("--split-csv", default=None, help="split.csv (default: BUNDLE/report/split.csv)")
    quantize.add_argument("--calibration-images", type=int, default=300, help="training images (default: 300)")
    quantize.add_argument("--log-level", default="INFO")
    point = sub.add_parser(
        "operating-point",
        help="write a copy of an existing bundle whose decision threshold is chosen again, on the splits of a "
        "split.csv and the data it names (same network and temperature; figures re-scored; the leave-one-source-out "
        "estimate in the card)",
    )
    point.add_argument("bundle", help="model bundle folder with a decision rule")
    point.add_argument("--out", required=True, help="folder for the new bundle (replaced)")
    point.add_argument("--data-root", required=True, help="folder the split's image paths are relative to")
    point.add_argument("--split-csv", default=None, help="split.csv (default: BUNDLE/report/split.csv)")
    point.add_argument(
        "--on", type=_comma_list, default=None, help="splits to choose it on (default: heldout_val,heldout_test)"
    )
    point.add_argument(
        "--target-sensitivity", type=float, default=None, help="(default: the bundle's own, else the training default)"
    )
    point.add_argument("--model-version", default=None, help="(default: one more than the bundle's)")
    point.add_argument("--log-level", default="INFO")
    return parser


def quantize_existing_bundle(args: argparse.Namespace) -> int:
    """``cxr-train quantize BUNDLE``: the int8 bundle written (its folder printed), or why not (exit 2)."""
    from pathlib import Path

    from service.model.bundle import BundleError, read_card
    from training.quantize import quantize_bundle, splits_from_csv

    bundle = Path(args.bundle)
    try:
        card = read_card(bundle)
        calibration, evaluation = splits_from_csv(
            Path(args.split_csv) if args.split_csv else bundle / "report" / "split.csv",
            Path(args.data_root),
            card.classes,
            card.input_size,
            calibration_images=args.calibration_images,
        )
        quantize_bundle(bundle, Path(args.out), calibration, evaluation)
    except (BundleError, OSError, ValueError) as err:
        print(f"cxr-train: {err}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


def rechoose_bundle_operating_point(args: argparse.Namespace, command: str) -> int:
    """``cxr-train operating-point BUNDLE``: the new bundle written (its folder printed), or why not (exit 2)."""
    from pathlib import Path

    from service.model.bundle import BundleError, read_card
    from training.operating_point import rechoose_operating_point
    from training.quantize import labelled_splits
    from training.split import HELDOUT_SPLITS

    defaults = RunConfig(data=[])
    chosen_on = args.on or defaults.operating_point_splits
    bundle = Path(args.bundle)
    try:
        card = read_card(bundle)
        recorded = card.decision.target_sensitivity if card.decision is not None else None
        split_csv = Path(args.split_csv) if args.split_csv else bundle / "report" / "split.csv"
        splits = dict.fromkeys(("test", *HELDOUT_SPLITS, *chosen_on))
        evaluation = labelled_splits(split_csv, Path(args.data_root), card.classes, card.input_size, list(splits))
        rechoose_operating_point(
            bundle,
            Path(args.out),
            evaluation,
            chosen_on,
            args.target_sensitivity or recorded or defaults.target_sensitivity,  # the bundle's own by default
            version=args.model_version,
            command=command,
        )
    except (BundleError, OSError, ValueError) as err:
        print(f"cxr-train: {err}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


def write_bundle_manifest(bundle: str) -> int:
    """``cxr-train manifest BUNDLE``: the manifest written, its digest (CXR_MODEL_SHA256) printed."""
    from pathlib import Path

    from service.model.bundle import BundleError, read_card, write_manifest

    try:
        read_card(Path(bundle))  # a folder that is no bundle gets no manifest
    except BundleError as err:
        print(f"cxr-train: {err}", file=sys.stderr)
        return 2
    print(write_manifest(Path(bundle)))
    return 0


def config_from_args(args: argparse.Namespace, command: str = "") -> RunConfig:
    return RunConfig(**_values(args, RunConfig), fit=FitConfig(**_values(args, FitConfig)), command=command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage == "manifest":
        return write_bundle_manifest(args.bundle)
    import matplotlib

    matplotlib.use("Agg")  # the job only writes plot files; never open a window
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("onnxscript", "onnx_ir", "matplotlib", "PIL"):  # exporter/plotting internals
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if args.stage == "quantize":
        return quantize_existing_bundle(args)
    command = "cxr-train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.stage == "operating-point":
        return rechoose_bundle_operating_point(args, command)
    try:
        config = config_from_args(args, command)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    from training.pipeline import Run

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
        elif args.stage == "head":
            for arch in config.archs:
                print(run.retrain_head(arch))
        elif args.stage == "interpolate":
            for arch in config.archs:
                print(run.interpolate(arch))
        elif args.stage == "evaluate":
            for arch in config.archs:
                run.evaluate(arch)
        elif args.stage == "compare":
            print(run.compare()["winner"])
        elif args.stage == "export":
            print(run.export(args.arch))
            if args.quantize == "int8":
                print(run.quantize())
        elif args.stage == "gate":
            print(run.fit_gate(run.out / "bundle")["threshold"])
    except (FileNotFoundError, ValueError) as err:
        print(f"cxr-train: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
