"""The service's cost, in one run and one table: in-process b1/b8, HTTP /predict single client (p50/p99, from
httpx and from a lean client that costs the shared cores less, with each client's CPU) and 8 concurrent clients,
GET and POST /explain, cold start, ORT against the FLOP limit of the network, and the ratios the issue sets
targets for.

    .venv/bin/python tests/bench/bench_service.py [--model-dir DIR | --reexport DIR] [--repeats 30] [--workers 2]
        [--int8 DIR]

Without a bundle option a ResNet-18 at 224 px with random weights is built in a temporary folder (weights do
not change the cost). ``--reexport models/default`` writes that bundle's weights again with this version's
exporter (so the graph has the CAM activations output) into a temporary folder and measures that. ``--workers N``
adds a row for N uvicorn worker processes (ORT threads split between them). Run on demand; not collected by
pytest. The image is one 1024 x 1024 8-bit PNG, or ``--image FILE``: a shipped bundle's gate refuses the synthetic
one, so measure ``--model-dir models/default`` with a real chest X-ray.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from service.model.bundle import cpu_limit, load_bundle, ort_logits, read_card  # noqa: E402
from service.model.imaging import decode_image  # noqa: E402
from service.model.preprocess import preprocess  # noqa: E402
from service.predictor import Predictor  # noqa: E402
from service.server import limit_blas_threads  # noqa: E402
from tests.fixtures.images import png_bytes  # noqa: E402
from tests.fixtures.server import free_port  # noqa: E402
from tests.fixtures.synthetic import make_xray  # noqa: E402

CPU = ["CPUExecutionProvider"]
CLIENTS = 8


def build_bundle(out_dir: Path) -> Path:
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
        spec=PreprocessSpec(224),
        cam_layer=cam_layer_name("resnet18"),
    )
    return out_dir


def reexport(source: Path, out_dir: Path) -> Path:
    """``source``'s weights and card settings written as a bundle by this version's write_bundle (no gate)."""
    from service.model.backbones import build
    from service.model.bundle import WEIGHTS_FILE, write_bundle

    card = read_card(source)
    write_bundle(
        build(card.arch, len(card.classes), source / WEIGHTS_FILE),
        out_dir,
        name=card.name,
        arch=card.arch,
        classes=card.classes,
        spec=card.spec,
        cam_layer=card.cam_layer,
        version=card.version,
        temperature=card.temperature,
        decision=card.decision,
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


def alternating_ms(*fns: Callable[[], object], repeats: int, warmup: int = 2) -> list[list[float]]:
    """The callables timed in turn, ``repeats`` times each: a slow spell of a shared machine hits them alike, so
    their ratios are steadier than blocks timed one after the other."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(warmup):
        for fn in fns:
            fn()
    for _ in range(repeats):
        for fn, out in zip(fns, samples, strict=True):
            out += timed_ms(fn, 1, warmup=0)
    return samples


class LeanClient:
    """POST /predict with the multipart body encoded once, over one keep-alive ``http.client`` connection: what a
    client on another machine costs the server's cores (nothing), as near as a client on the same cores can get.
    httpx builds the body and the request anew each time (1.4-2.1 ms of this machine's 2 cores)."""

    BOUNDARY = "cxr-bench-boundary"

    def __init__(self, url: str, data: bytes) -> None:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300.0)
        self.body = (
            f'--{self.BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + data
            + f"\r\n--{self.BOUNDARY}--\r\n".encode()
        )
        self.headers = {"Content-Type": f"multipart/form-data; boundary={self.BOUNDARY}"}

    def post(self) -> dict[str, object]:
        self.connection.request("POST", "/predict", body=self.body, headers=self.headers)
        response = self.connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"{response.status} {payload[:200]!r}")
        return json.loads(payload)

    def close(self) -> None:
        self.connection.close()


def cpu_ms_per_call(fn: Callable[[], object], repeats: int) -> float:
    """CPU ms this process (the client alone: the server is another process) spends per call of ``fn``."""
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return 1000.0 * (time.process_time() - start) / repeats


