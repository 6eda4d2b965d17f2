"""POST /predict: one image in, class probabilities out (and the image kept briefly for /explain)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import APIRouter, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from service.model.decision import DecisionOutcome
from service.model.imaging import DecodedImage
from service.predictor import Forward, Prediction, Predictor
from service.routes.deps import BatcherDep, PredictorDep, SettingsDep, StoreDep, WorkDep
from service.routes.schemas import ImageFormat, InputInfo, ModelInfo, Timings, error_responses
from service.routes.uploads import decode_upload, read_upload
from service.settings import Settings
from service.store import PredictionStore, StoredPrediction

router = APIRouter(tags=["model"])


class PredictionResponse(BaseModel):
    """The model's answer for one image. Research use only: never a diagnosis."""

    id: str = Field(description="Unguessable id of this prediction, for GET /explain (expires).")
    label: str = Field(
        description="The class the model's decision rule calls (see `decision`); the most probable class when "
        "the model has no rule."
    )
    argmax_label: str = Field(description="The most probable class.")
    probabilities: dict[str, float] = Field(description="Every class of the model, calibrated; they sum to 1.")
    decision: DecisionOutcome | None = Field(
        description="The model's decision rule applied to this image; null when the model has none."
    )
    gate_score: float | None = Field(
        default=None,
        description="The 'is this a chest X-ray?' score (passed: at most the threshold in /model's gate_settings); "
        "null when the gate is off or the model has none.",
    )
    model: ModelInfo
    explain_url: str = Field(description="Relative URL of the Grad-CAM overlay for this prediction.")
    input: InputInfo
    timing_ms: Timings
    disclaimer: str


@dataclass(frozen=True)
class _Classified:
    prediction_id: str
    image: DecodedImage
    prediction: Prediction
    decode_ms: float


def _classify(
    data: bytes, predictor: Predictor, store: PredictionStore, settings: Settings, forward: Forward | None
) -> _Classified:
    # One worker-thread hop for all CPU work: decode, preprocess + ORT (through the batcher when there is one),
    # compacting the image (and its CAM activations) for the store.
    start = time.perf_counter()
    image = decode_upload(data, settings)
    decode_ms = (time.perf_counter() - start) * 1000.0
    prediction = predictor.predict(image, forward=forward)
    stored = StoredPrediction.from_image(image.array, prediction.label, prediction.activations, image.levels)
    prediction_id = store.put(stored)
    return _Classified(prediction_id, image, prediction, decode_ms)


@router.post("/predict", responses=error_responses(400, 401, 413, 415, 422, 503))  # 503: not ready or overloaded
async def predict(
    request: Request,
    file: Annotated[UploadFile, File(description="A chest X-ray: PNG, JPEG or DICOM (type read from bytes)")],
    predictor: PredictorDep,
    store: StoreDep,
    settings: SettingsDep,
    batcher: BatcherDep,
    work: WorkDep,
) -> PredictionResponse:
    """Classify one chest X-ray (PNG, JPEG or DICOM) and keep it briefly for GET /explain."""
    start = time.perf_counter()
    # A work slot first (503 when the service is full): the upload is read into memory only once it has one.
    async with work.slot():
        data = await read_upload(file, settings.max_upload_bytes)
        # Reserved before decoding: a full queue answers 503 at once, and the batcher knows this image is coming.
        with batcher.reserve() if batcher is not None else nullcontext() as forward:
            result = await run_in_threadpool(_classify, data, predictor, store, settings, forward)
    card, prediction = predictor.card, result.prediction
    return PredictionResponse(
        id=result.prediction_id,
        label=prediction.label,
        argmax_label=prediction.argmax_label,
        probabilities=prediction.probabilities,
        decision=prediction.decision,
        gate_score=prediction.gate_score,
        model=ModelInfo.of(card, predictor.sha256),
        explain_url=f"{request.scope.get('root_path', '')}/explain?id={result.prediction_id}",
        input=InputInfo(
            format=cast(ImageFormat, result.image.source_format),
            width=result.image.width,
            height=result.image.height,
        ),
        timing_ms=Timings(
            decode=result.decode_ms,
            preprocess=prediction.preprocess_ms,
            inference=prediction.inference_ms,
            total=(time.perf_counter() - start) * 1000.0,
        ),
        disclaimer=card.disclaimer,
    )
