"""The FastAPI application: ``create_app()`` (what ``fitnas serve`` runs).

Without auth: ``/healthz`` (process up) and ``/readyz`` (database answers and its schema
is current). ``/metrics`` (Prometheus) answers without auth unless
``FITNAS_METRICS_REQUIRE_AUTH=true``; it exposes counts only (queue depth per target,
workers, jobs by status), no job content. Everything else needs a bearer token.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import DBAPIError

from service import leases
from service.api.boundary import BodyLimits, RequestGuard, validation_errors
from service.api.deps import require_user
from service.api.doorbell import Doorbell
from service.api.metrics import CONTENT_TYPE, Metrics
from service.db import Database, error_status
from service.scheduler import Scheduler, SchedulerLoop
from service.settings import Settings, get_settings

log = logging.getLogger("fitnas.api")

API_DESCRIPTION = """\
Hardware-aware neural architecture search for efficient CNNs.

* **Users** authenticate with an API key (`Authorization: Bearer fnk_...`, made by
  `fitnas admin create-key`) and see only their own jobs.
* **Workers** authenticate with a worker token scoped to one target
  (`Authorization: Bearer fnw_...`, made by `fitnas admin create-worker-token`) and use
  only `/v1/workers/register`, `/v1/workers/{id}/heartbeat` and `/v1/tasks/*`.
"""


def create_app(settings: Settings | None = None, *, db: Database | None = None) -> FastAPI:
    settings = settings or get_settings()
    _configure_logging()
    _quiet_optuna()
    db = db or Database.from_settings(settings)
    metrics = Metrics(db, settings.worker_timeout_s)
    scheduler = Scheduler(db, settings, metrics=metrics)
    doorbell = Doorbell()
    scheduler.on_queued = doorbell.ring
    loop = SchedulerLoop(scheduler, settings.scheduler_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.scheduler_enabled:
            await loop.start()
            log.info("scheduler running every %.1fs as %s", settings.scheduler_interval_s,
                     scheduler.owner)
        try:
            yield
        finally:
            if settings.scheduler_enabled:
                await loop.stop()
            db.dispose()

    # /docs and /redoc load Swagger UI and ReDoc from the installed fastapi-offline
    # package, never from a CDN: a self-hosted service is often air-gapped.
    app = FastAPIOffline(
        title="fitnas",
        version=_version(),
        description=API_DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "jobs", "description": "Search jobs, their trials and results"},
            {"name": "targets and workers", "description": "Device classes and workers"},
            {"name": "tasks (workers)", "description": "The measurement lease protocol"},
            {"name": "operations", "description": "Health, readiness, metrics"},
        ],
    )
    app.state.settings = settings
    app.state.db = db
    app.state.metrics = metrics
    app.state.scheduler = scheduler
    app.state.doorbell = doorbell
    app.state.scheduler_loop = loop if settings.scheduler_enabled else None

    from service.api.routes import jobs, tasks, workers

    app.include_router(jobs.router)
    app.include_router(workers.router)
    app.include_router(tasks.router)

    app.add_middleware(RequestGuard, limits=BodyLimits.from_settings(settings))
    _register_error_handlers(app)

    @app.get("/healthz", tags=["operations"], summary="Liveness (no auth)")
    def healthz():
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Readiness: the database answers and is migrated (no auth)",
        responses={503: {"description": "Database down or schema not current"}},
    )
    def readyz():
        try:
            import migrations

            current = migrations.current_revision(db.engine)
            head = _head()
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return JSONResponse({"status": "unavailable", "detail": msg[:300]}, status_code=503)
        if current != head:
            return JSONResponse(
                {"status": "unavailable",
                 "detail": f"database schema at {current}, expected {head}: run "
                 "`fitnas db upgrade`"},
                status_code=503,
            )
        return {"status": "ready"}

    metrics_deps = [Depends(require_user)] if settings.metrics_require_auth else []

    @app.get("/metrics", tags=["operations"], dependencies=metrics_deps,
             summary="Prometheus metrics", response_class=Response)
    def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def _register_error_handlers(app: FastAPI) -> None:
    """The domain errors raised below the routes, as HTTP answers, in one place."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": validation_errors(list(exc.errors()))},
                            status_code=422)

    @app.exception_handler(DBAPIError)
    async def _db_error(request: Request, exc: DBAPIError):
        code = error_status(exc)
        if code == 503:
            log.error("database unavailable on %s %s: %s", request.method, request.url.path,
                      exc.orig)
            return JSONResponse({"detail": "database unavailable, retry later"},
                                status_code=503, headers={"Retry-After": "2"})
        log.warning("database refused %s %s (%d): %s", request.method, request.url.path,
                    code, exc.orig)
        detail = {422: "a value in the request does not fit the database",
                  409: "the request conflicts with stored data"}.get(code, "internal error")
        return JSONResponse({"detail": detail}, status_code=code)

    @app.exception_handler(leases.TaskNotFound)
    async def _no_task(request: Request, exc: leases.TaskNotFound):
        return JSONResponse({"detail": f"no task {exc.args[0]!r}"}, status_code=404)

    @app.exception_handler(leases.WrongTarget)
    async def _wrong_target(request: Request, exc: leases.WrongTarget):
        return JSONResponse(
            {"detail": f"this task belongs to target {exc.task_target!r}; the worker token "
             "is scoped to another target"},
            status_code=403,
        )

    @app.exception_handler(leases.StaleLease)
    async def _stale(request: Request, exc: leases.StaleLease):
        return JSONResponse({"detail": str(exc)}, status_code=409)


def _configure_logging() -> None:
    """Job, lease and scheduler events at INFO on stderr, unless the host application
    (or a test runner) configured logging already."""
    root = logging.getLogger()
    fitnas = logging.getLogger("fitnas")
    if root.handlers or fitnas.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    fitnas.addHandler(handler)
    fitnas.setLevel(logging.INFO)


def _quiet_optuna() -> None:
    # one INFO line per study/trial would drown the API log
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


_HEAD: list[str] = []


def _head() -> str:
    if not _HEAD:
        import migrations

        _HEAD.append(migrations.head_revision())
    return _HEAD[0]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fitnas")
    except Exception:  # pragma: no cover - running from a source tree without install
        return "0.0.0"
