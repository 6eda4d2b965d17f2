"""Scale-out on a shared Redis store: readiness and 503s while Redis is down (and recovery without a restart),
the X-Instance header, and two real ``cxr-serve`` processes explaining each other's predictions across a
Redis restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.clients import AppClient
from tests.fixtures.images import png_to_array
from tests.fixtures.redis_server import RedisServer, running_redis
from tests.fixtures.server import running_server
from tests.fixtures.synthetic import xray_png


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path) as server:
        yield server


def unreachable(server: RedisServer) -> str:
    return f"The prediction store (Redis at 127.0.0.1:{server.port}/0) cannot be reached"


def predict(http: httpx.Client) -> httpx.Response:
    """POST /predict with a synthetic X-ray (TestClient is an httpx.Client too)."""
    return http.post("/predict", files={"file": ("x.png", xray_png(96, 96), "image/png")})


def test_redis_down_gives_503_with_the_reason_and_the_app_recovers_by_itself(
    make_client: AppClient, redis_server: RedisServer
) -> None:
    with make_client(store_url=redis_server.url) as client:
        assert client.get("/readyz").status_code == 200
        made = predict(client).json()["id"]
        redis_server.stop()

        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["code"] == "not_ready"
        assert ready.json()["detail"].startswith(unreachable(redis_server))
        assert client.get("/healthz").status_code == 200  # alive: restarting the api would not help
        refused = predict(client)
        assert refused.status_code == 503 and refused.json()["code"] == "not_ready"
        assert (
            refused.json()["detail"]
            == f"{unreachable(redis_server)}; it is retried on every request. Try again shortly."
        )
        explain = client.get("/explain", params={"id": made})
        assert explain.status_code == 503 and explain.json()["code"] == "not_ready"

        redis_server.start()  # empty: nothing is persisted
        assert client.get("/readyz").status_code == 200
        assert client.get("/explain", params={"id": made}).status_code == 404
        again = predict(client).json()
        assert client.get(again["explain_url"]).status_code == 200


def test_every_response_names_the_instance_that_served_it(make_client: AppClient) -> None:
    with make_client() as first, make_client() as second:
        seen = {first.get("/healthz").headers["X-Instance"], first.get("/nope").headers["X-Instance"]}
        assert len(seen) == 1 and len(seen.pop()) == 12
        assert first.get("/healthz").headers["X-Instance"] != second.get("/healthz").headers["X-Instance"]


@pytest.mark.slow
def test_two_processes_share_one_redis_across_a_restart(
    bundle_dir: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    env = {"CXR_STORE_URL": redis_server.url, "CXR_EXPLAIN_MAX_SIDE": "64"}
    with (
        running_server(bundle_dir, tmp_path / "a.log", **env) as a,
        running_server(bundle_dir, tmp_path / "b.log", **env) as b,
        httpx.Client(base_url=a.url, timeout=60.0) as http_a,
        httpx.Client(base_url=b.url, timeout=60.0) as http_b,
    ):
        instance_a = http_a.get("/healthz").headers["X-Instance"]
        instance_b = http_b.get("/healthz").headers["X-Instance"]
        assert instance_a != instance_b

        made_by_a = predict(http_a).json()
        overlay = http_b.get(made_by_a["explain_url"])
        assert overlay.status_code == 200 and overlay.headers["X-Instance"] == instance_b
        assert png_to_array(overlay.content).shape == (64, 64, 3)

        redis_server.stop()
        for http in (http_a, http_b):
            ready = http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["detail"].startswith(unreachable(redis_server))
            assert predict(http).status_code == 503

        redis_server.start()
        for http in (http_a, http_b):
            assert http.get("/readyz").status_code == 200
        made_by_b = predict(http_b).json()
        assert http_a.get(made_by_b["explain_url"]).status_code == 200
        assert http_a.get(made_by_a["explain_url"]).status_code == 404  # lost with Redis: nothing persisted
    for server in (a, b):
        text = server.log.read_text(errors="replace")
        assert made_by_a["id"] not in text and made_by_b["id"] not in text
        assert "prediction store unreachable: ConnectionError" in text
