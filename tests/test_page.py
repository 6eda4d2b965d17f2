"""The clinicians' web page at ``/``.

Two layers: the routes behind it through ``TestClient`` (page, assets, ``/page/config``, the ``layer`` parameter
of ``/explain`` that lets the page blend in a canvas), then Playwright driving Debian's headless chromium against
a real ``cxr-serve`` process: upload by file picker and by drag-and-drop, the slider, the target switch, the
plain-image toggle, refusals and the API-key prompt.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.fixtures.bundles import CLASSES_3
from tests.fixtures.clients import AppClient
from tests.fixtures.images import dicom_bytes, png_to_array
from tests.fixtures.server import ServerProcess, running_server
from tests.fixtures.synthetic import xray_array, xray_png

CHROMIUM = Path("/usr/bin/chromium")
UI_TIMEOUT_MS = 60_000  # a Grad-CAM pass on a 2-core box that is also training can take seconds
KEY = "page-test-key-2"


# --------------------------------------------------------------------------- the routes behind the page


def test_the_page_and_its_assets_are_served_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "Research use only." in page.text
    # Every asset the page links is served (package data), relative to the page, nothing from elsewhere.
    linked = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
    assert sorted(linked) == ["static/icon.svg", "static/page.css", "static/page.js"]
    media = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8", "svg": "image/svg+xml"}
    for path in linked:
        response = client.get(f"/{path}")
        assert response.status_code == 200 and response.headers["content-type"] == media[path.rsplit(".", 1)[1]]
        own = response.text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a namespace name, not a fetch
        assert "http:" not in own and "https:" not in own and "//" not in own.replace("// ", "")


@pytest.mark.parametrize("name", ["index.html", "missing.js", "..%2Fapp.py", ".page.js", "page.js.map"])
def test_only_the_page_assets_are_served_from_static(client: TestClient, name: str) -> None:
    response = client.get(f"/static/{name}")
    assert response.status_code == 404 and response.json()["code"] == "not_found"


def test_page_config_tells_the_page_whether_to_ask_for_a_key(make_client: AppClient) -> None:
    with make_client() as client:
        assert client.get("/page/config").json() == {
            "api_key_required": False,
            "api_key_header": "X-API-Key",
            "max_upload_bytes": 20 * 1024 * 1024,
        }
    with make_client(api_keys=[KEY], max_upload_bytes=5000) as client:
        # The page and its config need no key (they hold no data); the model routes do.
        assert client.get("/").status_code == 200
        assert client.get("/page/config").json() == {
            "api_key_required": True,
            "api_key_header": "X-API-Key",
            "max_upload_bytes": 5000,
        }
        assert client.get("/model").status_code == 401
        assert client.get("/model", headers={"X-API-Key": KEY}).status_code == 200


def _png_layer(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        return np.asarray(image)


def test_explain_layers_blend_to_the_servers_own_overlay(client: TestClient) -> None:
    body = client.post("/predict", files={"file": ("x.png", xray_png(160, 96), "image/png")}).json()
    query = {"id": body["id"], "target": "Normal"}
    plain = _png_layer(client.get("/explain", params={**query, "layer": "image"}))
    heatmap_response = client.get("/explain", params={**query, "layer": "heatmap"})
    heatmap = _png_layer(heatmap_response)
    assert heatmap_response.headers["x-explain-target"] == "Normal"
    assert plain.shape == (96, 160) and heatmap.shape == (96, 160, 3)  # one gray channel; the colour map
    assert np.abs(plain.astype(int) - xray_array(160, 96).astype(int)).max() <= 1
    for alpha in (0.25, 0.7):
        overlay = png_to_array(client.get("/explain", params={**query, "alpha": alpha}).content).astype(float)
        blended = (1 - alpha) * plain[..., None].astype(float) + alpha * heatmap.astype(float)
        assert np.abs(blended - overlay).max() <= 1.0  # only 8-bit rounding apart
    # The default target is the predicted class; each class has its own map.
    default = _png_layer(client.get("/explain", params={"id": body["id"], "layer": "heatmap"}))
    labelled = _png_layer(
        client.get("/explain", params={"id": body["id"], "layer": "heatmap", "target": body["label"]})
    )
    assert np.array_equal(default, labelled)
    others = [c for c in CLASSES_3 if c != body["label"]]
    other = _png_layer(client.get("/explain", params={"id": body["id"], "layer": "heatmap", "target": others[0]}))
    assert not np.array_equal(default, other)


def test_post_explain_accepts_the_layer_too(client: TestClient) -> None:
    upload = {"file": ("x.png", xray_png(120, 90), "image/png")}
    plain = _png_layer(client.post("/explain", params={"layer": "image"}, files=upload))
    assert plain.shape == (90, 120)
    heatmap = client.post("/explain", params={"layer": "heatmap", "target": "COVID"}, files=upload)
    assert _png_layer(heatmap).shape == (90, 120, 3) and heatmap.headers["x-explain-target"] == "COVID"


def test_openapi_documents_the_layer_parameter(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for method in ("get", "post"):
        (layer,) = [p for p in schema["paths"]["/explain"][method]["parameters"] if p["name"] == "layer"]
        assert layer["schema"]["enum"] == ["overlay", "heatmap", "image"] and layer["schema"]["default"] == "overlay"
        assert "(1 - a) * image + a * heatmap" in layer["description"]
    assert "/page/config" in schema["paths"] and "/" not in schema["paths"]
    response = client.get("/explain", params={"id": "x", "layer": "mask"})
    assert response.status_code == 422 and response.json()["code"] == "invalid_request"


# --------------------------------------------------------------------------- a real server and a real browser


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium) to run the browser tests"
        )
    return CHROMIUM


@pytest.fixture(scope="module")
def server(chromium: Path, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("page-server") / "serve.log"
    with running_server(bundle_dir, log) as running:
        yield running


@pytest.fixture(scope="module")
def keyed_server(chromium: Path, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("page-keyed-server") / "serve.log"
    with running_server(bundle_dir, log, CXR_API_KEYS=f"another-key,{KEY}", CXR_MAX_UPLOAD_BYTES="200000") as running:
        yield running


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(chromium))
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (its own sessionStorage) at a laptop size."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(UI_TIMEOUT_MS)
    yield opened
    context.close()


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def choose_file(page: Any, name: str, data: bytes, mime: str) -> dict[str, Any]:
    """Upload through the "Choose a file…" button and the file chooser; returns the /predict JSON."""
    with page.expect_response(lambda r: r.url.endswith("/predict")) as answer:
        with page.expect_file_chooser() as chooser:
            page.get_by_role("button", name="Choose a file…").click()
        chooser.value.set_files(files=[{"name": name, "mimeType": mime, "buffer": data}])
    return dict(answer.value.json())


def drop_file(page: Any, name: str, data: bytes, mime: str) -> dict[str, Any]:
    """Drag a file onto the drop zone (a DataTransfer built in the page); returns the /predict JSON."""
    transfer = page.evaluate_handle(
        """([name, b64, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: mime }));
            return transfer;
        }""",
        [name, base64.b64encode(data).decode(), mime],
    )
    zone = page.locator("#drop-zone")
    zone.dispatch_event("dragenter", {"dataTransfer": transfer})
    expect(zone).to_have_class(re.compile(r"\bis-dragging\b"))
    with page.expect_response(lambda r: r.url.endswith("/predict")) as answer:
        zone.dispatch_event("drop", {"dataTransfer": transfer})
    expect(zone).not_to_have_class(re.compile(r"\bis-dragging\b"))
    return dict(answer.value.json())


def canvas_pixels(page: Any) -> np.ndarray:
    data_url = page.eval_on_selector("#explain-canvas", "canvas => canvas.toDataURL('image/png')")
    return png_to_array(base64.b64decode(data_url.split(",", 1)[1])).astype(int)


def card_loaded(page: Any) -> None:
    """Wait until the model page has been filled from GET /model."""
    page.wait_for_function("() => !document.getElementById('about-content').hidden", timeout=UI_TIMEOUT_MS)


def rendered(page: Any, what: str) -> None:
    """Wait until the canvas shows ``what``: ``CLASS@OPACITY`` or ``image``."""
    expect(page.locator("#explain-canvas")).to_have_attribute("data-rendered", what, timeout=UI_TIMEOUT_MS)


def expect_result(page: Any, body: dict[str, Any]) -> None:
    """The result panel shows this /predict answer: decision, one labelled bar per class, model, time."""
    result = page.get_by_role("region", name="Result")
    expect(result).to_be_visible()
    expect(page.locator("#decision")).to_have_text(f"Most probable class: {body.get('argmax_label', body['label'])}")
    bars = page.locator("#probabilities li")
    expect(bars).to_have_count(len(body["probabilities"]))
    for i, (name, p) in enumerate(body["probabilities"].items()):
        expect(bars.nth(i).locator(".bar-label")).to_have_text(name)
        expect(bars.nth(i).locator(".bar-value")).to_have_text(f"{p * 100:.1f} %")
    expect(page.locator("#result-model")).to_contain_text(f"sha {body['model']['sha256'][:12]}")
    expect(page.locator("#result-time")).to_contain_text("in the service")
    expect(page.locator("#disclaimer")).to_be_visible()


@pytest.mark.slow
def test_png_upload_shows_the_result_and_a_heatmap_the_slider_and_switch_change(
    server: ServerProcess,
    page: Any,
) -> None:
    page.goto(server.url + "/")
    card_loaded(page)  # no key needed here
    page.evaluate("""() => {  // record every busy message, however briefly it shows
        window.busyLog = [];
        const busy = document.getElementById("busy");
        new MutationObserver(() => window.busyLog.push(busy.textContent)).observe(busy, { childList: true });
    }""")
    png = xray_png(160, 96)
    with page.expect_request(lambda r: r.url.endswith("/predict")) as sent:
        body = choose_file(page, "Jane_Roe_chest.png", png, "image/png")
    assert list(body["probabilities"]) == CLASSES_3
    expect_result(page, body)
    expect(page.locator("#result-input")).to_have_text("PNG, 160 \N{MULTIPLICATION SIGN} 96 pixels")
    assert page.evaluate("window.busyLog") == ["Analysing the image…", ""]  # said while it worked, then cleared
    expect(page.locator("#upload-section")).to_have_attribute("aria-busy", "false")

    label = body["label"]
    rendered(page, f"{label}@40")
    canvas = page.locator("#explain-canvas")
    assert canvas.evaluate("c => [c.width, c.height]") == [160, 96]  # the original size and aspect ratio
    box = canvas.bounding_box()
    assert box["width"] > 100 and box["height"] / box["width"] == pytest.approx(96 / 160, abs=0.02)
    at_40 = canvas_pixels(page)
    with httpx.Client(base_url=server.url, timeout=60.0) as http:
        overlay = http.get("/explain", params={"id": body["id"], "alpha": 0.4})
    assert np.abs(at_40 - png_to_array(overlay.content).astype(int)).max() <= 2  # the server's own blend

    slider = page.get_by_label("Heatmap opacity")
    slider.focus()
    page.keyboard.press("End")  # keyboard use: the slider is a native range input
    rendered(page, f"{label}@100")
    expect(page.locator("#opacity-value")).to_have_text("100 %")
    at_100 = canvas_pixels(page)
    assert np.abs(at_100 - at_40).mean() > 5
    page.keyboard.press("ArrowLeft")
    rendered(page, f"{label}@95")

    other = next(c for c in CLASSES_3 if c != label)
    page.get_by_role("radio", name=other).check()
    rendered(page, f"{other}@95")
    assert np.abs(canvas_pixels(page) - at_100).mean() > 1  # another class, another map

    page.get_by_label(re.compile("Show the heatmap")).uncheck()
    rendered(page, "image")
    plain = canvas_pixels(page)
    assert np.abs(plain - np.repeat(xray_array(160, 96)[..., None], 3, axis=2)).max() <= 1
    expect(slider).to_be_disabled()

    # The file name never left the browser; nothing went into storage or the URL.
    assert b"Jane_Roe" not in (sent.value.post_data_buffer or b"")
    assert "Jane" not in page.url and body["id"] not in page.url
    assert page.evaluate("[sessionStorage.length, localStorage.length]") == [0, 0]
    assert "Jane_Roe" not in server.log.read_text(errors="replace")

    page.get_by_role("button", name="Clear").click()
    expect(page.get_by_role("region", name="Result")).to_be_hidden()


@pytest.mark.slow
def test_dicom_dropped_on_a_tablet_shows_the_result_and_heatmap(server: ServerProcess, browser: Any) -> None:
    context = browser.new_context(viewport={"width": 768, "height": 1024}, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    try:
        page.goto(server.url + "/")
        pixels = xray_array(120, 150).astype(np.uint16) * 16  # 12-bit stored values, portrait
        data = dicom_bytes(pixels, bits_stored=12, window=(2048, 4096))
        body = drop_file(page, "IM000001", data, "application/dicom")
        expect_result(page, body)
        expect(page.locator("#result-input")).to_have_text("DICOM, 120 \N{MULTIPLICATION SIGN} 150 pixels")
        rendered(page, f"{body['label']}@40")
        canvas = page.locator("#explain-canvas")
        assert canvas.evaluate("c => [c.width, c.height]") == [120, 150]
        box = canvas.bounding_box()
        assert box["width"] > 100 and box["height"] / box["width"] == pytest.approx(150 / 120, abs=0.02)
        assert canvas_pixels(page).std() > 5
        # Usable at tablet width: nothing wider than the screen.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        context.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("data", "title"),
    [
        (b"Patient notes, not an image.\n", "This file is not an image the service can read"),
        (
            dicom_bytes(xray_array(32, 32).astype(np.uint16), bits_stored=8, frames=2),
            "This DICOM file has more than one frame",
        ),
    ],
    ids=["text-file", "multiframe-dicom"],
)
def test_a_refused_file_reads_as_the_servers_sentence(
    server: ServerProcess,
    page: Any,
    data: bytes,
    title: str,
) -> None:
    with httpx.Client(base_url=server.url, timeout=60.0) as http:
        refusal = http.post("/predict", files={"file": ("x", data, "application/octet-stream")}).json()
    page.goto(server.url + "/")
    choose_file(page, "notes.txt", data, "text/plain")
    alert = page.locator("#refusal")
    expect(alert).to_be_visible()
    expect(alert).to_have_attribute("role", "alert")
    expect(page.locator("#refusal-title")).to_have_text(title)
    expect(page.locator("#refusal-detail")).to_have_text(refusal["detail"])
    expect(page.get_by_role("region", name="Result")).to_be_hidden()
    expect(page.get_by_role("button", name="Choose a file…")).to_be_enabled()  # busy state is over


@pytest.mark.slow
def test_with_api_keys_the_page_asks_for_one_and_sends_it(keyed_server: ServerProcess, page: Any) -> None:
    page.goto(keyed_server.url + "/")
    expect(page.get_by_role("heading", name="API key needed")).to_be_visible()
    expect(page.get_by_role("button", name="Choose a file…")).to_be_disabled()
    key_field = page.get_by_label("API key", exact=True)
    expect(key_field).to_be_focused()

    key_field.fill("wrong-key")
    page.get_by_role("button", name="Use this key").click()
    expect(page.locator("#key-error")).to_contain_text("That key was not accepted.")
    assert page.evaluate("sessionStorage.length") == 0

    key_field.fill(KEY)
    key_field.press("Enter")
    expect(page.get_by_role("heading", name="API key needed")).to_be_hidden()
    assert page.evaluate("[sessionStorage.length, localStorage.length]") == [1, 0]
    assert page.evaluate("Object.values(sessionStorage)") == [KEY]
    with page.expect_request(lambda r: r.url.endswith("/predict")) as sent:
        body = choose_file(page, "chest.png", xray_png(160, 96), "image/png")
    assert sent.value.headers["x-api-key"] == KEY
    expect_result(page, body)
    rendered(page, f"{body['label']}@40")
    assert KEY not in keyed_server.log.read_text(errors="replace")

    page.reload()  # the key lasts for the browser session
    card_loaded(page)
    expect(page.get_by_role("heading", name="API key needed")).to_be_hidden()


@pytest.mark.slow
def test_a_file_over_the_limit_is_refused_with_the_servers_wording(keyed_server: ServerProcess, page: Any) -> None:
    big = bytes(300_000)
    with httpx.Client(base_url=keyed_server.url, timeout=60.0, headers={"X-API-Key": KEY}) as http:
        refusal = http.post("/predict", files={"file": ("x", big, "image/png")}).json()
    assert refusal["code"] == "file_too_large"
    page.goto(keyed_server.url + "/")
    expect(page.get_by_role("heading", name="API key needed")).to_be_visible()  # started (it clears a bad key)
    page.evaluate(f"sessionStorage.setItem('covid-cxr.api-key', {KEY!r})")  # as if entered earlier in this tab
    page.reload()
    expect(page.get_by_role("button", name="Choose a file…")).to_be_enabled()
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Choose a file…").click()
    chooser.value.set_files(files=[{"name": "big.png", "mimeType": "image/png", "buffer": big}])
    expect(page.locator("#refusal-title")).to_have_text("The file is too large")
    expect(page.locator("#refusal-detail")).to_have_text(refusal["detail"])


@pytest.mark.slow
def test_the_decision_rule_is_shown_when_the_response_has_one(server: ServerProcess, page: Any) -> None:
    decision = {
        "positive_class": "COVID",
        "threshold": 0.35,
        "positive": True,
        "rule": "COVID suspected when P(COVID) >= 0.35 (chosen for sensitivity >= 0.95 on validation)",
    }

    def with_decision(route: Any) -> None:  # the real answer plus the decision object bundles will carry
        answer = route.fetch()
        route.fulfill(response=answer, json={**answer.json(), "decision": decision, "argmax_label": "Normal"})

    page.route("**/predict", with_decision)
    page.goto(server.url + "/")
    choose_file(page, "chest.png", xray_png(160, 96), "image/png")
    expect(page.locator("#decision")).to_have_text("COVID suspected")
    expect(page.locator("#decision")).to_have_class(re.compile(r"\bis-positive\b"))
    expect(page.locator("#decision-note")).to_have_text(
        "Rule: COVID suspected when P(COVID) >= 0.35 (chosen for sensitivity >= 0.95 on validation). "
        "Most probable class: Normal."
    )
    expect(page.locator("#probabilities li.is-top")).to_have_attribute("data-class", "Normal")


def _rich_card(card: dict[str, Any]) -> dict[str, Any]:
    """The test bundle's card with the measured figures a trained bundle carries (and per-source ones)."""
    per_class = {
        name: {
            "precision": 0.9,
            "recall": 0.8 + i / 100,
            "f1": 0.85,
            "specificity": 0.95,
            "support": 100 + i,
            "roc_auc": 0.97,
        }
        for i, name in enumerate(card["classes"])
    }
    metrics = {
        "n": 303,
        "accuracy": 0.9123,
        "macro_f1": 0.9012,
        "split": "test",
        "per_class": per_class,
        "per_source": {
            "collection-a": {"n": 200, "accuracy": 0.95, "macro_f1": 0.94},
            "collection-b": {"n": 103, "accuracy": 0.84, "macro_f1": 0.82},
        },
    }
    decision = {
        "positive_class": "COVID",
        "threshold": 0.348,
        "rule": "COVID suspected when P(COVID) >= 0.348 (chosen on heldout_val + heldout_test)",
        "leave_one_source_out": {"sensitivity": 0.9644, "specificity": 0.8212, "per_source": {"a": {}, "b": {}}},
    }
    return {**card, "metrics": metrics, "decision": decision, "limitations": ["Not evaluated on paediatric images."]}


