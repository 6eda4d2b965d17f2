"""How well a bundle's "is this a chest X-ray?" gate refuses what is not one, and lets real X-rays through.

    .venv/bin/python tests/bench/bench_gate.py --model-dir models/default \
        --fit-data ../shared/data/cxr-dev --split-csv models/default/report/split.csv \
        --not-cxr ../shared/data/not-cxr --cxr-ext ../shared/data/cxr-ext [--unseen-sources ...] [--refit] \
        [--no-held-back | --only-held-back]

A bundle with a gate is measured as it is. A bundle without one (or with ``--refit``) is copied to a temporary
folder, re-exported with the ``features`` output if it predates it, and its gate is fitted there exactly as
training does at export: ``fit_bundle_gate`` on ``--n-fit`` images of the split's ``train`` rows, calibrated on
``--n-calibration`` of its ``val`` rows. A bundle from a cxr-dev + cxr-ext run has seen most cxr-ext sources in
training or calibration, so only ``--unseen-sources`` (the run's held-out-test sources) are reported; nothing of
``--not-cxr`` is ever used for fitting. Every image goes through the service's decoder and Predictor
(the same forward pass, the same refusal). Prints the refused share per kind (targets: >= 95 % of non-chest
images) and per outside source (<= 2 % of real chest X-rays). Run on demand.

The gate's method was chosen after seeing figures on ``--not-cxr``, so its refusal there is not independent. The
held-back collection (issue 11; ``--no-held-back`` skips it, ``--only-held-back`` prints nothing else) is the
images that ship inside installed packages, found at run time, that no choice about the gate has seen: pydicom's
test files (one file per distinct picture), matplotlib's sample data and scikit-learn's two photos. Files go
through the service's decoder; raw arrays go in as 2-D float32 [0, 1] (min-max), as the synthetic negatives do.
DICOM pixels are put to the gate without the service's metadata rule (Modality, BodyPartExamined), which is
counted apart; a colour or multi-frame DICOM, which the service's decoder refuses outright, goes in as its first
frame encoded as a PNG. Prints the refused share per kind, each image's gate score, and what could not be read.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from importlib.util import find_spec
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from service.errors import NotAChestXray  # noqa: E402
from service.model.bundle import has_features, load_bundle, read_card, write_bundle, write_card  # noqa: E402
from service.model.gate import GATE_FILE, dicom_refusal  # noqa: E402
from service.model.imaging import MultiFrameDicom, UnsupportedDicom, decode_image  # noqa: E402
from service.model.labels import canonical_label  # noqa: E402
from service.predictor import Predictor  # noqa: E402
from training.config import HELDOUT_TEST_SOURCES  # noqa: E402
from training.gate import fit_bundle_gate, synthetic_negatives, unit_range  # noqa: E402

CPU = ["CPUExecutionProvider"]

# (package, file inside it, kind). One pydicom test file per distinct picture: the others hold the same pictures in
# other transfer syntaxes or sizes (MR_small_*, *_expb*, *_rle*, JPGExtended, SC_rgb_*, examples_jpeg2k, ...), no
# pixel data (SR, RT plan, ECG, ...), or data broken on purpose (MR_truncated, badVR, JPEG-lossy, ...).
HELD_BACK: tuple[tuple[str, str, str], ...] = (
    ("pydicom", "data/test_files/CT_small.dcm", "CT"),
    ("pydicom", "data/test_files/693_J2KI.dcm", "CT"),
    ("pydicom", "data/test_files/J2K_pixelrep_mismatch.dcm", "CT"),
    ("pydicom", "data/test_files/MR_small.dcm", "MR"),
    ("pydicom", "data/test_files/examples_overlay.dcm", "MR"),
    ("pydicom", "data/test_files/JPEG2000.dcm", "nuclear medicine"),
    ("pydicom", "data/test_files/examples_palette.dcm", "ultrasound"),
    ("pydicom", "data/test_files/examples_rgb_color.dcm", "ultrasound"),
    ("pydicom", "data/test_files/examples_ybr_color.dcm", "ultrasound"),
    ("pydicom", "data/test_files/ExplVR_BigEnd.dcm", "ultrasound"),
    ("pydicom", "data/test_files/liver_1frame.dcm", "segmentation mask"),
    ("pydicom", "data/test_files/rtdose_1frame.dcm", "dose grid"),
    ("pydicom", "data/test_files/image_dfl.dcm", "test pattern"),
    ("pydicom", "data/test_files/SC_rgb_rle.dcm", "test pattern"),
    ("pydicom", "data/test_files/SC_rgb_jpeg_dcmd.dcm", "test pattern"),
    ("pydicom", "data/test_files/SC_rgb_small_odd.dcm", "test pattern"),
    ("pydicom", "data/test_files/JPEGLSNearLossless_08.dcm", "test pattern"),
    ("pydicom", "data/test_files/JPEGLSNearLossless_16.dcm", "test pattern"),
    ("pydicom", "data/test_files/GDCMJ2K_TextGBR.dcm", "text"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "photo"),
    ("matplotlib", "mpl-data/sample_data/logo2.png", "graphic"),
    ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png", "graphic"),
    ("matplotlib", "mpl-data/sample_data/s1045.ima.gz", "MR"),
    ("matplotlib", "mpl-data/sample_data/membrane.dat", "plot"),
    ("matplotlib", "mpl-data/sample_data/jacksboro_fault_dem.npz", "elevation map"),
    ("matplotlib", "mpl-data/sample_data/topobathy.npz", "elevation map"),
    ("sklearn", "datasets/images/china.jpg", "photo"),
    ("sklearn", "datasets/images/flower.jpg", "photo"),
)


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


def _screened(predictor: Predictor, image: object) -> tuple[bool, float | None]:
    """Whether the gate refuses ``image`` and its gate score (None when the gate is off)."""
    try:
        return False, predictor.predict(image).gate_score  # type: ignore[arg-type]
    except NotAChestXray as refusal:
        return True, refusal.score


def _refused(predictor: Predictor, image: object) -> bool:
    return _screened(predictor, image)[0]


class _HeldBackImage(NamedTuple):
    array: np.ndarray  # 2-D float32 [0, 1]: what the gate is shown
    dicom: tuple[str | None, str | None] | None  # a DICOM's Modality and BodyPartExamined, None if not a DICOM
    note: str


def _as_png(pixels: np.ndarray) -> np.ndarray:
    """Gray or RGB pixels as the service decodes the same picture uploaded as an 8-bit PNG."""
    if pixels.dtype != np.uint8:
        pixels = np.round(255 * unit_range(pixels)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return decode_image(buffer.getvalue()).array


def _line_plot(signal: np.ndarray) -> np.ndarray:
    from matplotlib.figure import Figure  # only for this one image: a plot of a 1-D signal

    figure = Figure()
    figure.subplots().plot(signal)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return decode_image(buffer.getvalue()).array


def _held_back_dicom(data: bytes) -> _HeldBackImage:
    try:
        decoded = decode_image(data)
        return _HeldBackImage(decoded.array, (decoded.modality, decoded.body_part), "")
    except (UnsupportedDicom, MultiFrameDicom) as refusal:
        import pydicom
        from pydicom.pixels import apply_color_lut, pixel_array

        ds = pydicom.dcmread(io.BytesIO(data))
        pixels = pixel_array(ds, index=0)  # the first frame; YBR becomes RGB
        if ds.PhotometricInterpretation == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
        modality, body_part = (str(ds.get(k) or "").strip().upper() or None for k in ("Modality", "BodyPartExamined"))
        return _HeldBackImage(
            _as_png(pixels), (modality, body_part), f"decoder refuses: {refusal.code}; frame 0 as PNG"
        )


def _held_back_image(path: Path) -> _HeldBackImage:
    """The picture in one held-back file, as the gate is shown it."""
    if path.suffix == ".dcm":
        return _held_back_dicom(path.read_bytes())
    if path.name == "s1045.ima.gz":  # a raw 256 x 256 little-endian uint16 MR slice (matplotlib's MRI example)
        raw = np.frombuffer(gzip.decompress(path.read_bytes()), "<u2").reshape(256, 256)
        return _HeldBackImage(unit_range(raw), None, "raw uint16, min-max")
    if path.name == "membrane.dat":  # 12,000 float32 samples of a membrane potential: no picture until plotted
        return _HeldBackImage(_line_plot(np.fromfile(path, np.float32)), None, "line plot rendered by matplotlib")
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            grid = next(arrays[k] for k in arrays.files if arrays[k].ndim == 2)
        return _HeldBackImage(unit_range(grid), None, f"{grid.dtype} {grid.shape[0]} x {grid.shape[1]}, min-max")
    return _HeldBackImage(decode_image(path.read_bytes()).array, None, "")


def _report_held_back(predictor: Predictor) -> None:
    kinds: dict[str, list[bool]] = defaultdict(list)
    lines, skipped, dicoms, by_metadata = [], [], 0, 0
    for package, file, kind in HELD_BACK:
        spec = find_spec(package)
        path = Path(spec.origin).parent / file if spec is not None and spec.origin else None
        name = f"{package}/{Path(file).name}"
        if path is None or not path.is_file():
            skipped.append(f"{name}: not installed")
            continue
        try:
            image = _held_back_image(path)
        except (ValueError, RuntimeError, AttributeError) as err:  # decode errors; ImageDecodeError is a ValueError
            skipped.append(f"{name}: does not decode here ({type(err).__name__}: {err})")
            continue
        refused, score = _screened(predictor, image.array)
        kinds[kind].append(refused)
        metadata = ""
        if image.dicom is not None:
            reason = dicom_refusal(*image.dicom, predictor.gate_policy)
            dicoms, by_metadata = dicoms + 1, by_metadata + (reason is not None)
            metadata = f"Modality {image.dicom[0]}, metadata rule {'refuses' if reason else 'passes'}"
        verdict, note = "refused" if refused else "passed", "; ".join(n for n in (metadata, image.note) if n)
        lines.append(f"{name:<48}{kind:<19}{np.nan if score is None else score:>7.3f}  {verdict:<9}{note}".rstrip())
    _table("held-back kinds (never seen by any choice)", kinds, "target >= 0.95 refused")
    threshold = predictor.bundle.gate.threshold if predictor.bundle.gate is not None else float("nan")
    print(f"\nheld-back images: gate score (threshold {threshold:.3f}), by the pixels alone")
    print("\n".join(lines))
    print(f"DICOM metadata rule alone (Modality, BodyPartExamined) would refuse {by_metadata} of {dicoms} DICOMs")
    print("\n".join(f"skipped {line}" for line in skipped) or "skipped: none")


def _table(title: str, groups: dict[str, list[bool]], target: str) -> None:
    print(f"\n{title} ({target})")
    print(f"{'group':<36}{'n':>6}{'refused':>9}{'share':>8}")
    total = [r for rs in groups.values() for r in rs]
    for name, results in sorted(groups.items()):
        print(f"{name:<36}{len(results):>6}{sum(results):>9}{np.mean(results):>8.3f}")
    print(f"{'all':<36}{len(total):>6}{sum(total):>9}{np.mean(total):>8.3f}")


def _report_non_chest(args: argparse.Namespace, predictor: Predictor, rng: np.random.Generator) -> None:
    kinds: dict[str, list[bool]] = defaultdict(list)
    for path in sorted(args.not_cxr.glob("*/*.png")):
        kinds[f"not-cxr/{path.parent.name}"].append(_refused(predictor, decode_image(path.read_bytes())))
    real = [_load(p) for p in sorted((args.fit_data / "Normal").glob("*.png"))[:20]]
    for kind, image in synthetic_negatives(rng, args.synthetic_per_kind, real):
        kinds[f"synthetic/{kind}"].append(_refused(predictor, image))
    not_cxr = [r for name, rs in kinds.items() if name.startswith("not-cxr/") for r in rs]
    _table("non-chest images refused, by kind (none seen by the gate)", kinds, "target >= 0.95 refused")
    print(f"not-cxr overall: {np.mean(not_cxr):.3f} of {len(not_cxr)} refused")


def _report_outside_sources(args: argparse.Namespace, predictor: Predictor, rng: np.random.Generator) -> None:
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
    held_back = parser.add_mutually_exclusive_group()
    held_back.add_argument("--no-held-back", action="store_true", help="skip the held-back collection")
    held_back.add_argument("--only-held-back", action="store_true", help="measure the held-back collection only")
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
        if not args.only_held_back:
            rng = np.random.default_rng(args.seed + 1)
            _report_non_chest(args, predictor, rng)
            _report_outside_sources(args, predictor, rng)
        if not args.no_held_back:
            _report_held_back(predictor)
        print(f"\n({time.perf_counter() - started:.0f}s to score)")


if __name__ == "__main__":
    main()
