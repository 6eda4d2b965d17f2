"""Grad-CAM overlays: GET /explain for a stored prediction, POST /explain for an upload in one call."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from service.predictor import DEFAULT_ALPHA, Explanation, Predictor
from service.routes.deps import PredictorDep, SettingsDep, StoreDep
from service.routes.schemas import error_responses
from service.routes.uploads import decode_upload, read_upload
from service.settings import Settings
from service.store import StoredPrediction

router = APIRouter(tags=["model"])

TargetQuery = Annotated[
    str | None, Query(description="Class to explain (default: the predicted class).", max_length=200),
]
AlphaQuery = Annotated[float, Query(ge=0.0, le=1.0, description="Heatmap opacity, 0 to 1.")]
PNG_RESPONSE: dict[int | str, dict[str, object]] = {
    200: {"content": {"image/png": {}}, "description": "The heatmap blended over the image (PNG)."},
}


def _png(explanation: Explanation) -> Response:
    headers = {"Cache-Control": "no-store"}
    if explanation.target.isascii():
        headers["X-Explain-Target"] = explanation.target
    return Response(explanation.png, media_type="image/png", headers=headers)


def _explain_stored(
    item: StoredPrediction, predictor: Predictor, target: str | None, alpha: float, max_side: int,
) -> Explanation:
    return predictor.explanation(item.image(), target or item.label, alpha=alpha, max_side=max_side)


def _explain_upload(
    data: bytes, predictor: Predictor, target: str | None, alpha: float, settings: Settings,
) -> Explanation:
    image = decode_upload(data, settings)
    return predictor.explanation(image, target, alpha=alpha, max_side=settings.explain_max_side)


@router.get(
    "/explain", response_class=Response, responses={**PNG_RESPONSE, **error_responses(401, 404, 422, 503)},
)
async def explain_prediction(
    prediction_id: Annotated[
        str, Query(alias="id", min_length=1, max_length=64, description="The id returned by /predict."),
    ],
    predictor: PredictorDep,
    store: StoreDep,
    settings: SettingsDep,
    target: TargetQuery = None,
    alpha: AlphaQuery = DEFAULT_ALPHA,
) -> Response:
    """Grad-CAM overlay (PNG) of an earlier prediction; 404 once its id has expired."""
    item = store.get(prediction_id)
    if target is not None:
        predictor.class_index(target)  # a 422 for an unknown class before any work is queued
    explanation = await run_in_threadpool(
        _explain_stored, item, predictor, target, alpha, settings.explain_max_side,
    )
    return _png(explanation)


@router.post(
    "/explain", response_class=Response,
    responses={**PNG_RESPONSE, **error_responses(400, 401, 413, 415, 422, 503)},
)
async def explain_upload(
    file: Annotated[UploadFile, File(description="A chest X-ray: PNG, JPEG or DICOM.")],
    predictor: PredictorDep,
    settings: SettingsDep,
    target: TargetQuery = None,
    alpha: AlphaQuery = DEFAULT_ALPHA,
) -> Response:
    """Grad-CAM overlay (PNG) for an uploaded image in one call; nothing is stored."""
    if target is not None:
        predictor.class_index(target)
    data = await read_upload(file, settings.max_upload_bytes)
    explanation = await run_in_threadpool(_explain_upload, data, predictor, target, alpha, settings)
    return _png(explanation)
