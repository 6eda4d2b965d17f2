"""Make docs/screenshot.png: the web page's result view for one chest X-ray, served by ``models/default``.

    .venv/bin/python docs/screenshot.py ../shared/data/cxr-ext/COVID/cxnet__005.png

Starts ``cxr-serve`` on loopback (CPU), opens the page in Debian's headless chromium, uploads the image by the file
picker, waits for the heatmap and saves a full-page screenshot. The shipped screenshot uses a COVID-CXNet image
(CC BY 4.0) from the model's test split, not one it trained on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.server import running_server  # noqa: E402  (the path above makes the repo importable)

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 120_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, help="a PNG, JPEG or DICOM chest X-ray")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(args.model_dir, Path(tmp) / "serve.log") as server,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 1500})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url + "/")
        with page.expect_file_chooser() as chooser:
            page.get_by_role("button", name="Choose a file…").click()
        chooser.value.set_files(str(args.image))
        page.wait_for_function("() => (document.getElementById('explain-canvas').dataset.rendered || '').includes('@')")
        page.evaluate("window.scrollTo(0, 0)")  # the page scrolls to its result; the header is sticky
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