def network_flops(predictor: Predictor) -> float:
    """FLOPs of one forward pass at batch 1 (torch's FLOP counter on the torch copy)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = predictor.bundle.torch_model
    assert model is not None
    size = predictor.card.input_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def sgemm_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    """The CPU's achievable fp32 FLOP/s: the best of a few n x n matrix products (BLAS, all threads)."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    with threadpool_limits(limits=cpu_limit(), user_api="blas"):  # the machine's rate, not one BLAS thread's
        a @ a
        best = min(timed_ms(lambda: a @ a, repeats, warmup=1)) / 1000.0
    return 2.0 * n**3 / best


@contextmanager
def server(model_dir: Path, env: dict[str, str], workers: int = 1) -> Iterator[tuple[str, float, float]]:
    """A real server on a free port; yields its URL, the seconds from start to /readyz 200, and to the end of
    its torch reference check (run after ready with the onnx engine; the timings wait for it: it takes CPU)."""
    port = free_port()
    if workers == 1:
        script = Path(sys.executable).with_name("cxr-serve")
        command = [str(script), "--port", str(port), "--model-dir", str(model_dir)]
    else:  # several processes: uvicorn's own workers over the app factory (settings from CXR_*)
        command = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--port", str(port)]
        command += ["--workers", str(workers), "--no-access-log", "--log-level", "warning"]
    full_env = {
        **os.environ,
        "CXR_PROVIDERS": ",".join(CPU),
        "CXR_LOG_LEVEL": "WARNING",
        "CXR_MODEL_DIR": str(model_dir),
    }
    start = time.monotonic()
    process = subprocess.Popen(
        command, env={**full_env, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() - start > 300:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.05)
        ready_s = time.monotonic() - start
        while (check := httpx.get(f"{url}/readyz", timeout=2.0).json().get("reference_check")) == "pending":
            time.sleep(0.2)
        if check == "failed":
            raise RuntimeError("the torch reference check failed")
        yield url, ready_s, time.monotonic() - start
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def concurrent_images_per_s(url: str, data: bytes, per_client: int) -> tuple[float, float]:
    """Images/s of CLIENTS clients posting ``per_client`` images each, back to back, and the CPU ms per image
    that the clients themselves (threads of this process, on the same cores as the server) used."""
    barrier = threading.Barrier(CLIENTS + 1)
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=300.0) as http:
            http.post("/predict", files={"file": ("x.png", data, "image/png")})  # connection + warm-up
            barrier.wait()
            for _ in range(per_client):
                response = http.post("/predict", files={"file": ("x.png", data, "image/png")})
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start, start_cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.join()
    elapsed, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return CLIENTS * per_client / elapsed, 1000.0 * cpu_s / (CLIENTS * per_client)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model-dir", type=Path, help="bundle to measure as it is")
    source.add_argument("--reexport", type=Path, help="bundle whose weights are exported again and measured")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per single-client row")
    parser.add_argument("--workers", type=int, default=0, help="also measure N uvicorn worker processes")
    parser.add_argument(
        "--image", type=Path, help="the image to send (default: a synthetic 1024 px X-ray, which a real gate refuses)"
    )
    parser.add_argument("--int8", type=Path, help="also measure this int8 bundle's ORT b1/b8 (cxr-train quantize)")
    args = parser.parse_args(argv)
    data = args.image.read_bytes() if args.image else png_bytes(make_xray("COVID", 1024, np.random.default_rng(0)))
    rows: list[tuple[str, str, str]] = []  # what, value, note

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is not None:
            model_dir = args.model_dir
        elif args.reexport is not None:
            model_dir = reexport(args.reexport, Path(tmp) / "bundle")
        else:
            model_dir = build_bundle(Path(tmp) / "bundle")
        card = read_card(model_dir)

        limit_blas_threads()  # as cxr-serve does: the in-process figures run what the server runs
        predictor = Predictor.load(model_dir, CPU)
        predictor.warm_up()
        batch1 = preprocess(decode_image(data).array, card.spec)
        batch8 = np.concatenate([batch1] * CLIENTS)
        session = predictor.bundle.session

        def in_process() -> None:
            predictor.predict(decode_image(data))

        b8 = timed_ms(
            lambda: predictor.forward(preprocess([decode_image(data).array for _ in range(CLIENTS)], card.spec)),
            max(3, args.repeats // 4),
        )
        ort1 = timed_ms(lambda: ort_logits(session, batch1), args.repeats)
        ort8 = timed_ms(lambda: ort_logits(session, batch8), max(3, args.repeats // 4))
        flops = network_flops(predictor)
        peak = sgemm_flops_per_s()
        in_b8_ips = CLIENTS * 1000.0 / statistics.median(b8)
        ort8_flops = CLIENTS * flops / (statistics.median(ort8) / 1000.0)
        rows += [
            ("in-process b8 (decode+preprocess+ORT b8)", f"{in_b8_ips:.1f} img/s", f"{statistics.median(b8):.0f} ms"),
            ("ORT b1 / b8 p50", f"{statistics.median(ort1):.1f} / {statistics.median(ort8):.0f} ms", ""),
        ]
        if args.int8 is not None:
            int8 = load_bundle(args.int8, CPU, with_torch=False).session
            # fp32 and int8 in turn, so the ratio is not a slow spell of the machine.
            fp32_1, int8_1 = alternating_ms(
                lambda: ort_logits(session, batch1), lambda: ort_logits(int8, batch1), repeats=args.repeats
            )
            fp32_8, int8_8 = alternating_ms(
                lambda: ort_logits(session, batch8), lambda: ort_logits(int8, batch8), repeats=max(5, args.repeats // 2)
            )
            rows += [
                (
                    "ORT int8 b1 / b8 p50",
                    f"{statistics.median(int8_1):.1f} / {statistics.median(int8_8):.0f} ms",
                    f"{statistics.median(fp32_1) / statistics.median(int8_1):.2f}x / "
                    f"{statistics.median(fp32_8) / statistics.median(int8_8):.2f}x fp32 throughput (timed in turn)",
                )
            ]
        rows += [
            (
                "ORT b8 vs the FLOP limit",
                f"{ort8_flops / peak:.2f}x",
                f"{flops / 1e9:.2f} GFLOP/img, ORT {ort8_flops / 1e9:.0f} GFLOP/s, sgemm {peak / 1e9:.0f} GFLOP/s",
            ),
        ]

        with server(model_dir, {}) as (url, cold_s, checked_s), httpx.Client(base_url=url, timeout=300.0) as http:
            ready = http.get("/readyz").json()
            ids: list[str] = []

            def post() -> None:
                ids.append(http.post("/predict", files={"file": ("x.png", data, "image/png")}).json()["id"])

            lean = LeanClient(url, data)
            # In turn with the in-process pipeline (the server idles meanwhile: its ORT threads do not spin).
            b1, single, lean_single = alternating_ms(in_process, post, lean.post, repeats=args.repeats)
            lean_cpu = cpu_ms_per_call(lean.post, args.repeats)
            httpx_cpu = cpu_ms_per_call(post, args.repeats)
            lean.close()
            get_explain = timed_ms(
                lambda: http.get("/explain", params={"id": ids[-1]}).raise_for_status(), args.repeats
            )
            post_explain = timed_ms(
                lambda: http.post("/explain", files={"file": ("x.png", data, "image/png")}).raise_for_status(),
                max(3, args.repeats // 3),
            )
            http_ips, client_cpu_ms = concurrent_images_per_s(url, data, max(2, args.repeats // 4))
        in_b1, p50, p99 = statistics.median(b1), statistics.median(single), float(np.percentile(single, 99))
        lean_p50, lean_p99 = statistics.median(lean_single), float(np.percentile(lean_single, 99))
        get_p50, post_p50 = statistics.median(get_explain), statistics.median(post_explain)
        rows += [
            ("cold start to /readyz 200", f"{cold_s:.1f} s", f"explain engine {ready['explain_engine']}"),
            (
                "cold start to the torch reference check done",
                f"{checked_s:.1f} s",
                "after ready, in a child process at nice 10",
            ),
            (
                "in-process b1 (decode+preprocess+ORT) p50",
                f"{in_b1:.1f} ms",
                f"{1000.0 / in_b1:.1f} img/s, timed in turn with POST /predict",
            ),
            (
                "POST /predict 1 client p50 / p99 (httpx)",
                f"{p50:.1f} / {p99:.1f} ms",
                f"{p50 / in_b1:.2f}x in-process b1; client CPU {httpx_cpu:.1f} ms a request",
            ),
            (
                "POST /predict 1 client p50 / p99 (lean client)",
                f"{lean_p50:.1f} / {lean_p99:.1f} ms",
                f"{lean_p50 / in_b1:.2f}x in-process b1; client CPU {lean_cpu:.1f} ms a request",
            ),
            (f"POST /predict {CLIENTS} clients", f"{http_ips:.1f} img/s", f"{http_ips / in_b8_ips:.2f}x in-process b8"),
            (f"  CPU of the {CLIENTS} clients per image", f"{client_cpu_ms:.1f} ms", "on the server's cores"),
            ("GET /explain p50", f"{get_p50:.1f} ms", f"{get_p50 / p50:.2f}x /predict p50"),
            ("POST /explain p50", f"{post_p50:.1f} ms", f"{post_p50 / p50:.2f}x /predict p50"),
        ]
        with server(model_dir, {"CXR_BATCH_MAX_SIZE": str(CLIENTS)}) as (url, _, _):
            on_ips, _ = concurrent_images_per_s(url, data, max(2, args.repeats // 4))
        rows.append(
            (f"POST /predict {CLIENTS} clients, batching on", f"{on_ips:.1f} img/s", f"{on_ips / in_b8_ips:.2f}x b8")
        )
        with (
            server(model_dir, {"CXR_EXPLAIN_ENGINE": "torch"}) as (url, torch_cold_s, _),
            httpx.Client(base_url=url) as http,
        ):
            body = http.post("/predict", files={"file": ("x.png", data, "image/png")}, timeout=300.0).json()
            torch_get = statistics.median(
                timed_ms(
                    lambda: http.get("/explain", params={"id": body["id"]}, timeout=300.0).raise_for_status(),
                    max(3, args.repeats // 3),
                )
            )
        rows.append(("GET /explain p50, torch engine", f"{torch_get:.1f} ms", f"{torch_get / p50:.2f}x /predict p50"))
        rows.append(("cold start to /readyz 200, torch engine", f"{torch_cold_s:.1f} s", "reference checked first"))
        if args.workers > 1:
            threads = str(max(1, cpu_limit() // args.workers))
            with server(model_dir, {"CXR_ORT_THREADS": threads}, workers=args.workers) as (url, _, _):
                workers_ips, _ = concurrent_images_per_s(url, data, max(2, args.repeats // 4))
            rows.append(
                (
                    f"POST /predict {CLIENTS} clients, {args.workers} workers x {threads} threads",
                    f"{workers_ips:.1f} img/s",
                    f"{workers_ips / in_b8_ips:.2f}x in-process b8",
                )
            )

    print(
        f"\n{card.name} ({card.arch} @ {card.input_size} px), 1024x1024 PNG ({len(data) / 1024:.0f} KiB), "
        f"CPUExecutionProvider, CPU limit {cpu_limit()} (os.cpu_count {os.cpu_count()}), n={args.repeats}"
    )
    width = max(len(what) for what, _, _ in rows)
    print(f"{'':<{width}}  {'value':>18}  note")
    for what, value, note in rows:
        print(f"{what:<{width}}  {value:>18}  {note}")
    print(json.dumps({what: value for what, value, _ in rows}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
