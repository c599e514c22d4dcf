"""/v1/tasks: the worker side of measurement (worker tokens only).

lease (long poll) -> heartbeat* -> result | fail | release. The bodies are
service/protocol.py, the writes service/leases.py; its errors (no such task, another
target's task, a stale lease) become 404, 403 and 409 in the handlers that
service/api/app.py registers once."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Request, Response, status
from sqlalchemy import update
from starlette.concurrency import run_in_threadpool

from service import leases
from service.api.deps import (
    AUTH_RESPONSES,
    BODY_RESPONSES,
    CurrentWorker,
    DatabaseDep,
    MetricsDep,
    SettingsDep,
    WakeScheduler,
    check_target,
)
from service.api.routes.workers import load_worker
from service.db import utcnow
from service.models import Worker
from service.protocol import (
    FailIn,
    FailOut,
    HeartbeatOut,
    LeaseOut,
    LeaseRequest,
    LeaseTokenIn,
    ProgressIn,
    ProgressOut,
    ReleaseOut,
    ResultIn,
    ResultOut,
)
from service.states import ROLE_KIND, TaskKind, TaskState, WorkerRole

router = APIRouter(prefix="/v1/tasks", tags=["tasks (workers)"],
                   responses={**AUTH_RESPONSES, **BODY_RESPONSES})

_ERRORS = {
    409: {"description": "Stale lease token: the lease expired and was re-queued, went to "
          "another worker, or the job was cancelled. Abandon the task."},
    403: {"description": "The worker token is scoped to another target"},
    404: {"description": "No such task"},
}


@router.post(
    "/lease",
    response_model=LeaseOut,
    summary="Lease the next measurement task (long poll)",
    responses={204: {"description": "Nothing to do within wait_s"}, **_ERRORS},
)
async def lease_task(body: LeaseRequest, request: Request, principal: CurrentWorker,
                     db: DatabaseDep, settings: SettingsDep):
    check_target(principal, body.target)
    kind = ROLE_KIND[WorkerRole(principal.role)]
    if body.kind is not None and body.kind != kind:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"a {principal.role} token leases {kind} tasks, not {body.kind} ones "
            f"(a latency worker never trains; a trainer never measures latency)")

    def touch():
        def op(s):
            w = load_worker(s, body.worker_id, principal)
            if w.target != body.target:
                raise HTTPException(status.HTTP_403_FORBIDDEN,
                                    f"worker {body.worker_id} serves target {w.target!r}")
            s.execute(update(Worker).where(Worker.id == w.id).values(last_heartbeat_at=utcnow()))
            return list(w.runtimes or [])

        return db.run(op)

    runtimes = await run_in_threadpool(touch)
    deadline = time.monotonic() + min(body.wait_s, settings.max_lease_wait_s)
    while True:
        grant = await run_in_threadpool(
            leases.lease_one, db, worker_id=body.worker_id, target=body.target,
            runtimes=None if kind == TaskKind.QUALITY else runtimes,
            lease_timeout_s=settings.lease_timeout_s, kind=kind,
        )
        if grant is not None:
            return {
                "task_id": grant.task_id,
                "lease_token": grant.lease_token,
                "lease_expires_at": grant.lease_expires_at,
                "attempt": grant.attempt,
                "job_id": grant.job_id,
                "trial_number": grant.trial_number,
                "kind": grant.kind,
                "task": grant.task,
            }
        remaining = deadline - time.monotonic()
        if remaining <= 0 or await request.is_disconnected():
            return Response(status_code=status.HTTP_204_NO_CONTENT)
        # the next read: after the poll interval, or at once when this process's
        # scheduler queues a task meanwhile (service/api/doorbell.py)
        await request.app.state.doorbell.wait(min(settings.lease_poll_interval_s, remaining))


@router.post("/{task_id}/heartbeat", response_model=HeartbeatOut,
             summary="Extend a lease", responses=_ERRORS)
def heartbeat_task(task_id: str, body: LeaseTokenIn, principal: CurrentWorker,
                   db: DatabaseDep, settings: SettingsDep):
    expires = leases.heartbeat(db, task_id, principal.target, body.lease_token,
                               settings.lease_timeout_s)
    return {"lease_expires_at": expires}


@router.post("/{task_id}/result", response_model=ResultOut,
             summary="Report the outcome (accepted once; a duplicate is a no-op)",
             responses=_ERRORS)
def task_result(task_id: str, body: ResultIn, principal: CurrentWorker, db: DatabaseDep,
                metrics: MetricsDep, wake: WakeScheduler):
    _check_kind(leases.task_kind(db, task_id, principal.target), body.outcome)
    try:
        accepted, _row = leases.submit_result(
            db, task_id, principal.target, body.lease_token,
            body.outcome.model_dump(mode="json"),
        )
    except leases.StaleLease:
        metrics.results.labels(principal.target, "stale").inc()
        raise
    metrics.results.labels(principal.target, "accepted" if accepted else "duplicate").inc()
    if accepted:
        wake()
        return {"accepted": True, "duplicate": False}
    return {"accepted": False, "duplicate": True}


def _check_kind(kind: str, outcome) -> None:
    """A result of the wrong kind is a 422: a latency task's success carries a latency
    measurement; a training task's carries a quality value and never a latency."""
    if kind == TaskKind.QUALITY:
        if outcome.latency is not None:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                "outcome.latency: a training task reports no latency "
                                "(a trainer never measures latency)")
        if outcome.ok and outcome.quality is None:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                "outcome.quality: a training task's result needs its quality")
    elif outcome.ok and outcome.latency is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            "outcome.latency: a latency task's result needs its measurement")


@router.post(
    "/{task_id}/progress",
    response_model=ProgressOut,
    summary="A training task's rung: extends the lease and asks the job's pruner",
    responses={**_ERRORS, 422: {"description": "Not a training task"}},
)
def task_progress(task_id: str, body: ProgressIn, request: Request,
                  principal: CurrentWorker, db: DatabaseDep, settings: SettingsDep):
    if leases.task_kind(db, task_id, principal.target) != TaskKind.QUALITY:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            "progress is for training tasks (kind quality)")
    expires = leases.heartbeat(db, task_id, principal.target, body.lease_token,
                               settings.lease_timeout_s)
    job_id, trial_number = leases.task_trial(db, task_id)
    go_on = request.app.state.scheduler.report_rung(job_id, trial_number, body.step,
                                                    body.value)
    return {"go_on": go_on, "lease_expires_at": expires}


@router.post("/{task_id}/fail", response_model=FailOut,
             summary="The worker could not run the task (spends an attempt)",
             responses=_ERRORS)
def task_fail(task_id: str, body: FailIn, principal: CurrentWorker, db: DatabaseDep,
              settings: SettingsDep, metrics: MetricsDep, wake: WakeScheduler):
    row = leases.fail_task(db, task_id, principal.target, body.lease_token, body.reason,
                           body.message, settings.max_attempts)
    metrics.results.labels(principal.target, "failed").inc()
    if row.state == TaskState.FAILED:
        wake()
    return {"requeued": row.state == TaskState.QUEUED, "attempts_used": row.attempts_used,
            "max_attempts": settings.max_attempts}


@router.post("/{task_id}/release", response_model=ReleaseOut,
             summary="Give the task back unfinished (no attempt spent)", responses=_ERRORS)
def task_release(task_id: str, body: LeaseTokenIn, principal: CurrentWorker, db: DatabaseDep):
    leases.release_task(db, task_id, principal.target, body.lease_token)
    return {"requeued": True}
