"""Hostile load against a real ``cxr-serve`` on loopback: bombs, stalls and slow uploads, one case at a time, while a
prober asks ``/readyz`` every 50 ms.

    .venv/bin/python tests/bench/hostile.py [--model-dir models/default] [--stalled 50]

Cases: a deflated DICOM that inflates to 1 GiB (about 1 MB sent), four concurrent 6000 x 6000 1-bit PNGs (4 KiB
each, 144 MB once decoded), ``--stalled`` connections that send half their headers, as many that send their headers
and part of a body, and one upload trickled at 1 KB/s. Per case: the answers, the server's peak RSS over its RSS
just before the case (sampled every 20 ms), the slowest ``/readyz`` and how many were not 200 within 100 ms, and
for the stalls the time until the server closed each connection against the configured timeout. Run on demand;
not collected by pytest.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from tests.bench.soak import rss_mb  # noqa: E402
from tests.fixtures.hostile import deflate_bomb_dicom, one_bit_png  # noqa: E402
from tests.fixtures.server import running_server  # noqa: E402

HEADER_TIMEOUT_S = 5.0
BODY_IDLE_TIMEOUT_S = 5.0
MIN_UPLOAD_BYTES_PER_S = 16 * 1024
READYZ_BUDGET_MS = 100.0


class Watch:
    """During one case: the server's peak RSS (every 20 ms) and /readyz latency (every 50 ms)."""

    def __init__(self, url: str, pid: int) -> None:
        self.url, self.pid = url, pid
        self.base = rss_mb(pid)
        self.peak = self.base
        self.readyz_ms: list[float] = []
        self.readyz_bad = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample, daemon=True), threading.Thread(target=self._probe)]

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)

    def _probe(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    ok = client.get("/readyz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                ms = (time.perf_counter() - start) * 1000.0
                self.readyz_ms.append(ms)
                self.readyz_bad += int(not ok or ms > READYZ_BUDGET_MS)
                time.sleep(0.05)

    def __enter__(self) -> Watch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        time.sleep(0.2)  # a sample after the case
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _post_head(path: str, length: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", f"Content-Length: {length}"]
    lines += ["Content-Type: multipart/form-data; boundary=xyz"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


_PART = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'


def _until_closed(sock: socket.socket, limit_s: float) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (or ``limit_s``) and what it sent first."""
    start = time.monotonic()
    sock.settimeout(0.25)
    first = b""
    while time.monotonic() - start < limit_s:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        first = first or chunk
    return time.monotonic() - start, first


def stalled(url: str, count: int, opening: bytes, limit_s: float) -> tuple[list[float], Counter[str]]:
    """``count`` connections that send ``opening`` and then nothing; how long each stays open, how each ends."""
    socks = [socket.create_connection(_address(url), timeout=10) for _ in range(count)]
    for sock in socks:
        sock.sendall(opening)
    with ThreadPoolExecutor(count) as pool:
        ends = list(pool.map(lambda s: _until_closed(s, limit_s), socks))
    for sock in socks:
        sock.close()
    outcomes = Counter(first.split(b"\r\n", 1)[0].decode(errors="replace") or "closed, no answer" for _, first in ends)
    return [seconds for seconds, _ in ends], outcomes


def trickle(url: str, bytes_per_s: int, limit_s: float) -> tuple[list[float], Counter[str]]:
    """One upload that sends ``bytes_per_s`` a second until the server answers or closes."""
    with socket.create_connection(_address(url), timeout=10) as sock:
        sock.sendall(_post_head("/predict", 1_000_000) + _PART)
        sock.settimeout(0.25)
        start = time.monotonic()
        answer = b""
        while time.monotonic() - start < limit_s and not answer:
            try:
                sock.sendall(b"x" * (bytes_per_s // 4))
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - start
    return [elapsed], Counter([answer.split(b"\r\n", 1)[0].decode(errors="replace") or "closed, no answer"])


def uploads(url: str, data: bytes, name: str, concurrent: int) -> Counter[str]:
    def one(_: int) -> str:
        response = httpx.post(f"{url}/predict", files={"file": (name, data, "application/octet-stream")}, timeout=120)
        return f"{response.status_code} {response.json().get('code', '')}".strip()

    with ThreadPoolExecutor(concurrent) as pool:
        return Counter(pool.map(one, range(concurrent)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--stalled", type=int, default=50, help="connections per stall case")
    args = parser.parse_args()

    bomb = deflate_bomb_dicom(1 << 30)
    tiny_big = one_bit_png(6000, 6000)
    env = {
        "CXR_LOG_LEVEL": "WARNING",
        "CXR_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "CXR_BODY_IDLE_TIMEOUT_S": str(BODY_IDLE_TIMEOUT_S),
        "CXR_MIN_UPLOAD_BYTES_PER_S": str(MIN_UPLOAD_BYTES_PER_S),
    }
    slow_limit = 5.0 + 30.0  # the rate applies after the 5 s grace; then a few seconds to fall below it
    cases: list[tuple[str, Callable[[str], tuple[list[float], Counter[str]] | Counter[str]], float | None]] = [
        (f"deflate bomb ({len(bomb) >> 10} KiB -> 1 GiB)", lambda u: uploads(u, bomb, "x.dcm", 1), None),
        ("4 x 6000x6000 1-bit PNG (4 KiB each)", lambda u: uploads(u, tiny_big, "x.png", 4), None),
        (
            f"{args.stalled} stalled headers",
            lambda u: stalled(u, args.stalled, b"GET /healthz HTTP/1.1\r\nHost: local", HEADER_TIMEOUT_S * 4),
            HEADER_TIMEOUT_S,
        ),
        (
            f"{args.stalled} stalled bodies",
            lambda u: stalled(u, args.stalled, _post_head("/predict", 1_500_000) + _PART, BODY_IDLE_TIMEOUT_S * 4),
            BODY_IDLE_TIMEOUT_S,
        ),
        ("1 upload at 1 KB/s", lambda u: trickle(u, 1000, slow_limit), slow_limit),
    ]
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="cxr-hostile-") as tmp,
        running_server(args.model_dir, Path(tmp) / "serve.log", **env) as server,
    ):
        process, url = server.process, server.url
        httpx.post(f"{url}/predict", files={"file": ("x.png", tiny_big, "image/png")}, timeout=120)  # warm up
        for name, run, timeout_s in cases:
            with Watch(url, process.pid) as watch:
                outcome = run(url)
            durations, answers = outcome if isinstance(outcome, tuple) else ([], outcome)
            closed = "-"
            if timeout_s is not None and durations:
                within = sum(d <= timeout_s + 1.0 for d in durations)
                closed = f"{within}/{len(durations)} (max {max(durations):.1f} s, limit {timeout_s:.0f} s)"
            rows.append(
                (
                    name,
                    ", ".join(f"{n}x {what}" for what, n in answers.most_common()),
                    watch.peak - watch.base,
                    max(watch.readyz_ms, default=float("nan")),
                    f"{watch.readyz_bad}/{len(watch.readyz_ms)}",
                    closed,
                )
            )

    print(f"\nhostile: {args.model_dir}; header/body timeouts {HEADER_TIMEOUT_S:g}/{BODY_IDLE_TIMEOUT_S:g} s")
    print(
        "| case | answers | peak RSS over base MB | slowest /readyz ms | /readyz not 200 in 100 ms | closed in time |"
    )
    print("|---|---|---|---|---|---|")
    for name, answers_text, peak, slowest, bad, closed in rows:
        print(f"| {name} | {answers_text} | {peak:+.0f} | {slowest:.0f} | {bad} | {closed} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
