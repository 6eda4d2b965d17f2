"""The bundle manifest: sha256 of every file (card included), its digest, verified on load and pinnable with
CXR_MODEL_SHA256."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.model.bundle import (
    CARD_FILE,
    MANIFEST_FILE,
    BundleError,
    ManifestMismatch,
    ManifestMissing,
    bundle_files,
    bundle_problem,
    load_bundle,
    sha256_file,
    write_manifest,
)
from service.settings import Settings
from tests.fixtures.bundles import CPU
from tests.fixtures.clients import AppClient
from training.cli import main as train_main


def _copy(bundle_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    return copy


def _edit_card(bundle: Path, **changes: object) -> None:
    """Edit card.json as an attacker would: by hand, the card's own checksums left as they are."""
    card = json.loads((bundle / CARD_FILE).read_text())
    card.update(changes)
    (bundle / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


def test_export_writes_a_manifest_over_every_file(bundle_dir: Path) -> None:
    manifest_path = bundle_dir / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    on_disk = sorted(
        p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file() and p != manifest_path
    )
    assert CARD_FILE in on_disk and "model.onnx" in on_disk and "weights.safetensors" in on_disk
    assert sorted(manifest["files"]) == on_disk == bundle_files(bundle_dir)
    assert manifest["files"] == {name: sha256_file(bundle_dir / name) for name in on_disk}
    assert (manifest["manifest_version"], manifest["algorithm"]) == (1, "sha256")
    bundle = load_bundle(bundle_dir, CPU, with_torch=False)
    assert bundle.digest == hashlib.sha256(manifest_path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "changes",
    [
        {"classes": ["Normal", "COVID", "Viral Pneumonia"]},  # COVID images would be labelled Normal
        {"temperature": 100.0},  # every probability flattened towards 1/3
    ],
    ids=["swapped-classes", "temperature"],
)
def test_an_edited_card_is_refused(bundle_dir: Path, tmp_path: Path, changes: dict[str, object]) -> None:
    copy = _copy(bundle_dir, tmp_path)
    _edit_card(copy, **changes)
    with pytest.raises(ManifestMismatch) as refused:
        load_bundle(copy, CPU)
    assert str(refused.value) == (
        "card.json does not match manifest.json: the bundle was modified or corrupted and will not be served."
    )


def test_a_changed_report_file_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    copy = _copy(bundle_dir, tmp_path)
    (copy / "report" / "notes.md").write_text("added later\n")
    with pytest.raises(ManifestMismatch, match=r"^1 file not in manifest\.json \(report/notes\.md\)"):
        load_bundle(copy, CPU)
    write_manifest(copy)
    load_bundle(copy, CPU, with_torch=False)  # listed now
    (copy / "report" / "notes.md").write_text("edited\n")
    with pytest.raises(ManifestMismatch, match=r"^report/notes\.md does not match manifest\.json"):
        load_bundle(copy, CPU)


def test_an_extra_or_missing_file_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    copy = _copy(bundle_dir, tmp_path)
    (copy / "model.int8.onnx").write_bytes(b"an unvetted graph")
    (copy / "extra.txt").write_text("x")
    with pytest.raises(ManifestMismatch) as refused:
        load_bundle(copy, CPU)
    assert str(refused.value) == (
        "2 files not in manifest.json (extra.txt, model.int8.onnx): the bundle was modified and will not be served."
    )
    copy = _copy(bundle_dir, tmp_path / "second")
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["files"]["report/curves.png"] = "0" * 64
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ManifestMismatch) as refused:
        load_bundle(copy, CPU)
    assert str(refused.value) == (
        "1 file listed in manifest.json missing (report/curves.png): the bundle is incomplete and will not be served."
    )


@pytest.mark.parametrize("content", ["not json", '{"files": ["card.json"]}', "{}"])
def test_a_malformed_manifest_is_refused(bundle_dir: Path, tmp_path: Path, content: str) -> None:
    copy = _copy(bundle_dir, tmp_path)
    (copy / MANIFEST_FILE).write_text(content)
    with pytest.raises(ManifestMismatch, match=r"^manifest\.json is not a valid manifest"):
        load_bundle(copy, CPU)


def test_a_bundle_without_a_manifest_is_refused_and_says_how_to_write_one(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = _copy(bundle_dir, tmp_path)
    (copy / MANIFEST_FILE).unlink()
    with pytest.raises(ManifestMissing) as refused:
        load_bundle(copy, CPU)
    assert bundle_problem(refused.value, copy) == (
        "The model bundle 'bundle' cannot be served: The bundle has no manifest.json (the sha256 of every file, card "
        "included). Check the folder's files, then write one with `cxr-train manifest BUNDLE_DIR`."
    )
    assert train_main(["manifest", str(copy)]) == 0
    digest = capsys.readouterr().out.strip()
    assert load_bundle(copy, CPU, with_torch=False).digest == digest
    assert digest == hashlib.sha256((copy / MANIFEST_FILE).read_bytes()).hexdigest()
    assert train_main(["manifest", str(tmp_path / "nothing")]) == 2  # no card: not a bundle, no manifest
    assert not (tmp_path / "nothing").exists()


def test_cxr_model_sha256_must_be_a_sha256() -> None:
    with pytest.raises(ValidationError, match="model_sha256"):
        Settings(model_sha256="abc")
    assert Settings(model_sha256="A" * 64).model_sha256 == "A" * 64
    assert Settings(model_sha256="").model_sha256 is None  # what Compose passes for an unset variable


def test_cxr_model_sha256_pins_the_bundle(make_client: AppClient, bundle_dir: Path) -> None:
    digest = hashlib.sha256((bundle_dir / MANIFEST_FILE).read_bytes()).hexdigest()
    wrong = "0" * 64
    with make_client(predictor=None, model_sha256=wrong) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {
            "code": "not_ready",
            "detail": f"The model bundle {bundle_dir.name!r} cannot be served: its digest {digest[:12]}… is not "
            "the one CXR_MODEL_SHA256 expects (000000000000…): a different bundle was put in its place.",
        }
        assert client.get("/model").status_code == 503
    with make_client(predictor=None, model_sha256=digest.upper()) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["bundle_sha256"] == digest
        assert client.get("/model").json()["bundle_sha256"] == digest


def test_readyz_and_model_show_the_digest_without_a_pin(client: TestClient, bundle_dir: Path) -> None:
    digest = hashlib.sha256((bundle_dir / MANIFEST_FILE).read_bytes()).hexdigest()
    assert client.get("/readyz").json()["bundle_sha256"] == digest
    assert client.get("/model").json()["bundle_sha256"] == digest


def test_bundle_error_is_the_base_of_manifest_errors() -> None:
    # The app turns every BundleError into a not-ready reason; manifest errors must be among them.
    assert issubclass(ManifestMissing, BundleError) and issubclass(ManifestMismatch, BundleError)
