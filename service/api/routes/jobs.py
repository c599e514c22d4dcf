"""/v1/jobs: create (idempotent with Idempotency-Key), list, get, cancel, trials, Pareto
set, winner and export downloads. A user sees only their own jobs (others' are 404)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import jobs
from service.api.deps import (
    AUTH_RESPONSES,
    BODY_RESPONSES,
    CurrentUser,
    DatabaseDep,
    SettingsDep,
    User,
    WakeScheduler,
)
from service.api.schemas import (
    MAX_OFFSET,
    ExportFormat,
    JobCreate,
    JobOut,
    JobPage,
    ParetoOut,
    TrialPage,
    WinnerOut,
)
from service.db import Database, new_id, utcnow
from service.models import Job, Target, WorkerToken
from service.settings import Settings
from service.states import JobStatus, WorkerRole
from service.studies import load_study, trial_view

log = logging.getLogger("fitnas.api")

router = APIRouter(prefix="/v1", tags=["jobs"], responses=AUTH_RESPONSES)

MEDIA_TYPES = {
    "json": "application/json",
    "pytorch": "text/x-python; charset=utf-8",
    "torchscript": "application/octet-stream",
    "onnx": "application/octet-stream",
}
_EXPORT_LOCKS: dict[str, threading.Lock] = {}
_EXPORT_LOCKS_GUARD = threading.Lock()


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def build_config(body: JobCreate):
    """The job's SearchConfig (422 with one clear line when it cannot be made)."""
    from search.space import BUILTIN_SPACES, DesignSpace, SpaceError
    from search.study import SearchConfig

    space = body.space
    if isinstance(space, str):
        if space not in BUILTIN_SPACES:
            raise _unprocessable(
                f"space: {space!r} is not a built-in space ({', '.join(BUILTIN_SPACES)}); "
                "send a design space object to use your own"
            )
        try:
            space = DesignSpace.load(space)
        except SpaceError as exc:  # pragma: no cover - built-ins are tested
            raise _unprocessable(str(exc)) from exc
    if body.measure.reference is not None:
        from blocks.load import SpecLoadError, parse_spec

        try:
            parse_spec(body.measure.reference)  # text only: the API never opens a path
        except SpecLoadError as exc:
            raise _unprocessable(f"measure.reference: {exc}") from exc
    quality = body.quality
    if body.signal is not None:
        quality = quality.model_copy(update={"signal": body.signal})
    try:
        config = SearchConfig(
            space=space,
            target=body.target,
            budgets=body.budgets,
            trials=body.trials,
            measure=body.measure,
            quality=quality,
            sampler=body.sampler,
            seed=body.seed,
            population_size=body.population_size,
            timeout_s=body.timeout_s,
            memory_mb=body.memory_mb,
            seed_specs=body.seed_specs,
            trainer_pool=body.trainer_pool,
        )
    except ValidationError as exc:
        raise _unprocessable(_first_error(exc)) from exc
    from search.feasibility import API_NAMES, unreachable_budgets

    impossible = unreachable_budgets(
        config.space, config.budgets.cost_limits(), resolution=config.measure.resolution,
        batch=config.measure.batch, dtype=config.measure.dtype, seed=config.seed or 0,
        names=API_NAMES)
    if impossible:
        raise _unprocessable(impossible)
    return config


def job_out(job: Job, *, with_config: bool = False) -> dict[str, Any]:
    progress = dict(job.progress or {})
    progress.setdefault("trials", job.trials)
    return {
        "id": job.id,
        "name": job.name,
        "target": job.target,
        "status": job.status,
        "trials": job.trials,
        "parallelism": job.parallelism,
        "study_name": job.study_name,
        "progress": progress,
        "best": job.best,
        "error": job.error,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "finalized": job.finalized_at is not None,
        "config": job.config if with_config else None,
    }


def _own_job(db: Database, user: User, job_id: str) -> Job:
    job = db.run(lambda s: s.get(Job, job_id), write=False)
    if job is None or job.owner != user.owner:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    return job


