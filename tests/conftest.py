"""Shared fixtures: tiny real bundles (built once per session), a loaded predictor, app clients, images."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.predictor import Predictor
from service.settings import Settings
from service.store import PredictionStore
from tests.fixtures.images import png_bytes
from tests.fixtures.synthetic import make_xray

CLASSES_3 = ["COVID", "Normal", "Viral Pneumonia"]
CLASSES_4 = [*CLASSES_3, "Lung Opacity"]
CPU = ["CPUExecutionProvider"]  # tests never need a GPU; skips ORT's noisy attempt to load CUDA
# resnet18 at 96 px: exports in about a second, and its 3 x 3 CAM grid gives each class a distinct map
# (at 64 px the 2 x 2 grid often normalises to the same map for two classes of an untrained network).
INPUT_SIZE = 96


def pytest_configure(config: pytest.Config) -> None:
    # Starlette's TestClient announces a future switch to httpx2, which is not installed here.
    config.addinivalue_line("filterwarnings", "ignore:Using `httpx` with `starlette.testclient`")


def build_test_bundle(out_dir: Path, classes: list[str], seed: int = 0, temperature: float = 1.0) -> Path:
    """A real bundle (ONNX + safetensors + card) of a seeded, untrained resnet18."""
    import torch

    from service.model.backbones import build, cam_layer_name
    from service.model.bundle import write_bundle

    torch.manual_seed(seed)
    model = build("resnet18", len(classes))
    write_bundle(model, out_dir, name="test", arch="resnet18", classes=classes, input_size=INPUT_SIZE,
                 cam_layer=cam_layer_name("resnet18"), temperature=temperature)
    return out_dir


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
    loaded.warm_up()
    return loaded


@pytest.fixture(scope="session")
def predictor4(bundle4_dir: Path) -> Predictor:
    return Predictor.load(bundle4_dir, CPU)


@pytest.fixture
def settings(bundle_dir: Path) -> Settings:
    return Settings(model_dir=bundle_dir, providers=CPU)


AppClient = Callable[..., AbstractContextManager[Any]]


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


def xray_array(width: int = 160, height: int = 96, label: str = "COVID", seed: int = 0) -> np.ndarray:
    """A synthetic chest X-ray (uint8) stretched to width x height."""
    square = make_xray(label, 128, np.random.default_rng(seed))
    return np.asarray(Image.fromarray(square).resize((width, height), Image.Resampling.BILINEAR))


def xray_unit(width: int = 160, height: int = 96, label: str = "COVID", seed: int = 0) -> np.ndarray:
    """The same image in the predictor's pixel contract: 2-D float32 in [0, 1]."""
    return xray_array(width, height, label, seed).astype(np.float32) / np.float32(255.0)


def xray_png(width: int = 160, height: int = 96, label: str = "COVID", seed: int = 0) -> bytes:
    return png_bytes(xray_array(width, height, label, seed))


def png_to_array(data: bytes) -> np.ndarray:
    """Decode PNG bytes (e.g. an /explain response) to an H x W x C uint8 array."""
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))
