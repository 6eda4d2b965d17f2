"""``cxr-predict`` and ``cxr-serve`` argument handling: real subprocesses for the main paths, in-process for
the edge cases (same ``predict_main``; logging configuration is left to pytest there)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service import cli
from service.model.imaging import decode_image
from service.predictor import Predictor
from tests.fixtures.bundles import CLASSES_3, CLASSES_4, DISCLAIMER
from tests.fixtures.images import dicom_bytes, png_to_array
from tests.fixtures.synthetic import xray_array, xray_png


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("cxr-predict")
    command = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "import sys; from service.cli import predict_main; sys.exit(predict_main())"]
    )
    env = {**os.environ, "CXR_PROVIDERS": "CPUExecutionProvider"}
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.fixture
def xray_file(tmp_path: Path) -> Path:
    """A synthetic chest X-ray PNG on disk (``xray_png()``)."""
    path = tmp_path / "x.png"
    path.write_bytes(xray_png())
    return path


@pytest.fixture
def quiet_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs: keep pytest's log capture (the CLI would reconfigure the root logger); CPU only."""
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setenv("CXR_PROVIDERS", "CPUExecutionProvider")


def test_table_output_and_a_clear_message_per_unreadable_file(
    bundle_dir: Path,
    predictor: Predictor,
    tmp_path: Path,
) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(xray_png(160, 96))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    missing = tmp_path / "missing.png"
    result = run_cli(str(missing), str(good), str(garbage), "--model-dir", str(bundle_dir))

    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["FILE", "LABEL", "COVID", "Normal", "Viral", "Pneumonia"]
    expected = predictor.predict(decode_image(good.read_bytes()))
    row = lines[1]
    assert row.startswith(str(good))
    cells = row[len(str(good)) :].split()
    assert " ".join(cells[:-3]) == expected.label  # a label may contain a space ("Viral Pneumonia")
    assert [float(c) for c in cells[-3:]] == [round(expected.probabilities[c], 3) for c in CLASSES_3]
    assert lines[2:] == [DISCLAIMER]  # the files that failed have no row
    errors = result.stderr.splitlines()
    assert f"cxr-predict: {missing}: No such file or directory" in errors
    assert (
        f"cxr-predict: {garbage}: The file is not a recognised image; only PNG, JPEG or DICOM images are accepted."
    ) in errors
    assert "cxr-predict: 2 of 3 file(s) could not be read" in errors


def test_json_lines_and_explain_writes_a_png(bundle_dir: Path, predictor: Predictor, tmp_path: Path) -> None:
    scan = tmp_path / "scan.dcm"
    scan.write_bytes(dicom_bytes(xray_array(120, 150).astype(np.uint16) * 16, patient_name="Roe^Jane"))
    out = tmp_path / "overlays" / "scan-normal.png"
    result = run_cli(str(scan), "--json", "--explain", str(out), "--target", "Normal", "--model-dir", str(bundle_dir))

    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    record = json.loads(line)
    expected = predictor.predict(decode_image(scan.read_bytes()))
    assert record["file"] == str(scan) and record["label"] == expected.label
    assert record["probabilities"] == pytest.approx(expected.probabilities, abs=1e-12)
    assert record["input"] == {"format": "dicom", "width": 120, "height": 150}
    assert record["model"]["sha256"] == predictor.sha256
    assert record["explain"] == str(out) and record["disclaimer"] == DISCLAIMER
    overlay = out.read_bytes()
    assert png_to_array(overlay).shape == (150, 120, 3)
    assert overlay == predictor.explanation(decode_image(scan.read_bytes()), "Normal").png  # one code path
    assert "Roe^Jane" not in result.stdout + result.stderr


