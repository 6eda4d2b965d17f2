"""Drive the scaled stack (docker-compose.scale.yml) through its load balancer (standard library only).

Usage: python3 docker/scale_check.py load BASE_URL N CONCURRENCY OUT.json [IMAGE.png ...]
           N predictions (of the IMAGEs in turn, else synthetic PNGs, which a model's gate may refuse),
           CONCURRENCY at a time; every one must be 200. Writes the explain URLs
           and the X-Instance of each answer to OUT.json and prints throughput and latency as one JSON line.
       python3 docker/scale_check.py explain BASE_URL IN.json MIN_INSTANCES
           GET every explain URL of IN.json: all must be a PNG (200), served by at least MIN_INSTANCES instances.
Exit status 0 only when every check passed.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from smoke_check import PNG_MAGIC, TIMEOUT_S, synthetic_png


def post_png(base: str, png: bytes) -> tuple[float, str, str]:
    """POST /predict; (latency in s, explain_url, X-Instance). Raises on anything but 200."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{base}/predict",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        answer = json.loads(response.read())
        instance = response.headers["X-Instance"]
    return time.perf_counter() - start, answer["explain_url"], instance


def load(base: str, count: int, concurrency: int, out: Path, files: list[str]) -> int:
    images = [Path(f).read_bytes() for f in files] or [synthetic_png(256, seed) for seed in range(8)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: post_png(base, images[i % len(images)]), range(count)))
    elapsed = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    out.write_text(json.dumps([{"explain_url": r[1], "instance": r[2]} for r in results]))
    summary = {
        "requests": count,
        "concurrency": concurrency,
        "throughput_rps": round(count / elapsed, 2),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "latency_p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))] * 1000, 1),
        "instances": dict(Counter(r[2] for r in results)),
    }
    print(json.dumps(summary))
    return 0


def explain(base: str, source: Path, min_instances: int) -> int:
    instances: Counter[str] = Counter()
    for entry in json.loads(source.read_text()):
        with urllib.request.urlopen(f"{base}{entry['explain_url']}", timeout=TIMEOUT_S) as response:
            if response.status != 200 or not response.read().startswith(PNG_MAGIC):
                print(f"  [FAIL] {entry['explain_url'][:20]}...: not a PNG", file=sys.stderr)
                return 1
            instances[response.headers["X-Instance"]] += 1
    print(f"  [ok] {sum(instances.values())} explanations, all PNG, served by {dict(instances)}")
    if len(instances) < min_instances:
        print(f"  [FAIL] served by {len(instances)} instance(s), expected at least {min_instances}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 5 and argv[0] == "load":
        return load(argv[1].rstrip("/"), int(argv[2]), int(argv[3]), Path(argv[4]), argv[5:])
    if len(argv) == 4 and argv[0] == "explain":
        return explain(argv[1].rstrip("/"), Path(argv[2]), int(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
