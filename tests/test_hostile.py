"""Hostile input and load: the bad-input matrix through the real app, admission control, and the real server's
timeouts and early refusals over raw sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ValidationError

from service.errors import Overloaded
from service.limits import WorkLimiter
from service.model.imaging import DecodesTooLarge, decode_image
from service.settings import Settings
from tests.fixtures.clients import AppClient
from tests.fixtures.hostile import (
    deflate_bomb_dicom,
    dicom_image_without_pixel_data,
    dicom_with_malformed_rows,
    one_bit_png,
    rgba_png,
)
from tests.fixtures.server import ServerProcess, running_server
from tests.fixtures.synthetic import xray_png

BOMB_INFLATED_BYTES = 256 << 20  # past the default bound (20 MiB upload + 72 MB of pixels), quick to build

# (name, file bytes, status, code, a sentence the detail must contain)
MATRIX: list[tuple[str, Any, int, str, str]] = [
    (
        "deflate bomb",
        lambda: deflate_bomb_dicom(BOMB_INFLATED_BYTES),
        400,
        "decodes_too_large",
        "it is refused as a compression bomb",
    ),
    ("RGBA PNG too big to decode", lambda: rgba_png(6000, 3100), 400, "decodes_too_large", "it was not decoded"),
    ("pixel bomb", lambda: one_bit_png(7000, 7000), 400, "too_many_pixels", "more than the limit"),
    ("empty file", lambda: b"", 400, "empty_file", "The file is empty"),
    ("GIF", lambda: b"GIF89a" + bytes(64), 415, "unsupported_format", "looks like a GIF image"),
    ("truncated PNG", lambda: xray_png()[:200], 400, "truncated_image", "probably truncated"),
    # Whole files that are wrong in some way are not called truncated.
    (
        "DICOM image without pixel data",
        dicom_image_without_pixel_data,
        400,
        "dicom_without_pixels",
        "describes an image but holds no pixel data",
    ),
    ("DICOM with malformed Rows", dicom_with_malformed_rows, 400, "corrupt_image", "attribute Rows is malformed"),
    (
        "DICOM image cut inside its header",
        lambda: dicom_image_without_pixel_data()[:-3],
        400,
        "truncated_image",
        "probably truncated",
    ),
]


@pytest.mark.parametrize(("data", "status", "code", "sentence"), [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX])
@pytest.mark.parametrize("route", ["/predict", "/explain"])
def test_bad_input_is_a_clear_4xx(
    make_client: AppClient, route: str, data: Any, status: int, code: str, sentence: str
) -> None:
    with make_client() as client:
        response = client.post(route, files={"file": ("x", data(), "application/octet-stream")})
    assert response.status_code == status
    assert response.json()["code"] == code
    assert sentence in response.json()["detail"]


def test_tiny_file_big_decode_stays_float32_and_bounded() -> None:
    import tracemalloc

    data = one_bit_png(6000, 6000)  # exactly the default pixel limit, 4 KiB on the wire
    assert len(data) < 10_000
    tracemalloc.start()
    image = decode_image(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert image.array.dtype.name == "float32" and image.array.shape == (6000, 6000)
    # The float32 result is 144 MB; no float64 copy (288 MB each) was made on the way.
    assert peak < 250e6, peak


def test_deflate_bomb_is_refused_before_it_inflates() -> None:
    with pytest.raises(DecodesTooLarge) as refused:
        decode_image(deflate_bomb_dicom(BOMB_INFLATED_BYTES))
    assert "inflates to more than" in str(refused.value)


def test_work_limiter_refuses_beyond_its_queue() -> None:
    async def scenario() -> list[str]:
        limiter = WorkLimiter(max_active=1, max_waiting=1, retry_after_s=3.0)
        events: list[str] = []
        release = anyio.Event()

        async def hold(name: str) -> None:
            async with limiter.slot():
                events.append(f"{name} runs")
                await release.wait()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(hold, "first")
            await anyio.sleep(0.01)
            tasks.start_soon(hold, "second")  # waits for the slot
            await anyio.sleep(0.01)
            assert (limiter.active, limiter.waiting) == (1, 1)
            with pytest.raises(Overloaded) as refused:
                async with limiter.slot():
                    pass
            assert refused.value.retry_after_s == 3.0
            assert "1 images in analysis, 1 waiting" in refused.value.detail
            release.set()
        return events

    assert anyio.run(scenario) == ["first runs", "second runs"]


def test_overloaded_predict_is_503_with_retry_after(make_client: AppClient) -> None:
    with make_client(work_max_active=1, work_max_queue=0) as client:
        limiter: WorkLimiter = client.app.state.service.work

        async def take_slot() -> None:
            await limiter._slots.acquire()

        client.portal.call(take_slot)  # a request in analysis
        busy = client.post("/predict", files={"file": ("x.png", xray_png(), "image/png")})
        assert client.get("/readyz").status_code == 200  # health takes no slot
    assert busy.status_code == 503
    assert busy.json()["code"] == "overloaded"
    assert busy.headers["Retry-After"] == "1"


def test_health_answers_with_every_worker_thread_taken(make_client: AppClient) -> None:
    # Under load worker threads wait for the CPUs and the GIL behind model work: the probes must not need one.
    release = threading.Event()
    with make_client() as client, ThreadPoolExecutor(1) as asker:

        async def one_thread_only() -> int:
            limiter = anyio.to_thread.current_default_thread_limiter()
            limiter.total_tokens = 1
            return int(limiter.borrowed_tokens)

        held = client.portal.start_task_soon(anyio.to_thread.run_sync, release.wait)
        try:
            deadline = time.monotonic() + 10.0
            while client.portal.call(one_thread_only) < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            answers = asker.submit(lambda: [client.get(path).status_code for path in ("/healthz", "/readyz")])
            assert answers.result(timeout=10.0) == [200, 200]
        finally:
            release.set()
            held.result(timeout=10.0)


def test_blank_api_keys_are_refused_not_read_as_no_authentication() -> None:
    with pytest.raises(ValidationError, match="holds no key"):
        Settings(api_keys=" , ")  # type: ignore[arg-type]  # what the environment gives


def test_401_names_how_to_authenticate(make_client: AppClient) -> None:
    with make_client(api_keys="secret") as client:
        response = client.get("/model")
    assert response.status_code == 401 and response.json()["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == 'APIKey realm="covid-cxr", header="X-API-Key"'


def test_post_explain_reads_target_and_alpha_form_fields(make_client: AppClient) -> None:
    upload = {"file": ("x.png", xray_png(), "image/png")}
    with make_client() as client:
        unknown = client.post("/explain", files=upload, data={"target": "Not a class"})
        transparent = client.post("/explain", files=upload, data={"target": "Normal", "alpha": "0"})
        from_query = client.post("/explain", files=upload, params={"target": "Normal", "alpha": "0"})
        default_alpha = client.post("/explain", files=upload, params={"target": "Normal"})
    assert unknown.status_code == 422 and unknown.json()["code"] == "unknown_class"
    assert transparent.status_code == 200 and transparent.headers["X-Explain-Target"] == "Normal"
    assert transparent.content == from_query.content != default_alpha.content  # alpha 0 came from the form


# --------------------------------------------------------------------------- the real server, raw sockets


@pytest.fixture(scope="module")
def strict_server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("hostile") / "serve.log"
    env = {
        "CXR_API_KEYS": "secret",
        "CXR_HEADER_TIMEOUT_S": "1",
        "CXR_BODY_IDLE_TIMEOUT_S": "1",
        "CXR_MIN_UPLOAD_BYTES_PER_S": "4096",
    }
    with running_server(bundle_dir, log, **env) as server:
        yield server


def _connect(server: ServerProcess) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _post_head(path: str, length: int, key: str | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", f"Content-Length: {length}"]
    lines += ["Content-Type: multipart/form-data; boundary=xyz"]
    if key is not None:
        lines.append(f"X-API-Key: {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.slow
def test_stalled_headers_are_closed_within_the_header_timeout(strict_server: ServerProcess) -> None:
    with _connect(strict_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: local")  # never finished
        start = time.monotonic()
        assert _read_all(sock) == b""  # closed, no answer
        assert time.monotonic() - start < 3.0


@pytest.mark.slow
def test_keyless_upload_is_refused_before_its_body(strict_server: ServerProcess) -> None:
    with _connect(strict_server) as sock:
        sock.sendall(_post_head("/predict", 5_000_000))  # headers only: the body never comes
        start = time.monotonic()
        answer = sock.recv(65536)
        while not answer.endswith(b"}"):  # the JSON body may come in a second segment
            answer += sock.recv(65536)
        assert time.monotonic() - start < 0.9  # before the body timeout could have fired
    assert answer.startswith(b"HTTP/1.1 401") and b'"code":"unauthorized"' in answer


@pytest.mark.slow
def test_body_shorter_than_its_length_gets_408_within_the_idle_timeout(strict_server: ServerProcess) -> None:
    with _connect(strict_server) as sock:
        sock.sendall(_post_head("/predict", 100_000, key="secret") + b"--xyz\r\n")
        start = time.monotonic()
        answer = _read_all(sock)
        assert time.monotonic() - start < 3.0
    assert answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer
    assert b"The request body stalled" in answer


@pytest.mark.slow
def test_trickled_upload_gets_408(strict_server: ServerProcess) -> None:
    with _connect(strict_server) as sock:
        part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        sock.sendall(_post_head("/predict", 1_000_000, key="secret") + part)
        deadline = time.monotonic() + 15
        answer = b""
        sock.settimeout(0.5)
        while time.monotonic() < deadline and not answer:
            try:
                sock.sendall(b"x" * 1000)  # 2 KB/s: under the 4 KiB/s minimum
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(5)
        while answer and not answer.endswith(b"}"):  # the JSON body may come in a second segment
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and b"too slowly" in answer


@pytest.mark.slow
def test_malformed_http_gets_the_json_error_shape(strict_server: ServerProcess) -> None:
    with _connect(strict_server) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400") and b"application/json" in answer
    assert b'"code": "bad_request"' in answer


def test_pydicom_records_never_reach_the_log_even_after_pydicom_resets_its_level() -> None:
    import io
    import logging

    from service.logging_setup import configure_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        configure_logging("INFO", "text", stream)
        logging.getLogger("pydicom").setLevel(logging.WARNING)  # what pydicom's import does
        logging.getLogger("pydicom.pixels").warning("PatientName Doe^Jane: bad JPEG-LS data")
        logging.getLogger("service.test").warning("kept")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert "Doe^Jane" not in stream.getvalue() and "kept" in stream.getvalue()


# --------------------------------------------------------------------------- headers, hosts, docs, audit trail


def test_results_are_not_cached_or_sniffed(make_client: AppClient) -> None:
    upload = {"file": ("x.png", xray_png(), "image/png")}
    with make_client() as client:
        predicted = client.post("/predict", files=upload)
        explained = client.post("/explain", files=upload)
        refused = client.post("/predict", files={"file": ("x", b"", "image/png")})
        health = client.get("/healthz")
    for response in (predicted, explained, refused):
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert (predicted.status_code, explained.status_code, refused.status_code) == (200, 200, 400)
    assert health.headers["X-Content-Type-Options"] == "nosniff" and "Cache-Control" not in health.headers


def test_a_host_not_allowed_is_refused_in_json_and_probes_answer_any_host(make_client: AppClient) -> None:
    with make_client(allowed_hosts="cxr.clinic.local,*.cxr.local") as client:
        rebound = client.get("/model", headers={"Host": "attacker.example"})
        named = client.get("/model", headers={"Host": "cxr.clinic.local:8000"})
        sub = client.get("/model", headers={"Host": "ward3.cxr.local"})
        probe = client.get("/readyz", headers={"Host": "127.0.0.1:8000"})
    assert rebound.status_code == 400
    assert rebound.json() == {
        "detail": "The Host header does not name this service (CXR_ALLOWED_HOSTS); the request was refused.",
        "code": "invalid_host",
    }
    assert (named.status_code, sub.status_code, probe.status_code) == (200, 200, 200)


def test_allowed_hosts_patterns_are_checked_in_settings() -> None:
    assert Settings().allowed_hosts == ["*"]
    with pytest.raises(ValidationError, match="is not a host name"):
        Settings(allowed_hosts="cxr.*.local")  # type: ignore[arg-type]  # what the environment gives


def test_docs_work_offline(make_client: AppClient) -> None:
    import re

    with make_client() as client:
        page = client.get("/docs")
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
        fetched = {url: client.get(url) for url in assets}
        redoc = client.get("/redoc")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    assert {url.rsplit("/", 1)[-1] for url in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    assert all(r.status_code == 200 and len(r.content) > 1000 for r in fetched.values()), fetched
    assert redoc.status_code == 404


def test_access_log_names_the_client_and_the_key_never_the_key_itself(
    make_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    import hashlib
    import logging

    caplog.set_level(logging.INFO, logger="service.access")
    with make_client(api_keys="first-secret,second-secret") as client:
        client.get("/model", headers={"X-API-Key": "second-secret"})
        client.get("/model", headers={"X-API-Key": "a guess"})
        client.get("/healthz")
    records = [r for r in caplog.records if r.name == "service.access"]
    assert [(r.__dict__["status"], r.__dict__["client"], r.__dict__["key_id"]) for r in records] == [
        (200, "testclient", hashlib.sha256(b"second-secret").hexdigest()[:8]),
        (401, "testclient", "invalid"),
        (200, "testclient", "-"),
    ]
    assert " client=testclient key=" in records[0].getMessage()
    assert not any("secret" in r.getMessage() or "guess" in r.getMessage() for r in records)
