"""Hostile load against a real ``cxr-serve`` on loopback: bombs, stalls and slow uploads, one case at a time, while a
prober asks ``/readyz`` every 50 ms.

    .venv/bin/python tests/bench/hostile.py [--model-dir models/default] [--stalled 50] [--storm-clients 60]
        [--storm-seconds 30] [--only storm] [--env NAME=VALUE]

Cases: a deflated DICOM that inflates to 1 GiB (about 1 MB sent), four concurrent 6000 x 6000 1-bit PNGs (4 KiB
each, 144 MB once decoded), ``--stalled`` connections that send half their headers, as many that send their headers
and part of a body, one upload trickled at 1 KB/s, and two storms of ``--storm-clients`` clients for
``--storm-seconds``: ``GET /explain`` of stored 1024 x 1024 predictions, and ``POST /explain`` of those images
(decode, predict and explain per request); storm clients run in a process of their own and wait a 503's
``Retry-After`` before trying again. Per case: the answers, the server's peak RSS over its RSS just before
the case (sampled every 20 ms), the slowest ``/readyz`` and ``/healthz`` (each asked every 50 ms) and how many
``/readyz`` were not 200 within 100 ms, and for the stalls the time until the server closed each connection
against the configured timeout. Run on demand; not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from tests.bench.soak import rss_mb, test_images  # noqa: E402
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
        self.healthz_ms: list[float] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._sample, daemon=True),
            threading.Thread(target=self._probe, args=("/readyz", self.readyz_ms)),
            # /healthz runs no dependency and no thread: the event loop's own delay, against /readyz's.
            threading.Thread(target=self._probe, args=("/healthz", self.healthz_ms)),
        ]

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)

    def _probe(self, path: str, times_ms: list[float]) -> None:
        """Poll ``path`` every 50 ms, recording each answer's time (inf for anything but a 200)."""
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    ok = client.get(path).status_code == 200
                except httpx.HTTPError:
                    ok = False
                times_ms.append((time.perf_counter() - start) * 1000.0 if ok else float("inf"))
                time.sleep(0.05)

    @property
    def readyz_bad(self) -> int:
        """/readyz answers that failed or took longer than the budget."""
        return sum(ms > READYZ_BUDGET_MS for ms in self.readyz_ms)

    def __enter__(self) -> Watch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        time.sleep(0.2)  # a sample after the case
        self._stop.set()
        for thread in self._threads:
            thread.join()


def slowest_in_server(log: Path, start: int, route: str) -> float:
    """The longest ``latency_ms`` that the server's JSON access log (from byte ``start`` on) records for
    ``route``: the time inside the app, from the parsed request to the response; what a client sees beyond it was
    spent in the kernel, waiting for the event loop, or in the client itself."""
    with log.open("rb") as fh:
        fh.seek(start)
        lines = fh.read().splitlines()
    latencies = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("route") == route and "latency_ms" in record:
            latencies.append(float(record["latency_ms"]))
    return max(latencies, default=float("nan"))


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


def _storm_client(url: str, until: float, route: str, payloads: list[str] | list[bytes], seed: int) -> Counter[str]:
    """One storm client: ``route`` requests one after another until ``until``; a 503 waits its Retry-After (as a
    client that follows HTTP does: the storm is 60 requests in the service, not a retry flood)."""
    answers: Counter[str] = Counter()
    with httpx.Client(base_url=url, timeout=120.0) as client:
        for n in range(seed, 1 << 62):
            if time.monotonic() >= until:
                break
            payload = payloads[n % len(payloads)]
            try:
                if route == "GET /explain":
                    response = client.get("/explain", params={"id": payload})
                else:
                    response = client.post("/explain", files={"file": ("x.png", payload, "image/png")})
            except httpx.HTTPError as err:
                answers[type(err).__name__] += 1
                continue
            code = response.json().get("code", "") if response.status_code != 200 else ""
            answers[f"{response.status_code} {code}".strip()] += 1
            if response.status_code == 503:
                time.sleep(float(response.headers.get("retry-after", "1")))
    return answers


def storm_clients(
    url: str, clients: int, seconds: float, route: str, payloads: list[str] | list[bytes]
) -> Counter[str]:
    """``clients`` storm clients (threads) for ``seconds``; their answers."""
    until = time.monotonic() + seconds
    with ThreadPoolExecutor(clients) as pool:
        done = pool.map(lambda seed: _storm_client(url, until, route, payloads, seed), range(clients))
        return sum(done, Counter())


def storm(url: str, clients: int, seconds: float, route: str, payloads: list[str] | list[bytes]) -> Counter[str]:
    """A storm from another process, so its clients do not hold up the probes in this one (one GIL)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(storm_clients, url, clients, seconds, route, payloads).result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--stalled", type=int, default=50, help="connections per stall case")
    parser.add_argument("--storm-clients", type=int, default=60)
    parser.add_argument("--storm-seconds", type=float, default=30.0)
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="more server settings")
    args = parser.parse_args()

    bomb = deflate_bomb_dicom(1 << 30)
    tiny_big = one_bit_png(6000, 6000)
    env = {
        # The deployment's level: its access log is part of the load, and the latency it records for each
        # request is the time inside the server (the "in the server" column).
        "CXR_LOG_LEVEL": "INFO",
        "CXR_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "CXR_BODY_IDLE_TIMEOUT_S": str(BODY_IDLE_TIMEOUT_S),
        "CXR_MIN_UPLOAD_BYTES_PER_S": str(MIN_UPLOAD_BYTES_PER_S),
    }
    images, gate_env = test_images(1024)
    env |= gate_env | dict(item.split("=", 1) for item in args.env)
    ids: list[str] = []
    storms = f"{args.storm_clients} clients, {args.storm_seconds:g} s"
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
        (
            f"GET /explain storm ({storms})",
            lambda u: storm(u, args.storm_clients, args.storm_seconds, "GET /explain", ids),
            None,
        ),
        (
            f"POST /explain storm ({storms})",
            lambda u: storm(u, args.storm_clients, args.storm_seconds, "POST /explain", images),
            None,
        ),
    ]
    cases = [case for case in cases if args.only is None or args.only in case[0]]
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="cxr-hostile-") as tmp,
        running_server(args.model_dir, Path(tmp) / "serve.log", **env) as server,
    ):
        process, url = server.process, server.url
        httpx.post(f"{url}/predict", files={"file": ("x.png", tiny_big, "image/png")}, timeout=120)  # warm up
        for data in images:
            answer = httpx.post(f"{url}/predict", files={"file": ("x.png", data, "image/png")}, timeout=120)
            ids.append(answer.json()["id"])
        for name, run, timeout_s in cases:
            log_start = server.log.stat().st_size
            with Watch(url, process.pid) as watch:
                outcome = run(url)
            in_server = slowest_in_server(server.log, log_start, "/readyz")
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
                    in_server,
                    max(watch.healthz_ms, default=float("nan")),
                    f"{watch.readyz_bad}/{len(watch.readyz_ms)}",
                    closed,
                )
            )

    print(f"\nhostile: {args.model_dir}; header/body timeouts {HEADER_TIMEOUT_S:g}/{BODY_IDLE_TIMEOUT_S:g} s")
    print(
        "| case | answers | peak RSS over base MB | slowest /readyz ms (in the server) | slowest /healthz ms "
        "| /readyz not 200 in 100 ms | closed in time |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, answers_text, peak, slowest, inside, slowest_live, bad, closed in rows:
        print(
            f"| {name} | {answers_text} | {peak:+.0f} | {slowest:.0f} ({inside:.1f}) | {slowest_live:.0f} | {bad} "
            f"| {closed} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
