"""Command-line front ends over the same Predictor: ``cxr-serve`` (the HTTP service) and ``cxr-predict``.

torch, onnxruntime and FastAPI are imported only once the arguments are parsed (the predictor and the bundle
loader import them lazily), so ``--help`` and usage errors are quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import ValidationError

from service.errors import NotAChestXray
from service.logging_setup import configure_logging
from service.model.bundle import BundleError, bundle_problem, verify_digest
from service.model.imaging import DecodedImage, ImageDecodeError, TooManyBytes, decode_image
from service.predictor import DEFAULT_ALPHA, Predictor
from service.settings import Settings

if TYPE_CHECKING:
    from service.predictor import Prediction

EXIT_OK, EXIT_FILE_ERRORS, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3


def _settings_or_exit(parser: argparse.ArgumentParser, **overrides: Any) -> Settings:
    """Settings from the environment plus the given options; a usage error (exit 2) if they are invalid."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in err.errors())
        parser.error(f"invalid settings (options or CXR_* environment): {problems}")


# --------------------------------------------------------------------------- cxr-serve


def build_serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-serve",
        description="Serve the chest X-ray triage API (research use only, never a diagnosis). Every other "
        "setting comes from CXR_* environment variables (see service/settings.py).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument(
        "--model-dir", type=Path, help="model bundle folder (default: $CXR_MODEL_DIR or models/default)"
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: $CXR_LOG_LEVEL or INFO",
    )
    parser.add_argument("--log-format", choices=["text", "json"], help="default: $CXR_LOG_FORMAT or text")
    return parser


