"""Soak: N clients for T seconds against a real ``cxr-serve`` on loopback, mixed routes; errors, latency and the
server's memory over time.

    .venv/bin/python tests/bench/soak.py [--model-dir models/default] [--clients 8] [--seconds 600]

Each client loops: ``POST /predict`` (60 %), ``GET /explain`` of one of its earlier ids (25 %), ``GET /readyz``
(15 %), on six 1024 x 1024 PNGs: real X-rays from ../shared/data/cxr-dev resized (synthetic ones with the gate
off where that folder is missing). An error is any answer that is not 2xx, or no answer. RSS is the
server process's resident set (``/proc/PID/status``), sampled each second with what the prediction store holds
(``cxr_store_bytes`` of ``/metrics``). The store is bounded (``--store-max-items``, ``--store-max-bytes``) but
fills under load, so warm-up ends after ``--warmup`` seconds *and* once the store is full (its last item
stored); growth is the end over that figure, of RSS and of RSS less the store. Run on demand; not collected by
pytest.
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
from dataclasses import dataclass
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
MB = float(1 << 20)
IDLE_SETTLE_S = 2.0  # after the last answer, before an idle RSS is read
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
        self.paused = threading.Event()  # set: clients send nothing new (an idle moment to read RSS)
        self.in_flight = 0

    def begin(self) -> None:
        while self.paused.is_set():
            time.sleep(0.05)
        with self.lock:
            self.in_flight += 1

    def add(self, route: str, ms: float, outcome: str | None) -> None:
        with self.lock:
            self.in_flight -= 1
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
            results.begin()
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


@dataclass(frozen=True)
class Sample:
    """The server at one moment: seconds into the load, RSS MB, store items and MB."""

    t: float
    rss: float
    items: int
    store: float

    @property
    def rest(self) -> float:
        """RSS less what the store holds."""
        return self.rss - self.store


def store_gauges(client: httpx.Client) -> tuple[int, float]:
    """``cxr_store_items`` and ``cxr_store_bytes`` (as MB) from /metrics."""
    values = {}
    for line in client.get("/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("cxr_store_items", "cxr_store_bytes"):
            values[name] = float(value)
    return int(values["cxr_store_items"]), values["cxr_store_bytes"] / MB


def is_full(sample: Sample, max_items: int, max_mb: float, item_mb: float) -> bool:
    """Whether the store has no room for one more item."""
    return sample.items >= max_items or sample.store + item_mb > max_mb


def warm_index(samples: list[Sample], warmup_s: float, max_items: int, max_mb: float, item_mb: float) -> int:
    """The first sample after ``warmup_s`` with the store full, else the first after ``warmup_s``."""
    after = [i for i, sample in enumerate(samples) if sample.t >= warmup_s]
    for i in after:
        if is_full(samples[i], max_items, max_mb, item_mb):
            return i
    return after[0] if after else len(samples) - 1


def idle_rss(pid: int, results: Results) -> float:
    """RSS with nothing in flight: pause the clients, let the last answers go out, read it, resume."""
    results.paused.set()
    deadline = time.monotonic() + 60.0
    while results.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(IDLE_SETTLE_S)
    rss = rss_mb(pid)
    results.paused.clear()
    return rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--warmup", type=float, default=60.0, help="least seconds of load before the growth baseline")
    parser.add_argument("--store-max-items", type=int, default=256, help="CXR_STORE_MAX_ITEMS of the server")
    parser.add_argument("--store-max-bytes", type=int, default=512 << 20, help="CXR_STORE_MAX_BYTES of the server")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="more server settings")
    args = parser.parse_args()

    images, env = test_images(args.image_size)
    env |= {"CXR_STORE_MAX_ITEMS": str(args.store_max_items), "CXR_STORE_MAX_BYTES": str(args.store_max_bytes)}
    env |= dict(item.split("=", 1) for item in args.env)
    samples: list[Sample] = []
    idle_warm: float | None = None
    with tempfile.TemporaryDirectory(prefix="cxr-soak-") as tmp:
        log = Path(tmp) / "serve.log"
        with running_server(args.model_dir, log, CXR_LOG_LEVEL="WARNING", **env) as server:
            process, url = server.process, server.url
            with httpx.Client(base_url=url, timeout=60.0) as client:
                ident = client.post("/predict", files={"file": ("x.png", images[0], "image/png")}).json()["id"]
                client.get("/explain", params={"id": ident})
                start_rss, (_, item_mb) = rss_mb(process.pid), store_gauges(client)
                bounds = (args.store_max_items, args.store_max_bytes / MB, item_mb)
                results = Results()
                until = time.monotonic() + args.seconds
                threads = [
                    threading.Thread(target=client_loop, args=(url, images, until, seed, results), daemon=True)
                    for seed in range(args.clients)
                ]
                for thread in threads:
                    thread.start()
                started = time.monotonic()
                while any(thread.is_alive() for thread in threads):
                    time.sleep(1.0)
                    items, store = store_gauges(client)
                    samples.append(Sample(time.monotonic() - started, rss_mb(process.pid), items, store))
                    if idle_warm is None and samples[-1].t >= args.warmup and is_full(samples[-1], *bounds):
                        idle_warm = idle_rss(process.pid, results)
                time.sleep(IDLE_SETTLE_S)
                idle_end = rss_mb(process.pid)

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

    print("\n| s | RSS MB | store items | store MB | RSS less store MB |")
    print("|---|---|---|---|---|")
    for sample in samples[:: max(1, len(samples) // 20)] + samples[-1:]:
        print(f"| {sample.t:.0f} | {sample.rss:.0f} | {sample.items} | {sample.store:.0f} | {sample.rest:.0f} |")
    warm = samples[warm_index(samples, args.warmup, *bounds)]
    end, peak = samples[-1], max(sample.rss for sample in samples)
    full = "full" if is_full(warm, *bounds) else "NOT full"
    growth = 100.0 * (end.rss - warm.rss) / warm.rss
    rest_growth = 100.0 * (end.rest - warm.rest) / warm.rest
    print(
        f"\nRSS MB: start {start_rss:.0f}; warm at {warm.t:.0f} s (store {full}: {warm.items} items, "
        f"{warm.store:.0f} MB) {warm.rss:.0f}; end {end.rss:.0f}; peak {peak:.0f}. Growth end vs warm: RSS "
        f"{growth:+.1f} % (target <= 10 %), RSS less store {rest_growth:+.1f} %; errors {total_errors}"
    )
    if idle_warm is not None:
        print(
            f"RSS MB with nothing in flight (same store): after warm-up {idle_warm:.0f}, at the end {idle_end:.0f} "
            f"({100.0 * (idle_end - idle_warm) / idle_warm:+.1f} %)"
        )
    return 0 if total_errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