@pytest.mark.slow
def test_the_model_page_shows_the_card(server: ServerProcess, page: Any) -> None:
    with httpx.Client(base_url=server.url, timeout=60.0) as http:
        card = _rich_card(http.get("/model").json())
    page.route("**/model", lambda route: route.fulfill(json=card))
    page.goto(server.url + "/")
    page.get_by_role("link", name="About the model").click()
    expect(page.get_by_role("heading", name="About the model")).to_be_visible()
    assert page.url.endswith("#about")
    expect(page.get_by_role("link", name="About the model")).to_have_attribute("aria-current", "page")
    expect(page.locator("#about-summary")).to_contain_text(f"one of 3 classes: {', '.join(CLASSES_3)}")
    expect(page.locator("#about-facts")).to_contain_text(card["sha256"]["model.onnx"])
    expect(page.locator("#about-facts")).to_contain_text(
        "sensitivity 96.4 %, specificity 82.1 % (2 sources, each scored at the threshold chosen on the others)"
    )
    expect(page.locator("#about-metrics-summary")).to_have_text(
        "On 303 held-out test images, accuracy 91.2 %, macro-F1 0.901."
    )
    rows = page.locator("#about-per-class tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(1)).to_have_text(re.compile(r"^Normal\s*0\.810\s*0\.950\s*0\.900\s*0\.850\s*0\.970\s*101$"))
    sources = page.locator("#about-per-source tbody tr")
    expect(sources).to_have_count(2)
    expect(sources.nth(1)).to_have_text(re.compile(r"^collection-b\s*103\s*84\.0 %\s*0\.820$"))
    limits = page.locator("#about-limits li")
    expect(limits.first).to_contain_text("Research use only")
    expect(limits.last).to_have_text("Not evaluated on paediatric images.")
    expect(page.locator("#disclaimer")).to_be_visible()
    page.get_by_role("link", name="Triage").click()
    expect(page.get_by_role("heading", name="Triage an X-ray")).to_be_visible()
