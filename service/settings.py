"""Service configuration: environment variables with the prefix ``CXR_``, overridable by keyword arguments.

Lists (``CXR_PROVIDERS``, ``CXR_API_KEYS``) are comma-separated. Nothing is read at import time: a
``Settings()`` instance reads the environment when it is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.model.bundle import DEFAULT_PROVIDERS
from service.model.gate import GatePolicy
from service.model.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

MiB = 1 << 20
# The store keeps an image as float16 at worst, so one image of max_pixels needs this many bytes per pixel.
STORED_BYTES_PER_PIXEL = 2
# Room next to that image for its CAM-layer activations (float16; DenseNet-121 at 224 px needs 98 KiB).
STORED_ACTIVATIONS_BYTES = 4 * MiB
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything the service and the CLI can be told; every field has a safe default."""

    model_config = SettingsConfigDict(env_prefix="CXR_", extra="ignore", protected_namespaces=())

    model_dir: Path = Field(default=Path("models/default"), description="Model bundle folder to serve.")
    model_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="If set, the bundle digest (sha256 of its manifest.json, shown by /readyz) must equal it, else "
        "the service stays not ready: a swapped or re-exported bundle is refused.",
    )
    providers: Annotated[list[str], NoDecode] = Field(
        default=list(DEFAULT_PROVIDERS),
        min_length=1,
        description="onnxruntime execution providers to ask for, in order (the ones in use are reported).",
    )
    max_upload_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0, description="Largest accepted file, in bytes.")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, description="Largest width x height (bomb guard).")
    store_ttl_s: float = Field(default=900.0, gt=0, description="Seconds a prediction stays for /explain.")
    store_max_items: int = Field(default=256, ge=1, description="Most predictions kept for /explain.")
    store_max_bytes: int = Field(default=512 * MiB, gt=0, description="Most image bytes kept for /explain.")
    store_url: str = Field(
        default="memory://",
        pattern=r"^(memory://$|redis://|rediss://|unix://)",
        description="Where predictions wait for /explain: memory:// (this process only) or redis://host:port/db "
        "(shared by every replica and worker).",
    )
    explain_max_side: int = Field(default=1024, ge=32, description="Long side cap of overlays, in pixels.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="If set, model routes require one of these in X-API-Key.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default=["*"],
        min_length=1,
        description="Host header values accepted (e.g. cxr.clinic.local,localhost; '*.clinic.local' for a "
        "domain); others get 400. '*': any (the default). Set it when no API keys are: it stops DNS rebinding.",
    )
    log_level: LogLevel = "INFO"
    log_format: Literal["text", "json"] = "text"
    metrics: bool = Field(default=True, description="Expose Prometheus metrics at /metrics.")
    explain_engine: Literal["auto", "onnx", "torch"] = Field(
        default="auto",
        description="How heatmaps are computed: 'onnx' in closed form from the activations the prediction's own "
        "forward pass exported (no further network run), 'torch' Grad-CAM on the torch copy; 'auto' onnx when the "
        "bundle supports it.",
    )
    reference_check: Literal["background", "startup"] = Field(
        default="background",
        description="When the torch reference check runs with the onnx explain engine (the torch copy against the "
        "graph, closed-form heatmaps against pytorch-grad-cam): 'background' right after ready (a failure withdraws "
        "the model: 503), 'startup' before ready (a cold start takes that much longer). What is served (checksums, "
        "the graph, the gate, the closed form's head) is always verified before ready; the torch engine always "
        "checks first.",
    )
    ort_threads: int = Field(
        default=0, ge=0, description="onnxruntime intra-op threads per process (0: the container's CPU limit)."
    )
    batch_max_size: int = Field(
        # Off on CPU: in three runs of bench_service.py on 2 cores, 8 clients got more images/s with parallel b1 runs
        # than with one b8 run (1.07x vs 0.91x the in-process b8). The GPU override turns it on.
        default=1,
        ge=1,
        description="Most concurrent /predict images run through the network as one batch (1: off).",
    )
    batch_max_wait_ms: float = Field(
        default=2.0,
        ge=0.0,
        le=1000.0,
        description="How long a batch waits for requests that are already being decoded (never when none are).",
    )
    batch_max_queue: int = Field(
        default=64, ge=1, description="Most /predict images waiting for the network; beyond it: 503 + Retry-After."
    )
    work_max_active: int = Field(
        default=4,
        ge=1,
        description="Most requests decoding, predicting or explaining at once (the memory ceiling: this many "
        "times one request's bound).",
    )
    work_max_queue: int = Field(
        default=32, ge=0, description="Most requests waiting for one of those slots; beyond it: 503 + Retry-After."
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="Seconds a connection has to send a complete request line and headers."
    )
    body_idle_timeout_s: float = Field(
        default=10.0, gt=0, description="Most seconds between two pieces of a request body; then 408."
    )
    min_upload_bytes_per_s: float = Field(
        default=16 * 1024, ge=0, description="Slowest average upload rate accepted after the first 5 s; then 408."
    )
    keep_alive_s: float = Field(default=5.0, gt=0, description="Seconds an idle keep-alive connection stays open.")
    max_connections: int = Field(
        default=256, ge=1, description="Most open connections (cxr-serve); beyond them uvicorn answers 503."
    )
    gate: Literal["on", "off"] = Field(
        default="on", description="Refuse images that are not chest X-rays (the bundle's gate and DICOM metadata)."
    )
    gate_dicom_modalities: Annotated[list[str], NoDecode] = Field(
        default=["CR", "DX", "DR"],
        description="DICOM Modality values accepted (others are refused); empty: Modality is not checked.",
    )
    gate_dicom_body_parts: Annotated[list[str], NoDecode] = Field(
        default=["CHEST"],
        description="DICOM BodyPartExamined values accepted when present; empty: not checked.",
    )

    @field_validator(
        "providers", "api_keys", "allowed_hosts", "gate_dicom_modalities", "gate_dicom_body_parts", mode="before"
    )
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _no_blank_keys(cls, value: Any) -> Any:
        # " , " would split into no keys at all, and no keys means no authentication: refuse, never guess.
        if isinstance(value, str) and value.strip() and not _split_commas(value):
            raise ValueError("CXR_API_KEYS holds no key, only commas and spaces; unset it to serve without keys.")
        return value

    @field_validator("model_sha256", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: Any) -> Any:
        # Compose passes an unset variable on as "": that means no pin, not a malformed digest.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, value: list[str]) -> list[str]:
        # Starlette's TrustedHostMiddleware asserts this at start-up; say it as a settings error instead.
        for pattern in value:
            if "*" in pattern[1:] or (pattern.startswith("*") and pattern != "*" and not pattern.startswith("*.")):
                raise ValueError(f"CXR_ALLOWED_HOSTS: {pattern!r} is not a host name, '*' or '*.domain'.")
        return value

    @field_validator("gate", "explain_engine", "reference_check", mode="before")
    @classmethod
    def _lower_gate(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def gate_policy(self) -> GatePolicy:
        """The gate as the predictor applies it."""
        return GatePolicy(
            enabled=self.gate == "on",
            dicom_modalities=tuple(m.upper() for m in self.gate_dicom_modalities),
            dicom_body_parts=tuple(b.upper() for b in self.gate_dicom_body_parts),
        )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _store_fits_one_image(self) -> Settings:
        # Otherwise an accepted upload could be too big to keep, and its explain_url would never work.
        needed = self.max_pixels * STORED_BYTES_PER_PIXEL + STORED_ACTIVATIONS_BYTES
        if self.store_max_bytes < needed:
            raise ValueError(
                f"store_max_bytes ({self.store_max_bytes}) must hold one image of max_pixels "
                f"({self.max_pixels} px x {STORED_BYTES_PER_PIXEL} bytes) and its CAM activations "
                f"({STORED_ACTIVATIONS_BYTES} bytes) = {needed}."
            )
        return self
