"""Response bodies shared by several routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.model.bundle import ModelCard


class ErrorResponse(BaseModel):
    """Every error: a sentence for a person and a stable code for a program."""

    detail: str = Field(examples=["No prediction with this id: it is unknown or has expired."])
    code: str = Field(examples=["unknown_id"])


class ModelInfo(BaseModel):
    """Which model answered."""

    name: str
    arch: str
    version: str
    sha256: str = Field(description="sha256 of the served ONNX graph (model.onnx).")

    @classmethod
    def of(cls, card: ModelCard, sha256: str) -> ModelInfo:
        return cls(name=card.name, arch=card.arch, version=card.version, sha256=sha256)


ImageFormat = Literal["png", "jpeg", "dicom"]


class InputInfo(BaseModel):
    """What was decoded from the upload."""

    format: ImageFormat
    width: int
    height: int


class Timings(BaseModel):
    """Milliseconds spent in each step (total: from the upload being received to the response)."""

    decode: float
    preprocess: float
    inference: float
    total: float


def error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses=`` entries documenting the error body for these status codes."""
    return {code: {"model": ErrorResponse} for code in codes}
