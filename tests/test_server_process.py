"""``cxr-serve`` as a real process on a free port, spoken to over HTTP with httpx."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import CLASSES_3, png_to_array, xray_png

STARTUP_TIMEOUT_S = 120.0  # imports torch + onnxruntime and verifies the bundle; slow on a busy 2-core box


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command() -> list[str]:
    script = Path(sys.executable).with_name("cxr-serve")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from service.cli import serve_main; sys.exit(serve_main())"]


def wait_until_ready(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"cxr-serve exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"cxr-serve was not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text(errors='replace')}")


def test_cxr_serve_process_answers_predict_and_explain(bundle_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = {**os.environ, "CXR_PROVIDERS": "CPUExecutionProvider", "CXR_EXPLAIN_MAX_SIDE": "128"}
    command = [*serve_command(), "--host", "127.0.0.1", "--port", str(port), "--model-dir", str(bundle_dir),
               "--log-format", "json"]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_ready(base_url, process, log)
        with httpx.Client(base_url=base_url, timeout=30.0) as http:
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
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the status says how it ended.
    assert process.returncode in (0, -signal.SIGTERM), log.read_text(errors="replace")

    text = log.read_text(errors="replace")
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    access = {(r["method"], r["route"], r["status"]) for r in records if r["logger"] == "service.access"}
    assert {("POST", "/predict", 200), ("GET", "/explain", 200), ("GET", "/explain", 404)} <= access
    assert all(len(r["model_sha"]) == 12 for r in records if r["logger"] == "service.access")
    assert "Jane_Roe" not in text and body["id"] not in text
