"""Liveness and readiness probes (never behind an API key)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from service.errors import NotReady
from service.routes.deps import PredictorDep, SettingsDep, StoreDep
from service.routes.schemas import ModelInfo, error_responses

router = APIRouter(tags=["health"])


class HealthResponse(BaseModel):
    """The process is up."""

    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    """The model is loaded and verified; which one, and where it runs."""

    status: Literal["ready"] = "ready"
    model: ModelInfo
    bundle_sha256: str = Field(
        description="The bundle digest: sha256 of its manifest.json, which covers every file (card included); "
        "the value CXR_MODEL_SHA256 pins."
    )
    classes: list[str]
    providers: list[str] = Field(description="onnxruntime execution providers actually in use.")
    requested_providers: list[str]
    reference_check: Literal["pending", "passed", "failed"] = Field(
        description="The torch reference check (torch copy vs graph, closed form vs pytorch-grad-cam): 'pending' "
        "while it runs after ready (CXR_REFERENCE_CHECK=background); what is served is verified either way."
    )
    explain_engine: Literal["onnx", "torch"] = Field(
        description="How heatmaps are computed: 'onnx' in closed form from the prediction's own forward pass, "
        "'torch' Grad-CAM on the torch copy (CXR_EXPLAIN_ENGINE)."
    )


@router.get("/healthz")
async def healthz() -> HealthResponse:
    """Liveness: 200 while the process is serving requests, whether or not a model is loaded."""
    return HealthResponse()


@router.get("/readyz", responses=error_responses(503))
async def readyz(predictor: PredictorDep, settings: SettingsDep, store: StoreDep) -> ReadyResponse:
    """Readiness: 200 with model and providers once the bundle is verified and the store answers, else 503 and why."""
    # A shared store's check is network I/O (bounded by its own short timeouts), so it takes a thread.
    problem = store.unavailable_reason() if store.in_process else await run_in_threadpool(store.unavailable_reason)
    if problem is not None:
        raise NotReady(problem)
    return ReadyResponse(
        model=ModelInfo.of(predictor.card, predictor.sha256),
        bundle_sha256=predictor.bundle.digest,
        classes=list(predictor.classes),
        providers=predictor.providers,
        requested_providers=list(settings.providers),
        reference_check=predictor.reference_check,
        explain_engine=predictor.explain_engine,
    )
