"""Latency of one 1024 x 1024 PNG: in-process steps (decode, preprocess, ORT, Grad-CAM overlay) next to
POST /predict and GET /explain against a real ``cxr-serve`` process over HTTP.

    .venv/bin/python tests/bench/bench_latency.py [--model-dir DIR] [--repeats 20] [--size 1024]

Without ``--model-dir`` a ResNet-18 bundle at 224 px with random weights is built in a temporary folder (the
weights do not change the cost). Run on demand; not collected by pytest.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script: make the repository importable (tests.fixtures, service) without installing it.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from service.model.bundle import ort_logits  # noqa: E402
from service.model.imaging import decode_image  # noqa: E402
from service.model.preprocess import preprocess  # noqa: E402
from service.predictor import Predictor  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.fixtures.images import png_bytes  # noqa: E402
from tests.fixtures.synthetic import make_xray  # noqa: E402


def build_bundle(out_dir: Path, input_size: int) -> Path:
    import torch

    from service.model.backbones import build, cam_layer_name
    from service.model.bundle import write_bundle
    from service.model.preprocess import PreprocessSpec

    torch.manual_seed(0)
    write_bundle(
        build("resnet18", 3),
        out_dir,
        name="bench-resnet18",
        arch="resnet18",
        classes=["COVID", "Normal", "Viral Pneumonia"],
        spec=PreprocessSpec(input_size),
        cam_layer=cam_layer_name("resnet18"),
    )
    return out_dir


def timed_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def in_process(model_dir: Path, data: bytes, repeats: int, providers: list[str]) -> dict[str, list[float]]:
    predictor = Predictor.load(model_dir, providers)
    predictor.warm_up()
    card = predictor.card
    print(
        f"model {card.name} ({card.arch} @ {card.input_size} px), in-process providers: "
        f"{','.join(predictor.providers)}",
        file=sys.stderr,
    )
    decoded = decode_image(data)
    batch = preprocess(decoded.array, predictor.card.spec)
    session = predictor.bundle.session
    results = {
        "decode": timed_ms(lambda: decode_image(data), repeats),
        "preprocess": timed_ms(lambda: preprocess(decoded.array, predictor.card.spec), repeats),
        "ort": timed_ms(lambda: ort_logits(session, batch), repeats),
        "decode+preprocess+ort": timed_ms(lambda: predictor.predict(decode_image(data)), repeats),
        "explain (Grad-CAM+overlay+PNG)": timed_ms(
            lambda: predictor.explanation(decoded, max_side=Settings().explain_max_side).png, max(3, repeats // 4)
        ),
    }
    return results


def over_http(model_dir: Path, data: bytes, repeats: int, providers: list[str]) -> dict[str, list[float]]:
    port = free_port()
    script = Path(sys.executable).with_name("cxr-serve")
    command = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "import sys; from service.cli import serve_main; sys.exit(serve_main())"]
    )
    env = {**os.environ, "CXR_PROVIDERS": ",".join(providers), "CXR_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen(
        [*command, "--port", str(port), "--model-dir", str(model_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=2.0)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("cxr-serve did not become ready")
            time.sleep(0.25)
        print(f"server providers: {','.join(ready.json()['providers'])}", file=sys.stderr)
        with httpx.Client(base_url=base, timeout=120.0) as http:
            server_total: list[float] = []
            ids: list[str] = []

            def post() -> None:
                response = http.post("/predict", files={"file": ("x.png", data, "image/png")})
                body = response.raise_for_status().json()
                server_total.append(body["timing_ms"]["total"])
                ids.append(body["id"])

            predict_ms = timed_ms(post, repeats)
            server_ms = server_total[-repeats:]
            explain_ms = timed_ms(
                lambda: http.get("/explain", params={"id": ids[-1]}).raise_for_status(), max(3, repeats // 4)
            )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    return {
        "POST /predict (client wall)": predict_ms,
        "POST /predict (server timing_ms.total)": server_ms,
        "GET /explain (client wall)": explain_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, help="bundle to measure (default: ResNet-18 @ 224 px)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per step (default: %(default)s)")
    parser.add_argument("--providers", default="CUDAExecutionProvider,CPUExecutionProvider")
    parser.add_argument("--no-server", action="store_true", help="in-process numbers only")
    args = parser.parse_args(argv)
    providers = args.providers.split(",")

    data = png_bytes(make_xray("COVID", args.size, np.random.default_rng(0)))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or build_bundle(Path(tmp) / "bundle", 224)
        rows = in_process(model_dir, data, args.repeats, providers)
        if not args.no_server:
            rows |= over_http(model_dir, data, args.repeats, providers)

    print(
        f"\n{args.size}x{args.size} PNG ({len(data) / 1024:.0f} KiB), {os.cpu_count()} CPU cores, "
        f"n={args.repeats} (explain n={max(3, args.repeats // 4)})"
    )
    print(f"{'step':<42} {'p50 ms':>9} {'p90 ms':>9}")
    for name, samples in rows.items():
        p90 = float(np.percentile(samples, 90))
        print(f"{name:<42} {statistics.median(samples):>9.1f} {p90:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