@router.post(
    "/jobs",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    summary="Create a search job",
    responses={
        200: {"description": "Replay: a job with this Idempotency-Key exists; it is returned"},
        409: {"description": "The Idempotency-Key was used with a different request"},
        413: BODY_RESPONSES[413],
        422: {"description": "Invalid job (unknown target, bad space, limits): the field "
              "and the reason"},
    },
)
def create_job(
    body: JobCreate,
    response: Response,
    user: CurrentUser,
    db: DatabaseDep,
    settings: SettingsDep,
    wake: WakeScheduler,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=200,
            description="retrying a create with the same key returns the same job",
        ),
    ] = None,
):
    if body.trials > settings.max_trials:
        raise _unprocessable(f"trials: at most {settings.max_trials} on this server")
    if body.parallelism > settings.max_parallelism:
        raise _unprocessable(f"parallelism: at most {settings.max_parallelism} on this server")
    config = build_config(body)
    request_hash = hashlib.sha256(
        json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()

    def find_existing(s: Session) -> Job | None:
        if not idempotency_key:
            return None
        return s.execute(
            select(Job).where(Job.owner == user.owner, Job.idempotency_key == idempotency_key)
        ).scalar_one_or_none()

    def op(s: Session) -> tuple[Job, bool]:
        existing = find_existing(s)
        if existing is not None:
            return existing, False
        if s.get(Target, body.target) is None:
            raise _unprocessable(
                f"target: unknown target {body.target!r}; create it with POST /v1/targets "
                "or `fitnas admin create-worker-token --target NAME`"
            )
        if config.quality.signal == "train" and s.execute(
                select(WorkerToken.id).where(WorkerToken.target == config.trainer_pool,
                                             WorkerToken.role == WorkerRole.TRAINER)
                .limit(1)).first() is None:
            raise _unprocessable(
                f"trainer_pool: no trainer serves pool {config.trainer_pool!r}; a 'train' "
                "job's candidates are trained by trainers, never by the target's workers: "
                f"`fitnas admin create-worker-token --role trainer --target "
                f"{config.trainer_pool}`, then `fitnas worker --role trainer`")
        now = utcnow()
        job_id = new_id()
        job = Job(
            id=job_id,
            owner=user.owner,
            name=body.name,
            target=body.target,
            status=JobStatus.QUEUED,
            config=config.model_dump(mode="json"),
            trials=body.trials,
            parallelism=body.parallelism,
            study_name=f"fitnas-job-{job_id}",
            idempotency_key=idempotency_key or None,
            request_hash=request_hash,
            progress={"trials": body.trials},
            created_at=now,
            updated_at=now,
        )
        s.add(job)
        s.flush()
        return job, True

    try:
        job, created = db.run(op)
    except IntegrityError:
        # the same Idempotency-Key raced in from another request: return that job
        job = db.run(find_existing, write=False)
        if job is None:
            raise
        created = False
    if not created:
        if job.request_hash != request_hash:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                "Idempotency-Key was already used for a different job request",
            )
        response.status_code = status.HTTP_200_OK
    else:
        log.info("job %s created by %s: %d trials on %s", job.id, user.owner, job.trials,
                 job.target)
        wake()
    return job_out(job, with_config=True)


@router.get("/jobs", response_model=JobPage, summary="List your jobs (newest first)")
def list_jobs(
    user: CurrentUser,
    db: DatabaseDep,
    settings: SettingsDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
):
    limit = min(limit, settings.max_page_size)

    def read(s: Session):
        cond = [Job.owner == user.owner]
        if status_ is not None:
            cond.append(Job.status == status_)
        total = s.execute(select(func.count()).select_from(Job).where(*cond)).scalar_one()
        rows = s.execute(
            select(Job).where(*cond).order_by(Job.created_at.desc(), Job.id.desc())
            .offset(offset).limit(limit)
        ).scalars().all()
        return total, rows

    total, rows = db.run(read, write=False)
    return {"total": total, "offset": offset, "limit": limit,
            "items": [job_out(j) for j in rows]}


@router.get("/jobs/{job_id}", response_model=JobOut, summary="A job: status, progress, best")
def get_job(job_id: str, user: CurrentUser, db: DatabaseDep):
    return job_out(_own_job(db, user, job_id), with_config=True)


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job",
    responses={409: {"description": "The job already completed or failed"}},
)
def cancel_job(
    job_id: str, user: CurrentUser, db: DatabaseDep, wake: WakeScheduler,
):
    _own_job(db, user, job_id)

    def op(s: Session) -> Job:
        job = s.get(Job, job_id)
        if not jobs.cancel(s, job, utcnow()) and job.status != JobStatus.CANCELLED:
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {job.status}")
        return job

    job = db.run(op)
    wake()
    return job_out(job, with_config=True)


def _study_and_driver(settings: Settings, job: Job):
    from search.study import SearchConfig, SearchDriver

    study = load_study(settings.optuna_url, job.study_name)
    if study is None:
        return None, None
    return study, SearchDriver(study, SearchConfig.model_validate(job.config))


