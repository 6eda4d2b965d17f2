"""Per-app state and the small ``Annotated[..., Depends(...)]`` aliases through which routes reach it."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.errors import NotReady, Unauthorized
from service.predictor import Predictor
from service.settings import Settings
from service.store import PredictionStore

API_KEY_HEADER = "X-API-Key"


@dataclass
class ServiceState:
    """What one app instance serves: its settings, prediction store and (once loaded) its predictor."""

    settings: Settings
    store: PredictionStore
    predictor: Predictor | None = None
    not_ready_reason: str = "The model bundle is still loading."

    @property
    def model_sha12(self) -> str:
        """First 12 hex digits of the served graph's sha256, for logs ("-" when no model is loaded)."""
        return self.predictor.sha256[:12] if self.predictor is not None else "-"


def get_state(request: Request) -> ServiceState:
    return cast(ServiceState, request.app.state.service)


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


def get_store(state: StateDep) -> PredictionStore:
    return state.store


def get_predictor(state: StateDep) -> Predictor:
    if state.predictor is None:
        raise NotReady(state.not_ready_reason)
    return state.predictor


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[PredictionStore, Depends(get_store)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]

_api_key_scheme = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="Required when the service has API keys configured.",
)


def require_api_key(state: StateDep, key: Annotated[str | None, Security(_api_key_scheme)]) -> None:
    """Pass when no keys are configured or the request carries one of them (constant-time comparison)."""
    keys = state.settings.api_keys
    if not keys:
        return
    offered = (key or "").encode()
    # Compare against every key (no early exit) so timing says nothing about which one nearly matched.
    matches = [secrets.compare_digest(offered, k.get_secret_value().encode()) for k in keys]
    if not key or not any(matches):
        raise Unauthorized(f"Missing or invalid API key: send a valid key in the {API_KEY_HEADER} header.")
