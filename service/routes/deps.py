"""Per-app state and the small ``Annotated[..., Depends(...)]`` aliases through which routes reach it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, cast

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.batching import MicroBatcher
from service.errors import NotReady, Unauthorized
from service.limits import WorkLimiter
from service.middleware import API_KEY_HEADER, api_key_is_valid
from service.predictor import Predictor
from service.settings import Settings
from service.store import PredictionStore


@dataclass
class ServiceState:
    """What one app instance serves: its settings, prediction store and (once loaded) its predictor."""

    settings: Settings
    store: PredictionStore
    predictor: Predictor | None = None
    not_ready_reason: str = "The model bundle is still loading."
    batcher: MicroBatcher | None = None  # gathers concurrent /predict images into one network run
    work: WorkLimiter = field(default_factory=WorkLimiter)  # admission control for decode, predict, explain

    @property
    def model_sha12(self) -> str:
        """First 12 hex digits of the served graph's sha256, for logs ("-" when no model is loaded)."""
        return self.predictor.sha256[:12] if self.predictor is not None else "-"


# The dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` one in the worker-thread pool,
# so /healthz and /readyz would wait behind model work for a thread.
async def get_state(request: Request) -> ServiceState:
    return cast(ServiceState, request.app.state.service)


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_store(state: StateDep) -> PredictionStore:
    return state.store


async def get_predictor(state: StateDep) -> Predictor:
    if state.predictor is None:
        raise NotReady(state.not_ready_reason)
    return state.predictor


async def get_batcher(state: StateDep) -> MicroBatcher | None:
    return state.batcher


async def get_work(state: StateDep) -> WorkLimiter:
    return state.work


SettingsDep = Annotated[Settings, Depends(get_settings)]
WorkDep = Annotated[WorkLimiter, Depends(get_work)]
BatcherDep = Annotated[MicroBatcher | None, Depends(get_batcher)]
StoreDep = Annotated[PredictionStore, Depends(get_store)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]

_api_key_scheme = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="Required when the service has API keys configured.",
)


async def require_api_key(state: StateDep, key: Annotated[str | None, Security(_api_key_scheme)]) -> None:
    """Pass when no keys are configured or the request carries one of them (constant-time comparison)."""
    # ApiKeyMiddleware has refused keyless requests from their headers already; this keeps the key in the
    # OpenAPI schema and guards a route mounted outside the middleware's prefixes.
    keys = state.settings.api_keys
    if keys and not api_key_is_valid(keys, key):
        raise Unauthorized(f"Missing or invalid API key: send a valid key in the {API_KEY_HEADER} header.")
