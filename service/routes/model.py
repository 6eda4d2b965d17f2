"""GET /model: the card of the served bundle."""

from __future__ import annotations

from fastapi import APIRouter

from service.model.bundle import ModelCard
from service.routes.deps import PredictorDep
from service.routes.schemas import error_responses

router = APIRouter(tags=["model"])


@router.get("/model", responses=error_responses(401, 503))
async def model_card(predictor: PredictorDep) -> ModelCard:
    """The model card: classes, checksums, metrics, provenance, the gate; ``gate_settings``: the gate as served;
    ``bundle_sha256``: the bundle digest (sha256 of its manifest.json, which covers the card too)."""
    served = {"gate_settings": predictor.gate_settings(), "bundle_sha256": predictor.bundle.digest}
    return predictor.card.model_copy(update=served)