def serve_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-serve``: configure logging once, build the app, run uvicorn until stopped."""
    parser = build_serve_parser()
    args = parser.parse_args(argv)
    settings = _settings_or_exit(
        parser,
        model_dir=args.model_dir,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    configure_logging(settings.log_level, settings.log_format)

    import uvicorn

    from service.app import create_app
    from service.server import limit_blas_threads, limit_malloc_arenas, protocol_with_deadline

    limit_malloc_arenas()  # MALLOC_ARENA_MAX=2 for this process: flat RSS under many worker threads
    limit_blas_threads()
    # log_config=None keeps our logging; access_log=False because our middleware writes the access log.
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        server_header=False,
        http=protocol_with_deadline(settings.header_timeout_s),
        timeout_keep_alive=int(max(1, round(settings.keep_alive_s))),
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=30,
    )
    return EXIT_OK


# --------------------------------------------------------------------------- cxr-predict


def build_predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-predict",
        description="Classify chest X-ray files (PNG, JPEG, DICOM) with a model bundle and optionally write "
        "Grad-CAM overlays. Research use only: never a diagnosis. Exit status: 0 all files done, 1 some "
        "file could not be read, 2 usage error or no usable model, 3 some file was refused as not a chest X-ray "
        "(and none was unreadable).",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument(
        "--model-dir", type=Path, help="model bundle folder (default: $CXR_MODEL_DIR or models/default)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per file instead of a table")
    parser.add_argument(
        "--gate",
        choices=["on", "off"],
        help="refuse files that are not chest X-rays (default: $CXR_GATE or on)",
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument(
        "--explain", type=Path, metavar="OUT.png", help="write the Grad-CAM overlay of the (single) IMAGE here"
    )
    out.add_argument(
        "--explain-dir", type=Path, metavar="DIR", help="write one overlay per IMAGE into DIR as STEM.gradcam.png"
    )
    parser.add_argument("--target", metavar="CLASS", help="class to explain (default: the predicted one)")
    parser.add_argument(
        "--alpha", type=float, default=DEFAULT_ALPHA, help="heatmap opacity 0..1 (default: %(default)s)"
    )
    parser.add_argument(
        "--max-side", type=int, help="long side cap of overlays in pixels (default: $CXR_EXPLAIN_MAX_SIDE or 1024)"
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: %(default)s",
    )
    return parser


class _Output:
    """Prints results as an aligned table (header first) or as JSON lines.

    With a decision rule in the card the table has an ARGMAX column next to LABEL (which follows the rule),
    and the rule is printed under the table.
    """

    def __init__(self, stream: TextIO, as_json: bool, predictor: Predictor, names: Sequence[str]) -> None:
        self.stream, self.as_json, self.predictor = stream, as_json, predictor
        self.classes = list(predictor.classes)
        self.with_argmax = predictor.card.decision is not None
        self.name_width = max(len("FILE"), *(len(n) for n in names))
        self.label_width = max(len("ARGMAX"), *(len(c) for c in self.classes))
        if not as_json:
            labels = ["LABEL", "ARGMAX"] if self.with_argmax else ["LABEL"]
            header = [f"{'FILE':<{self.name_width}}", *(f"{c:<{self.label_width}}" for c in labels)]
            header += [f"{c:>{max(len(c), 5)}}" for c in self.classes]
            print("  ".join(header), file=stream, flush=True)

    def row(self, name: str, image: DecodedImage, prediction: Prediction, overlay: Path | None) -> None:
        if self.as_json:
            card = self.predictor.card
            record: dict[str, Any] = {
                "file": name,
                "label": prediction.label,
                "argmax_label": prediction.argmax_label,
                "probabilities": prediction.probabilities,
                "decision": None if prediction.decision is None else prediction.decision.model_dump(),
                "input": {"format": image.source_format, "width": image.width, "height": image.height},
                "model": {
                    "name": card.name,
                    "arch": card.arch,
                    "version": card.version,
                    "sha256": self.predictor.sha256,
                },
                "disclaimer": card.disclaimer,
            }
            if overlay is not None:
                record["explain"] = str(overlay)
            print(json.dumps(record), file=self.stream, flush=True)
            return
        labels = [prediction.label, prediction.argmax_label] if self.with_argmax else [prediction.label]
        cells = [f"{name:<{self.name_width}}", *(f"{c:<{self.label_width}}" for c in labels)]
        cells += [f"{prediction.probabilities[c]:>{max(len(c), 5)}.3f}" for c in self.classes]
        print("  ".join(cells), file=self.stream, flush=True)

    def refused(self, name: str, error: NotAChestXray) -> None:
        """A file the gate refused: in the table, REFUSED and the reason; in JSON, ``error`` and ``code``."""
        if self.as_json:
            record = {
                "file": name,
                "error": error.detail,
                "code": error.code,
                "gate_score": error.score,
                "gate_threshold": error.threshold,
            }
            print(json.dumps(record), file=self.stream, flush=True)
            return
        print(f"{name:<{self.name_width}}  REFUSED: {error.detail}", file=self.stream, flush=True)

    def close(self) -> None:
        """Under a table: the decision rule (when the card has one) and the disclaimer."""
        if self.as_json:
            return
        decision = self.predictor.card.decision
        if decision is not None:
            print(f"LABEL follows the model's decision rule: {decision.rule}", file=self.stream)
        print(self.predictor.card.disclaimer, file=self.stream)


def _overlay_path(args: argparse.Namespace, image: Path, used: set[Path]) -> Path | None:
    if args.explain is not None:
        return Path(args.explain)
    if args.explain_dir is None:
        return None
    candidate, n = args.explain_dir / f"{image.stem}.gradcam.png", 1
    while candidate in used:  # two inputs with the same stem from different folders
        n += 1
        candidate = args.explain_dir / f"{image.stem}-{n}.gradcam.png"
    used.add(candidate)
    return Path(candidate)


def _reason(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror:
        return str(err.strerror)
    return str(err)


def predict_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-predict``; returns the exit status (0 ok, 1 unreadable file(s), 2 usage/model)."""
    parser = build_predict_parser()
    args = parser.parse_args(argv)
    if args.explain is not None and len(args.images) != 1:
        parser.error("--explain OUT.png takes exactly one IMAGE; use --explain-dir DIR for several")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be between 0 and 1, got {args.alpha}")
    settings = _settings_or_exit(parser, model_dir=args.model_dir, explain_max_side=args.max_side, gate=args.gate)
    configure_logging(args.log_level, "text")

    try:
        predictor = Predictor.load(
            settings.model_dir, settings.providers, settings.gate_policy, settings.explain_engine, settings.ort_threads
        )
        verify_digest(predictor.bundle.digest, settings.model_sha256)
    except (BundleError, OSError) as err:
        print(f"cxr-predict: error: {bundle_problem(err, settings.model_dir)}", file=sys.stderr)
        return EXIT_USAGE
    if args.target is not None and args.target not in predictor.classes:
        print(
            f"cxr-predict: error: unknown --target {args.target!r}; this model's classes are: "
            f"{', '.join(predictor.classes)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.explain_dir is not None:
        args.explain_dir.mkdir(parents=True, exist_ok=True)

    output = _Output(sys.stdout, args.json, predictor, [str(p) for p in args.images])
    failures = refusals = 0
    used_paths: set[Path] = set()
    for path in args.images:
        try:
            size = path.stat().st_size
            if size > settings.max_upload_bytes:  # refuse before reading a huge file into memory
                raise TooManyBytes(settings.max_upload_bytes)
            image = decode_image(path.read_bytes(), max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
            prediction = predictor.predict(image)
            overlay = _overlay_path(args, path, used_paths)
            if overlay is not None:
                target = args.target or prediction.label  # the default: the class the label names
                explanation = predictor.explanation(
                    image,
                    target,
                    alpha=args.alpha,
                    max_side=settings.explain_max_side,
                    activations=prediction.activations,  # onnx engine: the map needs no second network run
                )
                overlay.parent.mkdir(parents=True, exist_ok=True)
                overlay.write_bytes(explanation.png)
        except NotAChestXray as err:
            output.refused(str(path), err)
            refusals += 1
            continue
        except (OSError, ImageDecodeError) as err:  # unreadable input, or an overlay that cannot be written
            print(f"cxr-predict: {path}: {_reason(err)}", file=sys.stderr, flush=True)
            failures += 1
            continue
        output.row(str(path), image, prediction, overlay)
    output.close()
    if failures:
        print(f"cxr-predict: {failures} of {len(args.images)} file(s) could not be read", file=sys.stderr)
        return EXIT_FILE_ERRORS
    if refusals:
        print(f"cxr-predict: {refusals} of {len(args.images)} file(s) refused: not a chest X-ray", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK
