"""``cxr-serve`` as a real process on a free port, spoken to over HTTP with httpx."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.bundles import CLASSES_3
from tests.fixtures.images import png_to_array
from tests.fixtures.server import running_server
from tests.fixtures.synthetic import xray_png


def test_cxr_serve_process_answers_predict_and_explain(bundle_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with (
        running_server(bundle_dir, log, CXR_EXPLAIN_MAX_SIDE="128") as server,
        httpx.Client(base_url=server.url, timeout=30.0) as http,
    ):
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz").json()
        assert ready["classes"] == CLASSES_3 and ready["providers"] == ["CPUExecutionProvider"]
        upload = {"file": ("Jane_Roe_chest.png", xray_png(160, 96), "image/png")}
        predicted = http.post("/predict", files=upload)
        assert predicted.status_code == 200
        body = predicted.json()
        assert list(body["probabilities"]) == CLASSES_3
        assert sum(body["probabilities"].values()) == pytest.approx(1.0)
        assert body["input"] == {"format": "png", "width": 160, "height": 96}
        overlay = http.get(f"{body['explain_url']}&target=Normal")
        assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
        assert png_to_array(overlay.content).shape == (77, 128, 3)  # long side capped by the env setting
        missing = http.get("/explain", params={"id": "expired-or-never-was"})
        assert missing.status_code == 404 and missing.json()["code"] == "unknown_id"
        deadline = time.monotonic() + 120.0
        while http.get("/readyz").json()["reference_check"] == "pending":
            assert time.monotonic() < deadline, "the torch reference check did not finish"
            time.sleep(0.2)
        assert http.get("/readyz").json()["reference_check"] == "passed"
        # The onnx engine's torch reference ran in a child: none of torch was ever mapped into the server.
        maps = Path(f"/proc/{server.process.pid}/maps")
        if maps.exists():
            assert "libtorch" not in maps.read_text()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the status says how it ended.
    assert server.process.returncode in (0, -signal.SIGTERM), server.log.read_text(errors="replace")

    text = server.log.read_text(errors="replace")
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    access = {(r["method"], r["route"], r["status"]) for r in records if r["logger"] == "service.access"}
    assert {("POST", "/predict", 200), ("GET", "/explain", 200), ("GET", "/explain", 404)} <= access
    assert all(len(r["model_sha"]) == 12 for r in records if r["logger"] == "service.access")
    assert any(r["message"].startswith("torch reference check passed") for r in records)
    assert "Jane_Roe" not in text and body["id"] not in text


def test_the_server_limits_blas_to_one_thread_per_caller() -> None:
    # In a fresh interpreter: the limit is process-wide, and this one runs the training tests.
    script = (
        "from threadpoolctl import threadpool_info\n"
        "from service.server import limit_blas_threads\n"
        "limit_blas_threads()\n"
        "print(sorted({i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[1]"
