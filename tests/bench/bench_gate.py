"""How well a bundle's "is this a chest X-ray?" gate refuses what is not one, and lets real X-rays through.

    .venv/bin/python tests/bench/bench_gate.py --model-dir models/default \
        --fit-data ../shared/data/cxr-dev --split-csv models/default/report/split.csv \
        --not-cxr ../shared/data/not-cxr --cxr-ext ../shared/data/cxr-ext [--unseen-sources ...] [--refit]

A bundle with a gate is measured as it is. A bundle without one (or with ``--refit``) is copied to a temporary
folder, re-exported with the ``features`` output if it predates it, and its gate is fitted there exactly as
training does at export: ``fit_bundle_gate`` on ``--n-fit`` images of the split's ``train`` rows, calibrated on
``--n-calibration`` of its ``val`` rows. A bundle from a cxr-dev + cxr-ext run has seen most cxr-ext sources in
training or calibration, so only ``--unseen-sources`` (the run's held-out-test sources) are reported; nothing of
``--not-cxr`` is ever used for fitting. Every image goes through the service's decoder and Predictor
(the same forward pass, the same refusal). Prints the refused share per kind (targets: >= 95 % of non-chest
images) and per outside source (<= 2 % of real chest X-rays). Run on demand.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from service.errors import NotAChestXray  # noqa: E402
from service.model.bundle import has_features, load_bundle, read_card, write_bundle, write_card  # noqa: E402
from service.model.gate import GATE_FILE  # noqa: E402
from service.model.imaging import decode_image  # noqa: E402
from service.model.labels import canonical_label  # noqa: E402
from service.predictor import Predictor  # noqa: E402
from training.config import HELDOUT_TEST_SOURCES  # noqa: E402
from training.gate import fit_bundle_gate, synthetic_negatives  # noqa: E402

CPU = ["CPUExecutionProvider"]


def _load(path: Path) -> np.ndarray:
    return decode_image(path.read_bytes()).array


def _split_rows(split_csv: Path, split: str, n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    with open(split_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    return [rows[i] for i in sorted(rng.permutation(len(rows))[:n])]


def _bundle_with_gate(args: argparse.Namespace, workdir: Path) -> Path:
    """The bundle to measure: ``--model-dir`` itself when it has a gate, else a copy whose gate is fitted here."""
    card = read_card(args.model_dir)
    if card.gate is not None and not args.refit:
        return Path(args.model_dir)
    out = workdir / "bundle"
    source = load_bundle(args.model_dir, CPU, with_torch=True, with_gate=False)
    if has_features(source.session):
        shutil.copytree(args.model_dir, out)
        (out / GATE_FILE).unlink(missing_ok=True)  # before write_card, which writes the manifest over the folder
        fresh = read_card(out)
        fresh.gate = None
        fresh.sha256.pop(GATE_FILE, None)
        write_card(out, fresh)
    else:
        print(f"{args.model_dir} predates the features output: re-exporting its weights to {out}", flush=True)
        assert source.torch_model is not None
        fields = card.model_dump()
        write_bundle(
            source.torch_model,
            out,
            name=card.name,
            arch=card.arch,
            classes=card.classes,
            spec=card.spec,
            cam_layer=card.cam_layer,
            version=card.version,
            temperature=card.temperature,
            decision=card.decision,
            metrics=card.metrics,
            training=card.training,
            calibration=fields.get("calibration"),
            probes=fields.get("probes"),
            sources=fields.get("sources"),
        )
    rng = np.random.default_rng(args.seed)
    root = Path(args.fit_data)
    classes = list(card.classes)
    fit_rows = _split_rows(args.split_csv, "train", args.n_fit, rng)
    calibration_rows = _split_rows(args.split_csv, "val", args.n_calibration, rng)
    started = time.perf_counter()
    record = fit_bundle_gate(
        out,
        [_load(root / r["path"]) for r in fit_rows],
        [_load(root / r["path"]) for r in calibration_rows],
        seed=args.seed,
        fit_labels=[classes.index(canonical_label(r["label"])) for r in fit_rows],
    )
    print(
        f"gate fitted on {len(fit_rows)} train-split and calibrated on {len(calibration_rows)} val-split images of "
        f"{root} in {time.perf_counter() - started:.0f}s: threshold {record['threshold']:.2f}, calibration pass "
        f"rate {record['calibration_pass_rate']:.3f}, synthetic negatives refused "
        f"{record['synthetic_negatives_refused']:.3f}",
        flush=True,
    )
    return out


def _refused(predictor: Predictor, image: object) -> bool:
    try:
        predictor.predict(image)  # type: ignore[arg-type]
    except NotAChestXray:
        return True
    return False


def _table(title: str, groups: dict[str, list[bool]], target: str) -> None:
    print(f"\n{title} ({target})")
    print(f"{'group':<36}{'n':>6}{'refused':>9}{'share':>8}")
    total = [r for rs in groups.values() for r in rs]
    for name, results in sorted(groups.items()):
        print(f"{name:<36}{len(results):>6}{sum(results):>9}{np.mean(results):>8.3f}")
    print(f"{'all':<36}{len(total):>6}{sum(total):>9}{np.mean(total):>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("models/default"))
    parser.add_argument("--fit-data", type=Path, default=Path("../shared/data/cxr-dev"))
    parser.add_argument("--split-csv", type=Path, default=Path("models/default/report/split.csv"))
    parser.add_argument("--not-cxr", type=Path, default=Path("../shared/data/not-cxr"))
    parser.add_argument("--cxr-ext", type=Path, default=Path("../shared/data/cxr-ext"))
    parser.add_argument("--per-source", type=int, default=400, help="at most this many outside X-rays per source")
    parser.add_argument(
        "--unseen-sources",
        nargs="+",
        default=list(HELDOUT_TEST_SOURCES),
        help="cxr-ext sources to report: those the bundle's run held out entirely (default: the training job's "
        "heldout-test sources; the others are in its training or calibration splits)",
    )
    parser.add_argument("--synthetic-per-kind", type=int, default=20)
    parser.add_argument("--n-fit", type=int, default=600)
    parser.add_argument("--n-calibration", type=int, default=400)
    parser.add_argument("--refit", action="store_true", help="fit a fresh gate even if the bundle has one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        bundle_dir = _bundle_with_gate(args, Path(tmp))
        predictor = Predictor.load(bundle_dir, CPU)
        gate = predictor.card.gate or {}
        print(
            f"model {predictor.card.name} ({predictor.card.arch}), gate {gate.get('method')} threshold "
            f"{gate.get('threshold'):.2f}; fitted on {gate.get('n_fit')}, calibrated on {gate.get('n_calibration')}"
        )
        started = time.perf_counter()

        kinds: dict[str, list[bool]] = defaultdict(list)
        for path in sorted(args.not_cxr.glob("*/*.png")):
            kinds[f"not-cxr/{path.parent.name}"].append(_refused(predictor, decode_image(path.read_bytes())))
        rng = np.random.default_rng(args.seed + 1)
        real = [_load(p) for p in sorted((args.fit_data / "Normal").glob("*.png"))[:20]]
        for kind, image in synthetic_negatives(rng, args.synthetic_per_kind, real):
            kinds[f"synthetic/{kind}"].append(_refused(predictor, image))
        not_cxr = [r for name, rs in kinds.items() if name.startswith("not-cxr/") for r in rs]
        _table("non-chest images refused, by kind (none seen by the gate)", kinds, "target >= 0.95 refused")
        print(f"not-cxr overall: {np.mean(not_cxr):.3f} of {len(not_cxr)} refused")

        by_source: dict[str, list[Path]] = defaultdict(list)
        for path in sorted(args.cxr_ext.glob("*/*.png")):
            by_source[path.name.split("__")[0]].append(path)
        sources: dict[str, list[bool]] = {}
        for source, paths in by_source.items():
            if source not in args.unseen_sources:
                continue
            chosen = [paths[i] for i in sorted(rng.permutation(len(paths))[: args.per_source])]
            sources[source] = [_refused(predictor, decode_image(p.read_bytes())) for p in chosen]
        _table(
            f"real chest X-rays from outside sources refused, by source (at most {args.per_source} each)",
            sources,
            "target <= 0.02 refused",
        )
        print(f"\n({time.perf_counter() - started:.0f}s to score)")


if __name__ == "__main__":
    main()
