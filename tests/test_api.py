"""The real app (``create_app`` + lifespan) through TestClient on tiny real bundles: endpoints and errors."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.model.bundle import read_card
from service.model.imaging import decode_image
from service.predictor import Predictor
from service.settings import Settings
from service.store import InMemoryPredictionStore
from tests.fixtures.bundles import CLASSES_3, CLASSES_4, CPU, DISCLAIMER
from tests.fixtures.clients import AppClient
from tests.fixtures.clock import FakeClock
from tests.fixtures.images import dicom_bytes, gif_bytes, jpeg_bytes, png_bytes, png_to_array
from tests.fixtures.synthetic import xray_array, xray_png

NOT_FOUND = (
    "No prediction with this id: it is unknown or has expired (predictions are kept for {ttl} s). "
    "Send the image to POST /predict again, or use POST /explain."
)
UNKNOWN_CLASS = "Unknown target class 'Lung Opacity'; this model's classes are: COVID, Normal, Viral Pneumonia."


def upload(
    data: bytes,
    name: str = "image.png",
    content_type: str = "application/octet-stream",
) -> dict[str, Any]:
    return {"file": (name, data, content_type)}


def predict_png(client: TestClient, data: bytes | None = None) -> dict[str, Any]:
    response = client.post("/predict", files=upload(data if data is not None else xray_png()))
    assert response.status_code == 200, response.text[:300]
    return dict(response.json())


def assert_error(response: httpx.Response, status: int, code: str, detail: str) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": detail, "code": code}


# --------------------------------------------------------------------------- health, readiness, model card


def test_healthz_readyz_and_model_card(client: TestClient, predictor: Predictor, bundle_dir: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "model": {"name": "test", "arch": "resnet18", "version": "1", "sha256": predictor.sha256},
        "bundle_sha256": predictor.bundle.digest,
        "classes": CLASSES_3,
        "providers": ["CPUExecutionProvider"],
        "requested_providers": CPU,
        "reference_check": "passed",
        "explain_engine": "onnx",
    }
    card = client.get("/model")
    assert card.status_code == 200
    body = card.json()
    assert body.pop("gate_settings")["active"] is False  # the session bundle has no gate (tests/test_gate.py)
    assert body.pop("bundle_sha256") == predictor.bundle.digest
    assert body == read_card(bundle_dir).model_dump(mode="json")
    assert card.json()["sha256"]["model.onnx"] == predictor.sha256


def test_the_lifespan_loads_the_bundle_and_reports_providers_in_use(
    make_client: AppClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    requested = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with make_client(predictor=None, providers=requested) as client:
        ready = client.get("/readyz").json()
        assert ready["requested_providers"] == requested
        assert ready["providers"] and set(ready["providers"]) <= set(requested)
        assert ready["classes"] == CLASSES_3
        assert predict_png(client)["model"]["sha256"] == ready["model"]["sha256"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("ready: model test 1 (resnet18, bundle sha256 ") for m in messages)
    cuda_warning = any("CUDAExecutionProvider was requested" in m for m in messages)
    assert cuda_warning == ("CUDAExecutionProvider" not in ready["providers"])


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/explain", "/healthz", "/readyz", "/model"} <= set(schema["paths"])
    assert set(schema["paths"]["/explain"]) == {"get", "post"}
    for path, method in [("/predict", "post"), ("/explain", "get"), ("/healthz", "get"), ("/model", "get")]:
        assert schema["paths"][path][method]["summary"], path  # one-line docstrings become the summaries
    predict_responses = schema["paths"]["/predict"]["post"]["responses"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(predict_responses)
    assert "image/png" in schema["paths"]["/explain"]["get"]["responses"]["200"]["content"]
    assert client.get("/docs").status_code == 200


# --------------------------------------------------------------------------- POST /predict


def test_predict_response_schema_and_values(client: TestClient, predictor: Predictor) -> None:
    data = xray_png(160, 96)
    body = predict_png(client, data)
    assert set(body) == {
        "id",
        "label",
        "argmax_label",
        "probabilities",
        "decision",
        "gate_score",
        "model",
        "explain_url",
        "input",
        "timing_ms",
        "disclaimer",
    }
    assert len(body["id"]) >= 22
    assert body["explain_url"] == f"/explain?id={body['id']}"
    assert list(body["probabilities"]) == CLASSES_3
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["argmax_label"] == body["label"] and body["decision"] is None  # a bundle without a rule
    assert body["model"] == {"name": "test", "arch": "resnet18", "version": "1", "sha256": predictor.sha256}
    assert body["input"] == {"format": "png", "width": 160, "height": 96}
    assert set(body["timing_ms"]) == {"decode", "preprocess", "inference", "total"}
    timing = body["timing_ms"]
    assert all(v >= 0 for v in timing.values())
    assert timing["total"] >= timing["decode"] + timing["preprocess"] + timing["inference"]
    assert body["disclaimer"] == DISCLAIMER
    # The service and the predictor are one code path: same bytes, same numbers.
    direct = predictor.predict(decode_image(data))
    assert body["label"] == direct.label
    for name in CLASSES_3:
        assert body["probabilities"][name] == pytest.approx(direct.probabilities[name], abs=1e-12)


def test_a_bundle_with_a_decision_rule_labels_by_it(
    make_client: AppClient,
    decision_predictor: Predictor,
    decision_bundle_dir: Path,
) -> None:
    decision = decision_predictor.card.decision
    assert decision is not None
    with make_client(predictor=decision_predictor) as client:
        body = predict_png(client, xray_png())
        # The crafted case: the rule calls the runner-up class, not the most probable one.
        assert body["label"] == decision.positive_class
        assert body["argmax_label"] == max(body["probabilities"], key=body["probabilities"].get)
        assert body["label"] != body["argmax_label"]
        assert body["decision"] == {
            "positive_class": decision.positive_class,
            "threshold": decision.threshold,
            "positive": True,
            "rule": decision.rule,
        }
        assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
        # The stored prediction's default explanation is of the class the label names.
        assert client.get(body["explain_url"]).headers["x-explain-target"] == body["label"]
        card = client.get("/model").json()
    assert card.pop("gate_settings")["active"] is False
    assert card.pop("bundle_sha256") == decision_predictor.bundle.digest
    assert card == read_card(decision_bundle_dir).model_dump(mode="json")
    assert card["decision"] == {
        "positive_class": decision.positive_class,
        "threshold": decision.threshold,
        "rule": decision.rule,
    }
    assert card["calibration"] == {"method": "temperature", "temperature": 1.0, "ece": 0.05}
    assert card["probes"] == {"border_only_auc": 0.58}
    assert card["sources"] == {"synthetic": {"train": 60, "val": 10, "test": 10}}


def test_a_bug_in_the_decoder_is_a_500_not_a_refusal(
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import service.model.imaging as imaging

    def broken(*args: object) -> None:
        raise TypeError("a bug in the decoder")

    monkeypatch.setattr(imaging, "_pillow_to_unit", broken)
    caplog.set_level(logging.ERROR, logger="service.middleware")
    response = client.post("/predict", files=upload(xray_png()))
    request_id = response.headers["x-request-id"]
    assert_error(response, 500, "internal_error", f"Internal server error (request id {request_id}).")
    assert any(r.getMessage().startswith("unhandled TypeError at ") for r in caplog.records)


def test_each_prediction_gets_a_new_id(client: TestClient) -> None:
    ids = {predict_png(client)["id"] for _ in range(3)}
    assert len(ids) == 3


def test_format_comes_from_the_bytes_not_the_name(client: TestClient) -> None:
    jpeg = jpeg_bytes(xray_array(120, 100))
    response = client.post("/predict", files=upload(jpeg, "scan.dcm", "application/dicom"))
    assert response.status_code == 200
    assert response.json()["input"] == {"format": "jpeg", "width": 120, "height": 100}


def test_dicom_end_to_end(client: TestClient) -> None:
    pixels = xray_array(128, 160).astype(np.uint16) * 16  # 12-bit stored values
    data = dicom_bytes(pixels, bits_stored=12, photometric="MONOCHROME1", window=(2048, 4096))
    body = predict_png(client, data)
    assert body["input"] == {"format": "dicom", "width": 128, "height": 160}
    assert sum(body["probabilities"].values()) == pytest.approx(1.0)
    overlay = client.get(body["explain_url"])
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    assert png_to_array(overlay.content).shape == (160, 128, 3)


def test_a_four_class_bundle_is_served_without_code_changes(
    make_client: AppClient,
    predictor4: Predictor,
) -> None:
    with make_client(predictor=predictor4) as client:
        assert client.get("/readyz").json()["classes"] == CLASSES_4
        body = predict_png(client)
        assert list(body["probabilities"]) == CLASSES_4
        assert sum(body["probabilities"].values()) == pytest.approx(1.0)
        overlay = client.get("/explain", params={"id": body["id"], "target": "Lung Opacity"})
        assert overlay.status_code == 200 and overlay.headers["x-explain-target"] == "Lung Opacity"


# --------------------------------------------------------------------------- /explain


def test_explain_overlay_has_the_original_aspect_ratio_and_is_not_the_plain_image(client: TestClient) -> None:
    gray = xray_array(160, 96)
    body = predict_png(client, png_bytes(gray))
    response = client.get(body["explain_url"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-explain-target"] == body["label"]
    assert response.headers["cache-control"] == "no-store"
    overlay = png_to_array(response.content).astype(int)
    assert overlay.shape == (96, 160, 3)
    plain = np.repeat(gray[..., None], 3, axis=2).astype(int)
    assert np.abs(overlay - plain).mean() > 10
    # alpha=0 is exactly the plain image: the blend is what differs, not the geometry.
    transparent = client.get("/explain", params={"id": body["id"], "alpha": 0})
    assert np.abs(png_to_array(transparent.content).astype(int) - plain).max() <= 1


def test_explain_caps_the_long_side(make_client: AppClient) -> None:
    with make_client(explain_max_side=80) as client:
        body = predict_png(client, xray_png(160, 96))
        assert png_to_array(client.get(body["explain_url"]).content).shape == (48, 80, 3)


def test_explain_each_target_class_gives_a_different_map(client: TestClient) -> None:
    body = predict_png(client)
    overlays = {}
    for name in CLASSES_3:
        response = client.get("/explain", params={"id": body["id"], "target": name})
        assert response.status_code == 200 and response.headers["x-explain-target"] == name
        overlays[name] = png_to_array(response.content).astype(int)
    assert not np.array_equal(overlays["COVID"], overlays["Normal"])
    assert not np.array_equal(overlays["COVID"], overlays["Viral Pneumonia"])
    assert not np.array_equal(overlays["Normal"], overlays["Viral Pneumonia"])
    default = png_to_array(client.get(body["explain_url"]).content).astype(int)
    assert np.array_equal(default, overlays[body["label"]])  # default target: the predicted class


def test_post_explain_equals_explain_of_the_stored_prediction(client: TestClient) -> None:
    data = xray_png()
    body = predict_png(client, data)
    stored = client.get("/explain", params={"id": body["id"], "target": "Normal", "alpha": 0.6})
    direct = client.post("/explain", files=upload(data), params={"target": "Normal", "alpha": 0.6})
    assert direct.status_code == 200 and direct.headers["content-type"] == "image/png"
    assert direct.headers["x-explain-target"] == "Normal"
    assert np.array_equal(png_to_array(direct.content), png_to_array(stored.content))
    default = client.post("/explain", files=upload(data))
    assert default.headers["x-explain-target"] == body["label"]


def test_concurrent_explains_are_serialised_and_match_sequential_results(
    predictor: Predictor,
    settings: Settings,
) -> None:
    app = create_app(settings, predictor=predictor)

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            posted = [await client.post("/predict", files=upload(xray_png(seed=i))) for i in range(3)]
            ids = [response.json()["id"] for response in posted]
            sequential = [(await client.get("/explain", params={"id": i})).content for i in ids]
            together = await asyncio.gather(*(client.get("/explain", params={"id": i}) for i in ids * 2))
            return sequential, [r.content for r in together]

    sequential, concurrent = asyncio.run(scenario())
    assert concurrent == sequential * 2


# --------------------------------------------------------------------------- the prediction store


def test_ids_expire_after_the_ttl(make_client: AppClient) -> None:
    clock = FakeClock()
    store = InMemoryPredictionStore(ttl_s=60, max_items=10, max_bytes=10**8, clock=clock)
    with make_client(store=store) as client:
        body = predict_png(client)
        clock.now = 59.0
        assert client.get(body["explain_url"]).status_code == 200
        clock.now = 60.0
        assert_error(client.get(body["explain_url"]), 404, "unknown_id", NOT_FOUND.format(ttl=60))


def test_store_bounds_hold_through_the_api(make_client: AppClient) -> None:
    with make_client(store_max_items=2) as client:
        ids = [predict_png(client, xray_png(seed=i))["id"] for i in range(3)]
        assert client.get("/explain", params={"id": ids[0]}).status_code == 404  # oldest evicted
        assert client.get("/explain", params={"id": ids[1]}).status_code == 200
        assert client.get("/explain", params={"id": ids[2]}).status_code == 200


# --------------------------------------------------------------------------- errors, one by one


def test_400_for_a_corrupt_image(client: TestClient) -> None:
    png = xray_png()
    garbage = png[:60] + bytes(range(256)) * 4 + png[-12:]  # PNG signature and IHDR, then noise
    assert_error(
        client.post("/predict", files=upload(garbage)),
        400,
        "corrupt_image",
        "The file starts like a PNG image but its contents cannot be decoded.",
    )


def test_400_for_a_truncated_image(client: TestClient) -> None:
    png = xray_png()
    assert_error(
        client.post("/predict", files=upload(png[: len(png) // 2])),
        400,
        "truncated_image",
        "The PNG file ends before the image is complete; it is probably truncated.",
    )


def test_400_for_an_empty_file(client: TestClient) -> None:
    assert_error(
        client.post("/predict", files=upload(b"")),
        400,
        "empty_file",
        "The file is empty; upload a PNG, JPEG or DICOM image.",
    )


def test_400_for_a_multiframe_dicom(client: TestClient) -> None:
    data = dicom_bytes(xray_array(32, 32).astype(np.uint16), bits_stored=8, frames=2)
    assert_error(
        client.post("/predict", files=upload(data, "x.dcm")),
        400,
        "multiframe_dicom",
        "The DICOM file holds 2 frames; only single-frame images (one radiograph) are supported.",
    )


def test_413_for_a_file_over_the_limit(make_client: AppClient) -> None:
    with make_client(max_upload_bytes=2000) as client:
        detail = "The file is larger than the upload limit of 1.95 KiB."
        # Just over the file limit (the body limit with its multipart allowance is not reached).
        just_over = client.post("/predict", files=upload(b"\x89PNG" + bytes(2000)))
        assert_error(just_over, 413, "file_too_large", detail)
        # Far over: the request body limit trips while the body is still streaming in.
        assert_error(client.post("/explain", files=upload(bytes(200_000))), 413, "file_too_large", detail)
        raw_body = client.post("/predict", content=bytes(100_000), headers={"Content-Type": "image/png"})
        assert_error(raw_body, 413, "file_too_large", detail)
        exactly = client.post("/predict", files=upload(b"\x89PNG" + bytes(1996)))
        assert exactly.json()["code"] == "unsupported_format"  # at the limit: read, then judged by its bytes


def test_413_without_content_length_is_refused_while_streaming(make_client: AppClient) -> None:
    boundary = "cxrboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    chunks_sent = []

    def body() -> Any:
        yield head
        for _ in range(50):  # 50 x 64 KiB, far more than the limit allows
            chunks_sent.append(1)
            yield bytes(65536)
        yield f"\r\n--{boundary}--\r\n".encode()

    with make_client(max_upload_bytes=2000) as client:
        response = client.post(
            "/predict", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert_error(response, 413, "file_too_large", "The file is larger than the upload limit of 1.95 KiB.")


def test_415_for_a_gif(client: TestClient) -> None:
    assert_error(
        client.post("/predict", files=upload(gif_bytes(xray_array()), "x.png", "image/png")),
        415,
        "unsupported_format",
        "The file looks like a GIF image; only PNG, JPEG or DICOM images are accepted.",
    )


def test_415_for_bytes_that_are_no_image(client: TestClient) -> None:
    assert_error(
        client.post("/explain", files=upload(b"hello, world")),
        415,
        "unsupported_format",
        "The file is not a recognised image; only PNG, JPEG or DICOM images are accepted.",
    )


def test_422_for_a_missing_file_field(client: TestClient) -> None:
    assert_error(client.post("/predict"), 422, "invalid_request", "Missing required form field 'file'.")
    assert_error(
        client.post("/predict", files={"image": ("x.png", xray_png())}),
        422,
        "invalid_request",
        "Missing required form field 'file'.",
    )


def test_422_for_an_unknown_target_class(client: TestClient) -> None:
    body = predict_png(client)
    assert_error(
        client.get("/explain", params={"id": body["id"], "target": "Lung Opacity"}), 422, "unknown_class", UNKNOWN_CLASS
    )
    assert_error(
        client.post("/explain", files=upload(xray_png()), params={"target": "Lung Opacity"}),
        422,
        "unknown_class",
        UNKNOWN_CLASS,
    )


@pytest.mark.parametrize(
    ("alpha", "detail"),
    [
        ("1.5", "Invalid query parameter 'alpha': Input should be less than or equal to 1."),
        ("-0.1", "Invalid query parameter 'alpha': Input should be greater than or equal to 0."),
        ("abc", "Invalid query parameter 'alpha': Input should be a valid number, unable to parse string as a number."),
    ],
)
def test_422_for_alpha_out_of_range(client: TestClient, alpha: str, detail: str) -> None:
    body = predict_png(client)
    response = client.get("/explain", params={"id": body["id"], "alpha": alpha})
    assert_error(response, 422, "invalid_request", detail)


def test_422_for_a_missing_id(client: TestClient) -> None:
    assert_error(client.get("/explain"), 422, "invalid_request", "Missing required query parameter 'id'.")


def test_404_for_an_unknown_id(client: TestClient) -> None:
    assert_error(client.get("/explain", params={"id": "not-a-real-id"}), 404, "unknown_id", NOT_FOUND.format(ttl=900))


def test_404_and_405_for_unknown_routes_and_methods(client: TestClient) -> None:
    assert_error(client.get("/nothing-here"), 404, "not_found", "Not Found")
    response = client.get("/predict")
    assert_error(response, 405, "method_not_allowed", "Method Not Allowed")
    assert response.headers["allow"] == "POST"


def test_401_without_a_valid_api_key(make_client: AppClient) -> None:
    detail = "Missing or invalid API key: send a valid key in the X-API-Key header."
    with make_client(api_keys="first-key, second-key") as client:
        assert_error(client.post("/predict", files=upload(xray_png())), 401, "unauthorized", detail)
        assert_error(client.get("/model", headers={"X-API-Key": "wrong"}), 401, "unauthorized", detail)
        assert_error(client.get("/explain", params={"id": "x"}), 401, "unauthorized", detail)
        response = client.post("/predict", files=upload(xray_png()), headers={"X-API-Key": "second-key"})
        assert response.status_code == 200
        assert client.get("/model", headers={"X-API-Key": "first-key"}).status_code == 200
        # Probes stay open for the orchestrator.
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_503_until_a_model_is_loaded_when_the_bundle_is_missing(
    make_client: AppClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="service.app")
    missing = tmp_path / "no-bundle-here"
    detail = (
        f"No model bundle at {missing.name!r}: the folder does not exist. Train a bundle with cxr-train, or "
        "point CXR_MODEL_DIR (or --model-dir) at a bundle folder."
    )
    with make_client(predictor=None, model_dir=missing) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert_error(client.get("/readyz"), 503, "not_ready", detail)
        assert_error(client.post("/predict", files=upload(xray_png())), 503, "not_ready", detail)
        assert_error(client.post("/explain", files=upload(xray_png())), 503, "not_ready", detail)
        assert_error(client.get("/explain", params={"id": "x"}), 503, "not_ready", detail)
        assert_error(client.get("/model"), 503, "not_ready", detail)
    assert [r.getMessage() for r in caplog.records] == [f"not ready: {detail}"]


def test_503_for_a_tampered_bundle(make_client: AppClient, bundle_dir: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle_dir, tampered)
    weights = tampered / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with make_client(predictor=None, model_dir=tampered) as client:
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json()["code"] == "not_ready"
        detail = response.json()["detail"]
        assert detail.startswith(f"The model bundle {tampered.name!r} cannot be served: weights.safetensors in ")
        assert str(tmp_path) not in detail  # a reason names the folder, never its path
        assert detail.endswith("the bundle was modified or corrupted and will not be served.")
        assert client.post("/predict", files=upload(xray_png())).json() == response.json()


def test_500_for_a_server_bug_says_nothing_about_the_request(
    settings: Settings,
    predictor: Predictor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app: FastAPI = create_app(settings, predictor=predictor)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret payload detail")

    caplog.set_level(logging.INFO)
    with TestClient(app) as client:
        response = client.get("/boom")
    request_id = response.headers["x-request-id"]
    assert_error(response, 500, "internal_error", f"Internal server error (request id {request_id}).")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("unhandled RuntimeError at ") and "test_api.py" in m for m in messages)
    assert not any("secret payload" in m for m in messages)
    assert any(m.startswith("GET /boom 500 ") for m in messages)


# --------------------------------------------------------------------------- logging, request ids, metrics


def test_no_log_record_contains_file_names_pixels_or_patient_fields(
    client: TestClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_name = "Jane_Roe_1969-04-01_chest.png"
    client.post("/predict", files=upload(xray_png(), secret_name, "image/png"))
    client.post("/predict", files=upload(b"not an image", secret_name))
    client.post("/explain", files=upload(xray_png(), secret_name))
    dicom = dicom_bytes(xray_array(64, 64).astype(np.uint16) * 16, patient_name="Roe^Jane^Secret")
    body = predict_png(client, dicom)
    client.get(body["explain_url"])
    assert caplog.records
    # The test's own HTTP client logs URLs; what matters is what the service logs.
    service_records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert service_records
    for record in service_records:
        text = record.getMessage() + json.dumps(vars(record), default=str)
        for forbidden in ("Jane_Roe", "Roe^Jane", "Secret", "PID-0001", "19700101", body["id"]):
            assert forbidden not in text, (forbidden, record.name, record.getMessage())


def test_access_log_has_request_id_route_status_latency_and_model_sha(
    client: TestClient,
    predictor: Predictor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="service.access")
    response = client.post("/predict", files=upload(xray_png()))
    request_id = response.headers["x-request-id"]
    (record,) = [r for r in caplog.records if r.name == "service.access"]
    assert record.__dict__["request_id"] == request_id
    assert record.__dict__["method"] == "POST" and record.__dict__["route"] == "/predict"
    assert record.__dict__["status"] == 200 and record.__dict__["latency_ms"] > 0
    assert record.__dict__["model_sha"] == predictor.sha256[:12]
    assert record.getMessage().startswith("POST /predict 200 ")
    assert record.getMessage().endswith(f" ms client=testclient key=- model={predictor.sha256[:12]}")


def test_request_ids_are_echoed_when_sane_and_replaced_otherwise(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123.DEF_4"}).headers["x-request-id"] == (
        "abc-123.DEF_4"
    )
    replaced = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert replaced != "bad id\twith spaces" and len(replaced) == 32


def test_metrics_count_requests_per_route_and_status(client: TestClient) -> None:
    predict_png(client)
    client.get("/explain", params={"id": "missing"})
    text = client.get("/metrics").text
    assert 'cxr_http_requests_total{method="POST",route="/predict",status="200"} 1.0' in text
    assert 'cxr_http_requests_total{method="GET",route="/explain",status="404"} 1.0' in text
    assert "cxr_http_request_duration_seconds_bucket" in text


def test_metrics_report_what_the_in_memory_store_holds(make_client: AppClient) -> None:
    store = InMemoryPredictionStore(ttl_s=60, max_items=8, max_bytes=1 << 30)
    with make_client(store=store) as client:
        assert "cxr_store_items 0.0" in client.get("/metrics").text
        predict_png(client)
        predict_png(client)
        text = client.get("/metrics").text
    assert "cxr_store_items 2.0" in text
    assert f"cxr_store_bytes {float(store.nbytes)}" in text and store.nbytes > 0
