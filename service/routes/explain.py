"""Grad-CAM overlays: GET /explain for a stored prediction, POST /explain for an upload in one call.

``layer`` picks what comes back: the blended ``overlay`` (default), or its two ingredients at the same size,
the ``heatmap`` alone (the colour map, opaque) and the plain ``image``. A client that fetches the two once can
blend them itself at any opacity: ``(1 - alpha) * image + alpha * heatmap`` is the overlay at ``alpha``
(the web page's slider does this in a canvas, without a request per movement).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from service.predictor import DEFAULT_ALPHA, Explanation, Predictor
from service.routes.deps import PredictorDep, SettingsDep, StoreDep, WorkDep
from service.routes.schemas import error_responses
from service.routes.uploads import decode_upload, read_upload
from service.settings import Settings
from service.store import StoredPrediction

router = APIRouter(tags=["model"])

TargetQuery = Annotated[
    str | None,
    Query(description="Class to explain (default: the predicted class).", max_length=200),
]
AlphaQuery = Annotated[
    float,
    Query(ge=0.0, le=1.0, description="Heatmap opacity, 0 to 1 (layer=overlay only)."),
]
# POST /explain also takes them as form fields next to the file (what an HTML form or `curl -F` sends).
TargetForm = Annotated[
    str | None, Form(alias="target", description="Class to explain, as a form field.", max_length=200)
]
AlphaForm = Annotated[
    float | None, Form(alias="alpha", ge=0.0, le=1.0, description="Heatmap opacity, as a form field.")
]
Layer = Literal["overlay", "heatmap", "image"]
LayerQuery = Annotated[
    Layer,
    Query(
        description=(
            "What to return, all at the same size (original aspect ratio, long side capped): `overlay` the heatmap "
            "blended over the image at `alpha`; `heatmap` the target's colour map alone (opaque RGB); `image` the "
            "plain grayscale image. `(1 - a) * image + a * heatmap` equals the overlay at alpha `a`."
        )
    ),
]
PNG_RESPONSE: dict[int | str, dict[str, object]] = {
    200: {"content": {"image/png": {}}, "description": "The overlay, the heatmap alone or the plain image (PNG)."},
}


def _png(explanation: Explanation) -> Response:
    headers = {"Cache-Control": "no-store"}
    if explanation.target and explanation.target.isascii():  # the plain image has none
        headers["X-Explain-Target"] = explanation.target
    return Response(explanation.png, media_type="image/png", headers=headers)


def _render(
    gray: np.ndarray,
    predictor: Predictor,
    target: str,
    layer: Layer,
    alpha: float,
    max_side: int,
    activations: np.ndarray | None,
) -> Explanation:
    """The requested layer as PNG. The two ingredients are the overlay at opacity 1 and 0, so they match it.

    ``activations``: the image's CAM activations from its prediction (onnx engine): then no network runs here.
    """
    from service.gradcam import overlay, png_bytes  # here, not at import: it pulls in torch and matplotlib

    if layer == "overlay":
        return predictor.explanation(gray, target, alpha=alpha, max_side=max_side, activations=activations)
    if layer == "image":
        # No Grad-CAM pass and no target: opacity 0 over an all-zero map. One channel, since it is gray.
        plain = overlay(gray, np.zeros((1, 1), dtype=np.float32), 0.0, max_side)
        return Explanation(png_bytes(np.ascontiguousarray(plain[..., 0])), "")
    heat = predictor.heatmap(gray, target, activations)
    return Explanation(png_bytes(overlay(gray, heat, 1.0, max_side)), target)


def _explain_stored(
    item: StoredPrediction,
    predictor: Predictor,
    target: str | None,
    layer: Layer,
    alpha: float,
    max_side: int,
) -> Explanation:
    return _render(item.image(), predictor, target or item.label, layer, alpha, max_side, item.activations)


def _explain_upload(
    data: bytes,
    predictor: Predictor,
    target: str | None,
    layer: Layer,
    alpha: float,
    settings: Settings,
) -> Explanation:
    image = decode_upload(data, settings)
    # One forward pass: the gate (with the DICOM metadata, which the bare array below no longer has; 422 for
    # non-chest images), the label, and with the onnx engine the activations the heatmap is computed from.
    prediction = predictor.predict(image)
    target = target or prediction.label
    return _render(image.array, predictor, target, layer, alpha, settings.explain_max_side, prediction.activations)


@router.get(
    "/explain",
    response_class=Response,
    responses={**PNG_RESPONSE, **error_responses(401, 404, 422, 503)},
)
async def explain_prediction(
    prediction_id: Annotated[
        str,
        Query(alias="id", min_length=1, max_length=64, description="The id returned by /predict."),
    ],
    predictor: PredictorDep,
    store: StoreDep,
    settings: SettingsDep,
    work: WorkDep,
    target: TargetQuery = None,
    alpha: AlphaQuery = DEFAULT_ALPHA,
    layer: LayerQuery = "overlay",
) -> Response:
    """Grad-CAM overlay (PNG) of an earlier prediction, or its heatmap or image alone; 404 once expired."""
    item = store.get(prediction_id)
    if target is not None:
        predictor.class_index(target)  # a 422 for an unknown class before any work is queued
    async with work.slot():  # waits in the event loop, not on a worker thread
        explanation = await run_in_threadpool(
            _explain_stored,
            item,
            predictor,
            target,
            layer,
            alpha,
            settings.explain_max_side,
        )
    return _png(explanation)


@router.post(
    "/explain",
    response_class=Response,
    responses={**PNG_RESPONSE, **error_responses(400, 401, 413, 415, 422, 503)},
)
async def explain_upload(
    file: Annotated[UploadFile, File(description="A chest X-ray: PNG, JPEG or DICOM.")],
    predictor: PredictorDep,
    settings: SettingsDep,
    work: WorkDep,
    target: TargetQuery = None,
    alpha: AlphaQuery = DEFAULT_ALPHA,
    layer: LayerQuery = "overlay",
    target_field: TargetForm = None,
    alpha_field: AlphaForm = None,
) -> Response:
    """Grad-CAM overlay (PNG) for an uploaded image in one call (or its heatmap or image); nothing is stored.

    ``target`` and ``alpha`` may come as query parameters or as form fields next to the file (the form wins)."""
    target = target_field if target_field is not None else target
    alpha = alpha_field if alpha_field is not None else alpha
    if target is not None:
        predictor.class_index(target)
    async with work.slot():
        data = await read_upload(file, settings.max_upload_bytes)
        explanation = await run_in_threadpool(_explain_upload, data, predictor, target, layer, alpha, settings)
    return _png(explanation)