@router.get("/jobs/{job_id}/trials", response_model=TrialPage, summary="A job's trials")
def list_trials(
    job_id: str,
    user: CurrentUser,
    db: DatabaseDep,
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    state: Annotated[
        str | None, Query(description="COMPLETE, PRUNED, FAIL or RUNNING")
    ] = None,
    feasible: bool | None = None,
    include_spec: bool = False,
):
    job = _own_job(db, user, job_id)
    study, _ = _study_and_driver(settings, job)
    trials = [] if study is None else study.get_trials(deepcopy=False)
    views = [trial_view(t, include_spec=include_spec) for t in trials]
    if state is not None:
        views = [v for v in views if v["state"] == state.upper()]
    if feasible is not None:
        views = [v for v in views if v["feasible"] == feasible]
    views.sort(key=lambda v: v["number"])
    limit = min(limit, settings.max_page_size)
    return {"total": len(views), "offset": offset, "limit": limit,
            "items": views[offset: offset + limit]}


def _live_pareto(settings: Settings, job: Job) -> tuple[list[dict], dict | None]:
    from service.studies import summarize

    _, driver = _study_and_driver(settings, job)
    if driver is None:
        return [], None
    rec = driver.recommend()
    return [summarize(t) for t in driver.pareto()], (summarize(rec) if rec else None)


@router.get("/jobs/{job_id}/pareto", response_model=ParetoOut,
            summary="Feasible Pareto set (quality up, latency down)")
def get_pareto(job_id: str, user: CurrentUser, db: DatabaseDep, settings: SettingsDep):
    job = _own_job(db, user, job_id)
    if job.finalized_at is not None:
        return {"job_id": job.id, "final": True, "items": job.pareto or []}
    items, _ = _live_pareto(settings, job)
    return {"job_id": job.id, "final": False, "items": items}


def _export_links(job_id: str) -> dict[str, str]:
    return {fmt: f"/v1/jobs/{job_id}/export?format={fmt}" for fmt in MEDIA_TYPES}


@router.get("/jobs/{job_id}/winner", response_model=WinnerOut,
            summary="The recommended architecture (so far, until the job finishes)")
def get_winner(job_id: str, user: CurrentUser, db: DatabaseDep, settings: SettingsDep):
    job = _own_job(db, user, job_id)
    if job.finalized_at is not None:
        winner, final = job.winner, True
    else:
        _, winner = _live_pareto(settings, job)
        final = False
    return {"job_id": job.id, "final": final, "trial": winner,
            "exports": _export_links(job.id) if winner else {}}


def _spec_for_export(settings: Settings, job: Job, trial: int | None) -> tuple[dict, int]:
    if trial is None:
        if job.finalized_at is not None:
            winner = job.winner
        else:
            _, winner = _live_pareto(settings, job)
        if not winner or "spec" not in winner:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                "no trial met every budget (yet): there is no winner to export; "
                "pass ?trial=N to export a specific trial",
            )
        return winner["spec"], winner["number"]
    study, _ = _study_and_driver(settings, job)
    if study is not None:
        for t in study.get_trials(deepcopy=False):
            if t.number == trial and "spec" in t.user_attrs:
                return json.loads(t.user_attrs["spec"]), trial
    raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has no trial {trial}")


def _export_file(export_dir: Path, spec_dict: dict, fmt: str, resolution: int | None) -> Path:
    from blocks.export import FILE_NAMES, export
    from blocks.spec import ArchSpec

    spec = ArchSpec.model_validate(spec_dict)
    folder = export_dir / f"{spec.hash[:32]}-r{resolution or spec.resolution}"
    path = folder / FILE_NAMES[fmt]
    if path.is_file():
        return path
    with _EXPORT_LOCKS_GUARD:
        lock = _EXPORT_LOCKS.setdefault(str(path), threading.Lock())
    with lock:
        if path.is_file():
            return path
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
        try:
            out = export(spec, fmt, tmp / FILE_NAMES[fmt], resolution=resolution)
            Path(out).replace(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


@router.get(
    "/jobs/{job_id}/export",
    summary="Download an export of the winner (or of ?trial=N)",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}, "application/json": {},
                          "text/x-python": {}}},
        404: {"description": "No winner (no feasible trial) or no such trial"},
    },
)
def export_job(
    job_id: str,
    user: CurrentUser,
    db: DatabaseDep,
    settings: SettingsDep,
    format: Annotated[ExportFormat, Query(description="json, pytorch, torchscript, onnx")] = "json",
    trial: Annotated[int | None, Query(ge=0, le=MAX_OFFSET)] = None,
):
    from blocks.export import ExportError

    job = _own_job(db, user, job_id)
    spec_dict, number = _spec_for_export(settings, job, trial)
    resolution = (job.config.get("measure") or {}).get("resolution")
    try:
        path = _export_file(Path(settings.export_dir), spec_dict, format, resolution)
    except (ExportError, ImportError) as exc:
        raise HTTPException(
            status.HTTP_500_INTERNAL_SERVER_ERROR, f"export to {format} failed: {exc}"
        ) from exc
    filename = f"fitnas-{job.id}-trial{number}-{path.name}"
    return FileResponse(path, media_type=MEDIA_TYPES[format], filename=filename)
