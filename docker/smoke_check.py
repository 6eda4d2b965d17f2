"""Drive a running covid-cxr API over HTTP and check what a deployment must answer (standard library only).

Usage: python3 docker/smoke_check.py BASE_URL [IMAGE.png]
       python3 docker/smoke_check.py --make-dataset DIR N     (N synthetic PNGs per class, for a training smoke run)
Checks /healthz, /readyz (200 + JSON), POST /predict with a real PNG (a label among the probabilities, which
sum to 1, and an explain_url), GET of that explain_url (a PNG), and that undecodable bytes get a 4xx, not a 500.
Without IMAGE a synthetic 8-bit grayscale PNG is made. Exit status 0 only when every check passed.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT_S = 300  # the first /explain builds the Grad-CAM model on CPU


def synthetic_png(size: int = 256, seed: int = 0) -> bytes:
    """An 8-bit grayscale PNG: two dark 'lungs' in a bright 'thorax' (placed and textured by ``seed``)."""
    rng = random.Random(seed)
    lx, rx, cy = size * rng.uniform(0.26, 0.36), size * rng.uniform(0.64, 0.74), size * rng.uniform(0.42, 0.58)
    sigma2 = 2 * (size * rng.uniform(0.09, 0.14)) ** 2
    rows = []
    for y in range(size):
        row = bytearray([0])  # filter type: none
        for x in range(size):
            v = 200 - int(120 * math.exp(-((x - lx) ** 2 + (y - cy) ** 2) / sigma2))
            v -= int(120 * math.exp(-((x - rx) ** 2 + (y - cy) ** 2) / sigma2))
            row.append(max(0, min(255, v + rng.randrange(-12, 13))))
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return PNG_MAGIC + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")


def request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes]:
    """Return (status, content type, body) without raising on HTTP error statuses."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    api_key = os.environ.get("CXR_SMOKE_API_KEY")
    if api_key:
        req.add_header("X-API-Key", api_key)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def multipart(field: str, filename: str, content: bytes, content_type: str) -> tuple[bytes, str]:
    """Encode one file field as multipart/form-data; return (body, Content-Type header)."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def check(self, ok: bool, what: str, detail: object = "") -> bool:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}" + (f": {detail}" if detail != "" else ""))
        self.failed += not ok
        return ok


def make_dataset(root: str, per_class: int) -> None:
    """Write ``root/CLASS/img_i.png`` for the three classes (content is noise-level different, labels arbitrary)."""
    for k, label in enumerate(("COVID", "Normal", "Viral_Pneumonia")):
        os.makedirs(os.path.join(root, label), exist_ok=True)
        for i in range(per_class):
            with open(os.path.join(root, label, f"img_{i:03d}.png"), "wb") as f:
                f.write(synthetic_png(64, seed=1000 * k + i))


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "--make-dataset":
        make_dataset(argv[2], int(argv[3]))
        return 0
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    base = argv[1].rstrip("/") + "/"
    if len(argv) == 3:
        with open(argv[2], "rb") as fh:
            png = fh.read()
    else:
        png = synthetic_png()
    name = os.path.basename(argv[2]) if len(argv) == 3 else "synthetic.png"
    c = Checks()
    print(f"smoke check against {base} with {name} ({len(png)} bytes)")

    status, _, body = request("GET", base + "healthz")
    c.check(status == 200, "GET /healthz is 200", status)

    status, ctype, body = request("GET", base + "readyz")
    if c.check(status == 200 and "json" in ctype, "GET /readyz is 200 JSON", status):
        print(f"         {body.decode(errors='replace')[:300]}")

    data, ctype = multipart("file", name, png, "image/png")
    status, rtype, body = request("POST", base + "predict", data, {"Content-Type": ctype})
    explain_url = None
    if c.check(status == 200 and "json" in rtype, "POST /predict is 200 JSON", status if status == 200 else body[:300]):
        result = json.loads(body)
        probs = result.get("probabilities") or {}
        if isinstance(probs, list):  # tolerate [{"label":..., "probability":...}] as well as {label: p}
            probs = {p.get("label"): p.get("probability") for p in probs}
        label = result.get("label")
        c.check(label in probs, "label is one of the classes", f"{label} {probs}")
        c.check(abs(sum(probs.values()) - 1.0) < 1e-3, "probabilities sum to 1", round(sum(probs.values()), 6))
        explain_url = result.get("explain_url")
        c.check(bool(explain_url) and bool(result.get("id")), "id and explain_url present", explain_url)

    if explain_url:
        status, etype, body = request("GET", urllib.parse.urljoin(base, explain_url))
        c.check(
            status == 200 and body.startswith(PNG_MAGIC),
            "GET explain_url is a PNG",
            f"{status} {etype} {len(body)} bytes",
        )

    data, ctype = multipart("file", "junk.png", b"this is not an image", "image/png")
    status, _, body = request("POST", base + "predict", data, {"Content-Type": ctype})
    c.check(400 <= status < 500, "undecodable upload is refused with a 4xx", f"{status} {body[:120]!r}")

    print(f"smoke check: {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
