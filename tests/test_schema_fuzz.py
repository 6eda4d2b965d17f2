"""Schemathesis against a real ``cxr-serve`` process (issue 14), with a bounded budget.

One server on loopback with a tiny random-init bundle and an API key. ``schemathesis run`` (the CLI, as CI would
call it) reads the OpenAPI schema from that server and tries every operation with every check: schema examples,
boundary values (its coverage phase), then generated requests, valid and invalid; never a 5xx, status codes,
content types, headers and bodies as documented, a wrong key refused, ``Allow`` on a 405 naming the methods.
A schema cannot say "a PNG, JPEG or DICOM file", so there a valid upload is any bytes, which are rightly refused:
the second test sends schema-valid requests built on real images instead, which must all succeed as documented.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case

from tests.fixtures.images import dicom_bytes, jpeg_bytes
from tests.fixtures.server import ServerProcess, running_server
from tests.fixtures.synthetic import xray_array, xray_png

API_KEY = "schema-fuzz-key"
KEYED = {"X-API-Key": API_KEY}
EXAMPLES_PER_OPERATION = 25  # the CI budget: generated cases per operation, in each of the two tests
CLI_TIMEOUT_S = 240.0  # about 10 s on a quiet 2-core machine
UPLOAD_OPERATIONS = ("POST /predict", "POST /explain")
# The CLI's configuration: the key on every request (its ignored_auth check sends wrong ones on purpose), every
# check, but for the uploads no "schema-valid data must be accepted" (see the module docstring). In the file, not
# on the command line: a --checks option would override the per-operation setting.
CLI_CONFIG = f"""
headers = {{ "X-API-Key" = "{API_KEY}" }}
checks.enabled = true

[[operations]]
include-name = {json.dumps(list(UPLOAD_OPERATIONS))}
checks.positive_data_acceptance.enabled = false
"""
# A real image of each format, at different sizes and aspect ratios.
REAL_IMAGES = (
    xray_png(160, 96),
    jpeg_bytes(xray_array(96, 128, label="Normal", seed=1)),
    dicom_bytes(xray_array(112, 112, label="Viral Pneumonia", seed=2), bits_stored=8),
)
BUDGET = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,  # a busy 2-core box: response time is a benchmark's business, not this test's
    phases=[Phase.explicit, Phase.generate],  # no shrinking on CI: the first failing request is reported as is
    suppress_health_check=list(HealthCheck),  # image-sized multipart bodies are slow to generate; that is fine
    database=None,  # nothing written to .hypothesis/
    derandomize=True,  # the same requests on every run: a failure on CI replays locally
)


@pytest.fixture(scope="module")
def fuzzed_server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("schema-fuzz") / "serve.log"
    # Small overlays keep the /explain renders cheap; the key makes the documented security scheme real.
    with running_server(bundle_dir, log, CXR_API_KEYS=API_KEY, CXR_EXPLAIN_MAX_SIDE="64") as server:
        yield server


@pytest.mark.slow
def test_schemathesis_run_finds_nothing(fuzzed_server: ServerProcess, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CLI_CONFIG)
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run"),
        f"{fuzzed_server.url}/openapi.json",
        *("--max-examples", str(EXAMPLES_PER_OPERATION), "--workers", "1"),
        # Reproducible and bounded: a fixed seed, no shrinking, no example database.
        *("--seed", "14", "--no-shrink", "--generation-database", "none"),
    ]
    # In tmp_path: its reports and caches land there, not in the checkout.
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    documented = httpx.get(f"{fuzzed_server.url}/openapi.json").json()["paths"]
    operations = sum(len(methods) for methods in documented.values())
    assert f"Tested: {operations}" in output, output  # every operation was reached, none skipped


def real_uploads(operation: APIOperation, classes: list[str]) -> st.SearchStrategy[Case]:
    """Schema-valid cases of an upload route with a real image; for /explain a real class as the target (the
    schema's ``target`` is any string, the service knows the bundle's classes) and generated alpha and layer."""
    images = st.sampled_from(REAL_IMAGES)
    if operation.label == "POST /predict":
        return images.flatmap(lambda image: operation.as_strategy(body={"file": image}))
    return st.tuples(images, st.sampled_from(classes)).flatmap(
        lambda pair: operation.as_strategy(body={"file": pair[0]}, query={"target": pair[1]})
    )


def run_budget(cases: st.SearchStrategy[Case], session: requests.Session) -> None:
    """``EXAMPLES_PER_OPERATION`` of these cases sent and validated by schemathesis' default checks (valid data
    accepted, status, content type, headers and body as documented, never a 5xx); raises its report of the first
    response that fails one."""

    @BUDGET
    @given(case=cases)
    def call(case: Case) -> None:
        case.call_and_validate(session=session, headers=KEYED)

    call()


@pytest.mark.slow
def test_valid_requests_on_real_images_succeed_as_documented(
    fuzzed_server: ServerProcess, subtests: pytest.Subtests
) -> None:
    # Hypothesis drives schemathesis' cases here: its own @schema.parametrize over a schema made by a fixture
    # (from_fixture) fails on pytest 9.2 ("'Function' object has no attribute '_nodeid'").
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")
    with requests.Session() as session:
        session.headers.update(KEYED)
        classes = session.get(f"{fuzzed_server.url}/readyz").json()["classes"]
        for label in UPLOAD_OPERATIONS:
            method, path = label.split()
            with subtests.test(label):
                run_budget(real_uploads(schema[path][method], classes), session)
        # GET /explain of a prediction that exists, each class as the target, generated alpha and layer.
        predicted = session.post(f"{fuzzed_server.url}/predict", files={"file": ("x.png", REAL_IMAGES[0])})
        assert predicted.status_code == 200, predicted.text
        stored = {"id": predicted.json()["id"]}
        explain = schema["/explain"]["GET"]
        cases = st.sampled_from(classes).flatmap(lambda target: explain.as_strategy(query={**stored, "target": target}))
        with subtests.test("GET /explain"):
            run_budget(cases, session)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("PUT", "/explain", "GET, POST"), ("OPTIONS", "/explain", "GET, POST"), ("DELETE", "/predict", "POST")],
)
def test_method_not_allowed_names_every_method_of_the_path(
    client: TestClient, method: str, path: str, allow: str
) -> None:
    # Found by the CLI run (its allow_header_conformance check): Starlette's 405 for /explain said `Allow: GET`.
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json() == {"detail": "Method Not Allowed", "code": "method_not_allowed"}
