"""GET /model: the card of the served bundle."""

from __future__ import annotations

from fastapi import APIRouter

from service.model.bundle import ModelCard
from service.routes.deps import PredictorDep
from service.routes.schemas import error_responses

router = APIRouter(tags=["model"])


@router.get("/model", responses=error_responses(401, 503))
async def model_card(predictor: PredictorDep) -> ModelCard:
    """The model card: classes, checksums, metrics, provenance, the gate; ``gate_settings``: the gate as served."""
    return predictor.card.model_copy(update={"gate_settings": predictor.gate_settings()})
