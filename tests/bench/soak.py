"""Soak: N clients for T seconds against a real ``cxr-serve`` on loopback, mixed routes; errors, latency and the
server's memory over time.

    .venv/bin/python tests/bench/soak.py [--model-dir models/default] [--clients 8] [--seconds 600]

Each client loops: ``POST /predict`` (60 %), ``GET /explain`` of one of its earlier ids (25 %), ``GET /readyz``
(15 %), on six 1024 x 1024 PNGs: real X-rays from ../shared/data/cxr-dev resized (synthetic ones with the gate
off where that folder is missing). An error is any answer that is not 2xx, or no answer. RSS is the
server process's resident set (``/proc/PID/status``) at the start (after one request of each route), after
``--warmup`` seconds of load, in the middle and at the end, and its peak (sampled each second); growth is the end
over the after-warm-up figure. Run on demand; not collected by pytest.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from tests.fixtures.images import png_bytes  # noqa: E402
from tests.fixtures.server import running_server  # noqa: E402
from tests.fixtures.synthetic import make_xray  # noqa: E402

DEV_DATA = REPO_ROOT.parent / "shared" / "data" / "cxr-dev"
MIX = (("predict", 0.60), ("explain", 0.25), ("readyz", 0.15))


def rss_mb(pid: int) -> float:
    """Resident set of process ``pid`` in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


class Results:
    """Latencies and failures per route, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency_ms: dict[str, list[float]] = {route: [] for route, _ in MIX}
        self.errors: dict[str, Counter[str]] = {route: Counter() for route, _ in MIX}

    def add(self, route: str, ms: float, outcome: str | None) -> None:
        with self.lock:
            self.latency_ms[route].append(ms)
            if outcome is not None:
                self.errors[route][outcome] += 1


def client_loop(url: str, images: list[bytes], until: float, seed: int, results: Results) -> None:
    rng = random.Random(seed)
    ids: list[str] = []
    routes = [route for route, _ in MIX]
    weights = [weight for _, weight in MIX]
    with httpx.Client(base_url=url, timeout=60.0) as client:
        while time.monotonic() < until:
            route = rng.choices(routes, weights)[0]
            if route == "explain" and not ids:
                route = "predict"
            start = time.perf_counter()
            outcome: str | None = None
            try:
                if route == "predict":
                    files = {"file": ("x.png", rng.choice(images), "image/png")}
                    response = client.post("/predict", files=files)
                    if response.status_code == 200:
                        ids = [*ids[-7:], response.json()["id"]]
                elif route == "explain":
                    response = client.get("/explain", params={"id": rng.choice(ids)})
                else:
                    response = client.get("/readyz")
                if not 200 <= response.status_code < 300:
                    code = response.json().get("code", "") if "json" in response.headers.get("content-type", "") else ""
                    outcome = f"{response.status_code} {code}".strip()
            except httpx.HTTPError as err:
                outcome = type(err).__name__
            results.add(route, (time.perf_counter() - start) * 1000.0, outcome)


def test_images(size: int, count: int = 6) -> tuple[list[bytes], dict[str, str]]:
    """``count`` PNGs of ``size`` px: real X-rays from ../shared/data/cxr-dev (read, never copied) when it is
    there, else synthetic ones, which the shipped gate refuses, so the gate is turned off (the extra settings)."""
    from PIL import Image

    real = sorted(DEV_DATA.glob("*/*.png"))[:: max(1, len(list(DEV_DATA.glob("*/*.png"))) // count)][:count]
    if real:
        out = []
        for path in real:
            with Image.open(path) as image:
                gray = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR))
            out.append(png_bytes(gray))
        return out, {}
    rng = np.random.default_rng(0)
    labels = ("COVID", "Normal", "Viral Pneumonia")
    return [png_bytes(make_xray(labels[i % 3], size, rng)) for i in range(count)], {"CXR_GATE": "off"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds of load before the RSS that growth is measured from"
    )
    args = parser.parse_args()

    images, env = test_images(args.image_size)
    with tempfile.TemporaryDirectory(prefix="cxr-soak-") as tmp:
        log = Path(tmp) / "serve.log"
        with running_server(args.model_dir, log, CXR_LOG_LEVEL="WARNING", **env) as server:
            process, url = server.process, server.url
            with httpx.Client(base_url=url, timeout=60.0) as client:
                ident = client.post("/predict", files={"file": ("x.png", images[0], "image/png")}).json()["id"]
                client.get("/explain", params={"id": ident})
            rss = {"start": rss_mb(process.pid)}
            results = Results()
            until = time.monotonic() + args.seconds
            threads = [
                threading.Thread(target=client_loop, args=(url, images, until, seed, results), daemon=True)
                for seed in range(args.clients)
            ]
            for thread in threads:
                thread.start()
            started, peak = time.monotonic(), rss["start"]
            for mark, at in (("warm", args.warmup), ("mid", (args.warmup + args.seconds) / 2)):
                while time.monotonic() - started < at:
                    time.sleep(1.0)
                    peak = max(peak, rss_mb(process.pid))
                rss[mark] = rss_mb(process.pid)
            while any(thread.is_alive() for thread in threads):
                time.sleep(1.0)
                peak = max(peak, rss_mb(process.pid))
            rss["end"], rss["peak"] = rss_mb(process.pid), peak

    print(f"\nsoak: {args.clients} clients, {args.seconds:.0f} s, {args.model_dir}, {args.image_size} px PNG")
    print("| route | requests | errors | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    total_errors = 0
    for route, _ in MIX:
        latencies = results.latency_ms[route]
        errors = results.errors[route]
        total_errors += sum(errors.values())
        shown = ", ".join(f"{n}x {what}" for what, n in errors.most_common()) or "0"
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        print(f"| {route} | {len(latencies)} | {shown} | {p50:.0f} | {p99:.0f} |")
    growth = 100.0 * (rss["end"] - rss["warm"]) / rss["warm"] if rss["warm"] else float("nan")
    print(
        f"\nRSS MB: start {rss['start']:.0f}, after {args.warmup:.0f} s warm-up {rss['warm']:.0f}, mid "
        f"{rss['mid']:.0f}, end {rss['end']:.0f}, peak {rss['peak']:.0f} (end vs after warm-up {growth:+.1f} %, "
        f"target <= 10 %); errors {total_errors}"
    )
    return 0 if total_errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
