"""The FastAPI application factory. Nothing happens at import: ``create_app`` builds an app, its lifespan
loads the bundle once (in a worker thread) and the app is ready only when that succeeded.

If the bundle cannot be served (missing, tampered, ONNX/torch mismatch) the app still starts: ``/healthz`` is
200, ``/readyz`` and the model routes answer 503 with the reason, and the log says what to do.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata

import anyio.to_thread
from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from service.batching import MicroBatcher
from service.errors import install_error_handlers
from service.limits import WorkLimiter
from service.middleware import (
    AllowedHostsMiddleware,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    HttpMetrics,
    RequestContextMiddleware,
    UploadTimeoutMiddleware,
)
from service.model.bundle import BundleError, bundle_problem, verify_digest
from service.predictor import Predictor
from service.reference_check import check_in_child
from service.routes import explain, health, model, page, predict
from service.routes import metrics as metrics_routes
from service.routes.deps import ServiceState, require_api_key
from service.settings import Settings
from service.store import PredictionStore, open_store

logger = logging.getLogger(__name__)

# Room for the multipart framing around the file (boundaries, part headers, a long file name).
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# The routes behind the API key (the routers mounted with require_api_key below).
PROTECTED_PATHS = ("/predict", "/explain", "/model")
NO_STORE_PATHS = ("/predict", "/explain")  # results about a patient's image: never cached
DOCS_STATIC_URL = "/docs-static"  # Swagger UI's script, style sheet and icon
UPLOAD_GRACE_S = 5.0  # the minimum upload rate applies after this long (a slow start is not an attack)
DESCRIPTION = (
    "Chest X-ray triage (COVID, Normal, Viral Pneumonia, or whatever classes the loaded bundle has) with "
    "Grad-CAM explanations. **Research use only: not a medical device, never a diagnosis.**"
)


def _version() -> str:
    try:
        return metadata.version("covid-cxr")
    except metadata.PackageNotFoundError:
        return "0+unknown"


async def load_predictor(state: ServiceState) -> Predictor | None:
    """Load, verify and warm up the bundle in a worker thread and serve it; on failure record why (the app stays
    up). Returns the predictor served, or None. With the onnx engine the torch reference check is left to a child
    process (``service.reference_check``): here when ``CXR_REFERENCE_CHECK=startup``, else after ready."""
    settings = state.settings
    try:
        predictor = await anyio.to_thread.run_sync(
            functools.partial(
                Predictor.load,
                settings.model_dir,
                settings.providers,
                settings.gate_policy,
                settings.explain_engine,
                settings.ort_threads,
                defer_reference=True,  # the torch engine checks in-process regardless: it explains with the copy
            )
        )
        verify_digest(predictor.bundle.digest, settings.model_sha256)
        if predictor.reference_check == "pending" and settings.reference_check == "startup":
            await anyio.to_thread.run_sync(check_reference, state, predictor, None)
            if predictor.reference_check != "passed":
                return None
        await anyio.to_thread.run_sync(predictor.warm_up, settings.batch_max_size)
    except (BundleError, OSError) as err:
        state.not_ready_reason = bundle_problem(err, settings.model_dir)
        logger.error("not ready: %s", state.not_ready_reason)
        return None
    state.predictor = predictor
    logger.info(
        "ready: model %s %s (%s, bundle sha256 %s, model.onnx %s) on %s",
        predictor.card.name,
        predictor.card.version,
        predictor.card.arch,
        predictor.bundle.digest[:12],
        state.model_sha12,
        ",".join(predictor.providers),
    )
    return predictor


def start_reference_check(state: ServiceState, predictor: Predictor) -> tuple[threading.Thread, threading.Event]:
    """The deferred torch reference check (a child process) watched from a thread; set the event to kill it."""
    stop = threading.Event()
    thread = threading.Thread(
        target=check_reference, args=(state, predictor, stop), name="reference-check", daemon=True
    )
    thread.start()
    return thread, stop


def check_reference(state: ServiceState, predictor: Predictor, stop: threading.Event | None) -> None:
    """Run the torch reference check in a child and record what it found: when it fails, the model is withdrawn
    (/readyz and the model routes answer 503 with the reason). Stopped: the check stays "pending"."""
    settings = state.settings
    result = check_in_child(
        settings.model_dir,
        predictor.requested_providers,
        predictor.bundle.digest,
        stop,
        log_level=settings.log_level,
        log_format=settings.log_format,
    )
    if result is None:
        return
    if not result.passed:
        predictor.reference_check = "failed"
        state.not_ready_reason = result.reason
        if state.predictor is predictor:
            state.predictor = None
        logger.error("not ready: %s", result.reason)
        return
    predictor.bundle.parity_max_abs_diff = result.parity_max_abs_diff
    predictor.reference_check = "passed"
    logger.info("torch reference check passed (max logit difference %.2g)", result.parity_max_abs_diff)


def create_app(
    settings: Settings | None = None,
    *,
    predictor: Predictor | None = None,
    store: PredictionStore | None = None,
) -> FastAPI:
    """Build the service. ``predictor``/``store`` replace the bundle load / in-memory store (tests)."""
    settings = settings if settings is not None else Settings()
    state = ServiceState(
        settings=settings,
        # "is None", not "or": an empty store has len() 0 and is falsy.
        store=store
        if store is not None
        else open_store(
            settings.store_url,
            settings.store_ttl_s,
            settings.store_max_items,
            settings.store_max_bytes,
        ),
        predictor=predictor,
        work=WorkLimiter(settings.work_max_active, settings.work_max_queue),
    )
    http_metrics = HttpMetrics() if settings.metrics else None
    if http_metrics is not None and state.store.in_process:  # a shared store's counts are network round trips
        http_metrics.watch_store(state.store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reference_check = None
        if state.predictor is None:
            loaded = await load_predictor(state)
            if loaded is not None and loaded.reference_check == "pending":
                reference_check = start_reference_check(state, loaded)
        if state.predictor is not None and settings.batch_max_size > 1:
            state.batcher = MicroBatcher(
                state.predictor.forward,
                max_batch=settings.batch_max_size,
                max_wait_s=settings.batch_max_wait_ms / 1000.0,
                max_queue=settings.batch_max_queue,
            )
            state.batcher.start()
        yield
        if reference_check is not None:
            thread, stop = reference_check
            stop.set()  # kills the child
            await anyio.to_thread.run_sync(thread.join)
        if state.batcher is not None:
            await anyio.to_thread.run_sync(state.batcher.close)
        if store is None:  # ours, not the caller's
            state.store.close()

    # /docs with Swagger UI's files served by the app itself (FastAPI's own /docs loads them from a CDN: a blank
    # page on an offline clinic intranet); one documentation page, so no /redoc.
    app = FastAPIOffline(
        docs_url="/docs",
        redoc_url=None,
        static_url=DOCS_STATIC_URL,
        title="covid-cxr triage API",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        form_limits={"max_files": 1, "max_fields": 8, "max_part_size": 64 * 1024},
    )
    app.state.service = state
    app.state.metrics = http_metrics
    install_error_handlers(app)
    # Added first = innermost: the request id and access log also cover refused bodies.
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
        max_upload_bytes=settings.max_upload_bytes,
    )
    app.add_middleware(
        UploadTimeoutMiddleware,
        idle_s=settings.body_idle_timeout_s,
        min_bytes_per_s=settings.min_upload_bytes_per_s,
        grace_s=UPLOAD_GRACE_S,
    )
    # Outside the body limit: a request without a valid key is refused before any of its body is read.
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, protected=PROTECTED_PATHS)
    app.add_middleware(AllowedHostsMiddleware, allowed_hosts=settings.allowed_hosts, exempt=("/healthz", "/readyz"))
    app.add_middleware(RequestContextMiddleware, metrics=http_metrics, no_store=NO_STORE_PATHS)
    app.include_router(health.router)
    app.include_router(page.router)  # the web page at / (no key: it holds no data)
    if http_metrics is not None:
        app.include_router(metrics_routes.router)
    protected = [Depends(require_api_key)]
    for router in (predict.router, explain.router, model.router):
        app.include_router(router, dependencies=protected)
    return app