def test_a_decision_rule_labels_the_table_and_the_json(
    decision_bundle_dir: Path,
    decision_predictor: Predictor,
    xray_file: Path,
    quiet_cli: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    decision = decision_predictor.card.decision
    assert decision is not None
    image = xray_file
    expected = decision_predictor.predict(decode_image(image.read_bytes()))
    assert expected.label == decision.positive_class != expected.argmax_label  # the crafted case

    assert cli.predict_main([str(image), "--json", "--model-dir", str(decision_bundle_dir)]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (record["label"], record["argmax_label"]) == (expected.label, expected.argmax_label)
    assert record["decision"] == {
        "positive_class": decision.positive_class,
        "threshold": decision.threshold,
        "positive": True,
        "rule": decision.rule,
    }

    assert cli.predict_main([str(image), "--model-dir", str(decision_bundle_dir)]) == 0
    header, row, rule, disclaimer = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["FILE", "LABEL", "ARGMAX"]
    cells = row.split()
    assert cells[0] == str(image)
    assert " ".join(cells[1:-3]) == f"{expected.label} {expected.argmax_label}"
    assert [float(c) for c in cells[-3:]] == [round(expected.probabilities[c], 3) for c in CLASSES_3]
    assert rule == f"LABEL follows the model's decision rule: {decision.rule}"
    assert disclaimer == DISCLAIMER


def test_json_without_a_decision_rule_has_the_argmax_as_label(
    bundle_dir: Path, quiet_cli: None, capsys: pytest.CaptureFixture[str], xray_file: Path
) -> None:
    image = xray_file
    assert cli.predict_main([str(image), "--json", "--model-dir", str(bundle_dir)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["label"] == record["argmax_label"] and record["decision"] is None


def test_a_file_over_the_upload_limit_is_refused_before_it_is_read(
    bundle_dir: Path,
    xray_file: Path,
    quiet_cli: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = xray_file
    monkeypatch.setenv("CXR_MAX_UPLOAD_BYTES", "2000")
    assert cli.predict_main([str(image), "--model-dir", str(bundle_dir)]) == 1
    # The same sentence as the service's 413.
    assert f"cxr-predict: {image}: The file is larger than the upload limit of 1.95 KiB." in (
        capsys.readouterr().err.splitlines()
    )


def test_explain_dir_writes_one_overlay_per_image(
    bundle_dir: Path,
    tmp_path: Path,
    quiet_cli: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "chest.png", tmp_path / "b" / "chest.png"
    first.write_bytes(xray_png(100, 80))
    second.write_bytes(xray_png(80, 100, seed=3))
    out_dir = tmp_path / "out"
    code = cli.predict_main(
        [str(first), str(second), "--json", "--explain-dir", str(out_dir), "--model-dir", str(bundle_dir)]
    )
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = ["chest.gradcam.png", "chest-2.gradcam.png"]  # same stem from two folders: no overwrite
    assert [r["explain"] for r in records] == [str(out_dir / name) for name in names]
    assert png_to_array((out_dir / "chest.gradcam.png").read_bytes()).shape == (80, 100, 3)
    assert png_to_array((out_dir / "chest-2.gradcam.png").read_bytes()).shape == (100, 80, 3)


def test_a_four_class_bundle_prints_four_columns(
    bundle4_dir: Path, quiet_cli: None, capsys: pytest.CaptureFixture[str], xray_file: Path
) -> None:
    image = xray_file
    assert cli.predict_main([str(image), "--model-dir", str(bundle4_dir)]) == 0
    header, row, disclaimer = capsys.readouterr().out.splitlines()
    assert disclaimer == DISCLAIMER
    assert header.split()[2:] == ["COVID", "Normal", "Viral", "Pneumonia", "Lung", "Opacity"]
    assert sum(float(v) for v in row.split()[-len(CLASSES_4) :]) == pytest.approx(1.0, abs=0.003)


def test_no_model_exits_2_with_what_to_do(
    tmp_path: Path, quiet_cli: None, capsys: pytest.CaptureFixture[str], xray_file: Path
) -> None:
    image = xray_file
    missing = tmp_path / "no-model"
    assert cli.predict_main([str(image), "--model-dir", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"cxr-predict: error: No model bundle at '{missing.name}': the folder does not exist. Train a bundle with "
        "cxr-train, or point CXR_MODEL_DIR (or --model-dir) at a bundle folder."
    )


def test_a_bundle_other_than_the_pinned_one_exits_2(
    bundle_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    quiet_cli: None,
    capsys: pytest.CaptureFixture[str],
    xray_file: Path,
) -> None:
    digest = hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()
    monkeypatch.setenv("CXR_MODEL_SHA256", "0" * 64)
    assert cli.predict_main([str(xray_file), "--model-dir", str(bundle_dir)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"cxr-predict: error: The model bundle {bundle_dir.name!r} cannot be served: its digest {digest[:12]}… is "
        "not the one CXR_MODEL_SHA256 expects (000000000000…): a different bundle was put in its place."
    )
    monkeypatch.setenv("CXR_MODEL_SHA256", digest)
    assert cli.predict_main([str(xray_file), "--model-dir", str(bundle_dir)]) == 0


def test_unknown_target_exits_2(
    bundle_dir: Path, tmp_path: Path, quiet_cli: None, capsys: pytest.CaptureFixture[str], xray_file: Path
) -> None:
    image = xray_file
    code = cli.predict_main(
        [str(image), "--explain", str(tmp_path / "o.png"), "--target", "Lung Opacity", "--model-dir", str(bundle_dir)]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "cxr-predict: error: unknown --target 'Lung Opacity'; this model's classes are: COVID, Normal, Viral Pneumonia"
    )
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: IMAGE"),
        (["a.png", "b.png", "--explain", "o.png"], "--explain OUT.png takes exactly one IMAGE"),
        (["a.png", "--explain", "o.png", "--explain-dir", "d"], "not allowed with argument --explain"),
        (["a.png", "--alpha", "1.5"], "--alpha must be between 0 and 1, got 1.5"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.predict_main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_invalid_environment_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CXR_MAX_UPLOAD_BYTES", "0")
    with pytest.raises(SystemExit) as exited:
        cli.predict_main(["a.png"])
    assert exited.value.code == 2
    assert (
        "invalid settings (options or CXR_* environment): max_upload_bytes: Input should be greater than 0"
    ) in capsys.readouterr().err


def test_serve_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.serve_main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cxr-serve")
    for option in ("--host", "--port", "--model-dir", "--log-level"):
        assert option in out
