"""/v1/targets (named device classes) and /v1/workers (registration, liveness, list)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.api.deps import (
    AUTH_RESPONSES,
    CurrentUser,
    CurrentWorker,
    DatabaseDep,
    SettingsDep,
    WorkerPrincipal,
    check_role,
    check_target,
)
from service.api.schemas import MAX_OFFSET, TargetCreate, TargetOut, WorkerPage
from service.db import new_id, utcnow
from service.leases import live_workers
from service.models import Target, Task, Worker
from service.protocol import Status, WorkerRegister, WorkerRegistered
from service.states import IN_FLIGHT, TaskState

router = APIRouter(prefix="/v1", tags=["targets and workers"], responses=AUTH_RESPONSES)


def _target_views(s: Session, names: list[str] | None, worker_timeout_s: float) -> list[dict]:
    q = select(Target).order_by(Target.name)
    if names is not None:
        q = q.where(Target.name.in_(names))
    targets = s.execute(q).scalars().all()
    live = live_workers(s, worker_timeout_s)
    tasks: dict[tuple[str, str], int] = {
        (t, st): n
        for t, st, n in s.execute(
            select(Task.target, Task.state, func.count())
            .where(Task.state.in_(IN_FLIGHT))
            .group_by(Task.target, Task.state)
        ).all()
    }
    return [
        {
            "name": t.name,
            "description": t.description,
            "created_at": t.created_at,
            "live_workers": live.get(t.name, 0),
            "queued_tasks": tasks.get((t.name, TaskState.QUEUED), 0),
            "leased_tasks": tasks.get((t.name, TaskState.LEASED), 0),
        }
        for t in targets
    ]


@router.post("/targets", status_code=status.HTTP_201_CREATED, response_model=TargetOut,
             summary="Create a target (a named device class)",
             responses={409: {"description": "A target with this name exists"}})
def create_target(body: TargetCreate, user: CurrentUser, db: DatabaseDep,
                  settings: SettingsDep):
    def op(s: Session):
        if s.get(Target, body.name) is not None:
            raise HTTPException(status.HTTP_409_CONFLICT, f"target {body.name!r} exists")
        s.add(Target(name=body.name, description=body.description, created_at=utcnow()))
        s.flush()
        return _target_views(s, [body.name], settings.worker_timeout_s)[0]

    return db.run(op)


@router.get("/targets", response_model=list[TargetOut], summary="List targets")
def list_targets(user: CurrentUser, db: DatabaseDep, settings: SettingsDep):
    return db.run(
        lambda s: _target_views(s, None, settings.worker_timeout_s), write=False
    )


@router.get("/targets/{name}", response_model=TargetOut, summary="A target")
def get_target(name: str, user: CurrentUser, db: DatabaseDep, settings: SettingsDep):
    views = db.run(
        lambda s: _target_views(s, [name], settings.worker_timeout_s), write=False
    )
    if not views:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no target {name!r}")
    return views[0]


@router.post("/workers/register", response_model=WorkerRegistered,
             summary="Register a worker (worker token)",
             responses={403: {"description": "The token is scoped to another target"}})
def register_worker(body: WorkerRegister, principal: CurrentWorker, db: DatabaseDep,
                    settings: SettingsDep):
    check_target(principal, body.target)
    check_role(principal, body.role)

    def op(s: Session) -> str:
        now = utcnow()
        row = s.execute(
            select(Worker).where(Worker.token_id == principal.token_id, Worker.name == body.name)
        ).scalar_one_or_none()
        if row is None:
            row = Worker(id=new_id(), target=body.target, token_id=principal.token_id,
                         name=body.name, registered_at=now)
            s.add(row)
        row.device = body.device
        row.runtimes = list(body.runtimes)
        row.fingerprint = body.fingerprint
        row.last_heartbeat_at = now
        s.flush()
        return row.id

    worker_id = db.run(op)
    return {
        "worker_id": worker_id,
        "heartbeat_interval_s": settings.heartbeat_interval_s,
        "lease_timeout_s": settings.lease_timeout_s,
    }


def load_worker(s: Session, worker_id: str, principal: WorkerPrincipal) -> Worker:
    row = s.get(Worker, worker_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"unknown worker {worker_id!r}; register again")
    check_target(principal, row.target)
    return row


@router.post("/workers/{worker_id}/heartbeat", response_model=Status,
             summary="Worker liveness while idle (worker token)")
def worker_heartbeat(worker_id: str, principal: CurrentWorker, db: DatabaseDep):
    def op(s: Session) -> None:
        load_worker(s, worker_id, principal)
        s.execute(update(Worker).where(Worker.id == worker_id)
                  .values(last_heartbeat_at=utcnow()))

    db.run(op)
    return {"status": "ok"}


@router.get("/workers", response_model=WorkerPage,
            summary="List workers with their last heartbeat")
def list_workers(
    user: CurrentUser,
    db: DatabaseDep,
    settings: SettingsDep,
    target: str | None = None,
    live: Annotated[
        bool | None, Query(description="only live (true) or only silent (false)")
    ] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
):
    since = utcnow() - timedelta(seconds=settings.worker_timeout_s)

    def read(s: Session):
        cond = []
        if target is not None:
            cond.append(Worker.target == target)
        if live is True:
            cond.append(Worker.last_heartbeat_at >= since)
        elif live is False:
            cond.append(Worker.last_heartbeat_at < since)
        total = s.execute(select(func.count()).select_from(Worker).where(*cond)).scalar_one()
        rows = s.execute(
            select(Worker).where(*cond).order_by(Worker.target, Worker.name, Worker.id)
            .offset(offset).limit(min(limit, settings.max_page_size))
        ).scalars().all()
        return total, rows

    total, rows = db.run(read, write=False)
    items = [
        {
            "id": w.id, "target": w.target, "name": w.name, "device": w.device,
            "runtimes": w.runtimes or [], "fingerprint": w.fingerprint or {},
            "registered_at": w.registered_at, "last_heartbeat_at": w.last_heartbeat_at,
            "live": w.last_heartbeat_at >= since,
        }
        for w in rows
    ]
    return {"total": total, "offset": offset, "limit": limit, "items": items}
