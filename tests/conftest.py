"""Shared fixtures: tiny real bundles (built once per session), a loaded predictor, app clients.

Helpers and constants live in ``tests.fixtures``; import them from there, never from this file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from service.model.decision import Decision
from service.model.imaging import decode_image
from service.predictor import Predictor
from service.settings import Settings
from service.store import PredictionStore
from tests.fixtures.bundles import CLASSES_3, CLASSES_4, CPU, build_test_bundle
from tests.fixtures.clients import AppClient
from tests.fixtures.synthetic import xray_png

CALIBRATION = {"method": "temperature", "temperature": 1.0, "ece": 0.05}
PROBES = {"border_only_auc": 0.58}
SOURCES = {"synthetic": {"train": 60, "val": 10, "test": 10}}


def pytest_configure(config: pytest.Config) -> None:
    # Starlette's TestClient announces a future switch to httpx2, which is not installed here.
    config.addinivalue_line("filterwarnings", "ignore:Using `httpx` with `starlette.testclient`")


@pytest.fixture(autouse=True)
def _no_cxr_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read CXR_* variables; a developer's own (e.g. CXR_API_KEYS) must not change test results."""
    for name in list(os.environ):
        if name.upper().startswith("CXR_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_bundle(tmp_path_factory.mktemp("bundles") / "three-class", CLASSES_3)


@pytest.fixture(scope="session")
def bundle4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_bundle(tmp_path_factory.mktemp("bundles") / "four-class", CLASSES_4, seed=1)


@pytest.fixture(scope="session")
def predictor(bundle_dir: Path) -> Predictor:
    loaded = Predictor.load(bundle_dir, CPU)
    loaded.warm_up(max_batch=2)  # the micro-batcher's batch size too, as the app does with batching on
    return loaded


@pytest.fixture(scope="session")
def predictor4(bundle4_dir: Path) -> Predictor:
    return Predictor.load(bundle4_dir, CPU)


@pytest.fixture(scope="session")
def decision_bundle_dir(tmp_path_factory: pytest.TempPathFactory, predictor: Predictor) -> Path:
    """The session bundle's network (same seed, same outputs) with a decision rule, calibration, probes and
    sources in its card. The rule calls the runner-up class of ``xray_png()`` from 90 % of its probability,
    so for that image the label is not the most probable class."""
    probabilities = predictor.predict(decode_image(xray_png())).probabilities
    runner_up = sorted(probabilities, key=lambda name: probabilities[name])[-2]
    threshold = round(probabilities[runner_up] * 0.9, 4)
    decision = Decision(
        positive_class=runner_up,
        threshold=threshold,
        rule=f"{runner_up} suspected when P({runner_up}) >= {threshold} (a test rule)",
    )
    out = tmp_path_factory.mktemp("bundles") / "with-decision"
    return build_test_bundle(out, CLASSES_3, decision=decision, calibration=CALIBRATION, probes=PROBES, sources=SOURCES)


@pytest.fixture(scope="session")
def decision_predictor(decision_bundle_dir: Path) -> Predictor:
    return Predictor.load(decision_bundle_dir, CPU)


@pytest.fixture
def settings(bundle_dir: Path) -> Settings:
    return Settings(model_dir=bundle_dir, providers=CPU)


@pytest.fixture
def make_client(bundle_dir: Path, predictor: Predictor) -> AppClient:
    """``with make_client(store=..., predictor=..., **settings) as client:``: the real app, lifespan included.

    By default the session's already-loaded predictor is injected (loading is tested on its own); pass
    ``predictor=None`` to make the lifespan load ``model_dir`` itself.
    """
    from fastapi.testclient import TestClient

    from service.app import create_app

    session_predictor = predictor

    @contextmanager
    def factory(
        *,
        store: PredictionStore | None = None,
        predictor: Predictor | str | None = "session",
        **overrides: Any,
    ) -> Iterator[TestClient]:
        app_settings = Settings(**{"model_dir": bundle_dir, "providers": CPU, **overrides})
        injected = session_predictor if predictor == "session" else predictor
        assert injected is None or isinstance(injected, Predictor)
        with TestClient(create_app(app_settings, predictor=injected, store=store)) as client:
            yield client

    return factory


@pytest.fixture
def client(make_client: AppClient) -> Iterator[Any]:
    with make_client() as test_client:
        yield test_client
