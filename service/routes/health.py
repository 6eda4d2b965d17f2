"""Liveness and readiness probes (never behind an API key)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.routes.deps import PredictorDep, SettingsDep
from service.routes.schemas import ModelInfo, error_responses

router = APIRouter(tags=["health"])


class HealthResponse(BaseModel):
    """The process is up."""

    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    """The model is loaded and verified; which one, and where it runs."""

    status: Literal["ready"] = "ready"
    model: ModelInfo
    classes: list[str]
    providers: list[str] = Field(description="onnxruntime execution providers actually in use.")
    requested_providers: list[str]


@router.get("/healthz")
async def healthz() -> HealthResponse:
    """Liveness: 200 while the process is serving requests, whether or not a model is loaded."""
    return HealthResponse()


@router.get("/readyz", responses=error_responses(503))
async def readyz(predictor: PredictorDep, settings: SettingsDep) -> ReadyResponse:
    """Readiness: 200 with model and providers once the bundle is loaded and verified, else 503 and why."""
    return ReadyResponse(
        model=ModelInfo.of(predictor.card, predictor.sha256),
        classes=list(predictor.classes),
        providers=predictor.providers,
        requested_providers=list(settings.providers),
    )
