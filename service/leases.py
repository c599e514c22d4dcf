"""Every write to the task table: the lease protocol (the HTTP layer is
service/api/routes/tasks.py), queueing a trial's task, cancelling a job's tasks and
marking them told. The states are ``TaskState`` (service/states.py).

Every state change is one short transaction around a conditional ``UPDATE ... WHERE
state = ... AND lease_token_hash = ...``: whoever's UPDATE matches wins, on SQLite and on
PostgreSQL alike, so two workers never hold the same task and a result is accepted once.

Attempts: ``attempts_used`` counts attempts that were spent (worker reported failure,
lease expired). Leasing does not spend one; ``attempt`` in a lease is
``attempts_used + 1``. A release (worker shutting down) spends none. When
``attempts_used`` reaches ``max_attempts`` the task is ``failed`` and the scheduler tells
the trial FAIL with the last reason.

Expired leases are remembered (``expired_leases``, token hashes). A worker that was cut
off longer than its lease (a database outage: its heartbeats got 503) is not the lost
worker the reaper took it for: its late heartbeat resumes the lease if nobody leased the
task since, and its late result is accepted if the task is still unfinished, leased to
another worker or not (that worker's next call is 409: nothing is told twice). Either
gives back the attempt the expiry spent, so an outage alone never spends one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, get_args

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from search.evaluators.types import EvalTask, FailureReason
from service.db import Database, new_id, utcnow
from service.models import Job, Task, Worker
from service.states import JobStatus, TaskKind, TaskState, sources
from service.tokens import hash_token

FAILURE_REASONS = set(get_args(FailureReason))


class TaskNotFound(LookupError):
    pass


class WrongTarget(PermissionError):
    def __init__(self, task_target: str):
        super().__init__(task_target)
        self.task_target = task_target


class StaleLease(Exception):
    """The lease token is not the task's current lease (expired and re-queued, given to
    another worker, the task finished or was cancelled)."""


@dataclass
class LeaseGrant:
    task_id: str
    job_id: str
    trial_number: int
    lease_token: str
    lease_expires_at: datetime
    attempt: int
    task: dict[str, Any]
    kind: str = TaskKind.LATENCY


@dataclass
class Reaped:
    task_id: str
    job_id: str
    target: str
    requeued: bool


def _new_lease_token() -> str:
    return "fnl_" + secrets.token_urlsafe(24)


def queued_candidates(s: Session, target: str, runtimes: list[str] | None, limit: int = 8,
                      kind: str = TaskKind.LATENCY):
    q = (
        select(Task.id)
        .join(Job, Job.id == Task.job_id)
        .where(Task.target == target, Task.state == TaskState.QUEUED, Task.kind == kind,
               Job.status == JobStatus.RUNNING)
        .order_by(Task.created_at, Task.id)
        .limit(limit)
    )
    if runtimes:
        q = q.where(Task.runtime.in_(runtimes))
    return list(s.execute(q).scalars())


def lease_one(
    db: Database,
    *,
    worker_id: str,
    target: str,
    runtimes: list[str] | None,
    lease_timeout_s: float,
    kind: str = TaskKind.LATENCY,
) -> LeaseGrant | None:
    """Try once to lease the oldest queued task of ``kind`` for ``target``; None if there
    is none."""
    candidates = db.run(lambda s: queued_candidates(s, target, runtimes, kind=kind),
                        write=False)
    if not candidates:
        return None

    def op(s: Session) -> LeaseGrant | None:
        now = utcnow()
        expires = now + timedelta(seconds=lease_timeout_s)
        for task_id in candidates:
            token = _new_lease_token()
            rc = s.execute(
                update(Task)
                .where(Task.id == task_id, Task.state == TaskState.QUEUED)
                .values(
                    state=TaskState.LEASED,
                    lease_token_hash=hash_token(token),
                    lease_expires_at=expires,
                    leased_at=now,
                    worker_id=worker_id,
                )
            ).rowcount
            if rc == 1:
                row = s.get(Task, task_id)
                s.execute(
                    update(Worker).where(Worker.id == worker_id).values(last_heartbeat_at=now)
                )
                return LeaseGrant(
                    task_id=row.id,
                    job_id=row.job_id,
                    trial_number=row.trial_number,
                    lease_token=token,
                    lease_expires_at=expires,
                    attempt=row.attempts_used + 1,
                    task=row.task,
                    kind=row.kind,
                )
        return None

    return db.run(op)


def task_kind(db: Database, task_id: str, target: str) -> str:
    """The kind of a task of ``target`` (TaskNotFound, WrongTarget as for any task)."""
    return db.run(lambda s: _load(s, task_id, target).kind, write=False)


def task_trial(db: Database, task_id: str) -> tuple[str, int]:
    """(job id, trial number) of a task."""
    def read(s: Session) -> tuple[str, int]:
        row = s.get(Task, task_id)
        if row is None:
            raise TaskNotFound(task_id)
        return row.job_id, row.trial_number

    return db.run(read, write=False)


def _load(s: Session, task_id: str, target: str) -> Task:
    row = s.get(Task, task_id)
    if row is None:
        raise TaskNotFound(task_id)
    if row.target != target:
        raise WrongTarget(row.target)
    return row


def _stale_message(row: Task) -> str:
    if row.state == TaskState.CANCELLED:
        return "task cancelled: its job was cancelled"
    if row.state == TaskState.QUEUED:
        return "lease expired; the task was re-queued"
    if row.state == TaskState.DONE:
        return "task already done"
    if row.state == TaskState.FAILED:
        return "task failed for good (attempts exhausted)"
    return "lease token is not the task's current lease (it expired and was leased again)"


def _update_held(s: Session, row: Task, token_hash: str, **values: Any) -> int:
    """Write ``values`` to the task only while the lease behind ``token_hash`` still holds
    it (one conditional UPDATE: two workers can never both win). Returns the row count;
    the row is refreshed either way."""
    rc = s.execute(
        update(Task)
        .where(Task.id == row.id, Task.state == TaskState.LEASED,
               Task.lease_token_hash == token_hash)
        .values(**values)
    ).rowcount
    s.refresh(row)
    return rc


def _require_held(s: Session, row: Task, token_hash: str, **values: Any) -> Task:
    """:func:`_update_held`, raising :class:`StaleLease` when the lease is no longer held."""
    if _update_held(s, row, token_hash, **values) != 1:
        raise StaleLease(_stale_message(row))
    return row


def _expired_here(row: Task, token_hash: str) -> bool:
    return token_hash in (row.expired_leases or [])


def _refund(row: Task, token_hash: str) -> dict[str, Any]:
    """Column values that undo an expiry: the lease was alive after all."""
    return {
        "attempts_used": max(0, row.attempts_used - 1),
        "expired_leases": [h for h in row.expired_leases or [] if h != token_hash] or None,
    }


def heartbeat(db: Database, task_id: str, target: str, token: str, lease_timeout_s: float):
    """Extend a lease. One that expired and was re-queued, but not leased again since,
    is resumed (its attempt given back)."""
    th = hash_token(token)

    def op(s: Session) -> datetime:
        now = utcnow()
        expires = now + timedelta(seconds=lease_timeout_s)
        row = _load(s, task_id, target)
        if row.state == TaskState.QUEUED and _expired_here(row, th):
            rc = s.execute(
                update(Task)
                .where(Task.id == row.id, Task.state == TaskState.QUEUED,
                       Task.lease_token_hash.is_(None))
                .values(state=TaskState.LEASED, lease_token_hash=th, lease_expires_at=expires,
                        **_refund(row, th))
            ).rowcount
            s.refresh(row)
            if rc != 1:
                raise StaleLease(_stale_message(row))
        else:
            row = _require_held(s, row, th, lease_expires_at=expires)
        if row.worker_id:
            s.execute(
                update(Worker).where(Worker.id == row.worker_id).values(last_heartbeat_at=now)
            )
        return expires

    return db.run(op)


def submit_result(
    db: Database, task_id: str, target: str, token: str, outcome: dict[str, Any]
) -> tuple[bool, Task]:
    """Store a worker's outcome. Returns (accepted, task): accepted False means the same
    lease already delivered its result (a duplicate, nothing changed). A result for a
    lease that expired is accepted while the task is unfinished (queued again, or
    leased to another worker whose lease it ends)."""
    th = hash_token(token)

    def op(s: Session) -> tuple[bool, Task]:
        now = utcnow()
        row = _load(s, task_id, target)
        done = {"state": TaskState.DONE, "outcome": outcome, "finished_at": now}
        if _update_held(s, row, th, **done) == 1:
            if row.worker_id:
                s.execute(
                    update(Worker).where(Worker.id == row.worker_id).values(last_heartbeat_at=now)
                )
            return True, row
        if row.state == TaskState.DONE and row.lease_token_hash == th:
            return False, row
        if row.state in (TaskState.QUEUED, TaskState.LEASED) and _expired_here(row, th):
            current = row.lease_token_hash
            rc = s.execute(
                update(Task)
                .where(Task.id == row.id, Task.state == row.state,
                       Task.lease_token_hash.is_(None) if current is None
                       else Task.lease_token_hash == current)
                .values(lease_token_hash=th, lease_expires_at=None, **done,
                        **_refund(row, th))
            ).rowcount
            s.refresh(row)
            if rc == 1:
                return True, row
        raise StaleLease(_stale_message(row))

    return db.run(op)


def normalize_failure(reason: str, message: str) -> dict[str, str]:
    reason = (reason or "").strip()
    if reason in FAILURE_REASONS:
        return {"reason": reason, "message": message}
    label = f"{reason}: " if reason else ""
    return {"reason": "crashed", "message": f"{label}{message}"}


def _attempt_spent(used: int, give_up: bool, error: dict, now: datetime) -> dict[str, Any]:
    """Column values for a lease that ended without a result: the attempt is spent, the
    lease cleared; the task is queued again, or failed for good at the last attempt."""
    values: dict[str, Any] = {
        "attempts_used": used,
        "lease_token_hash": None,
        "lease_expires_at": None,
        "last_error": error,
        "state": TaskState.FAILED if give_up else TaskState.QUEUED,
    }
    if give_up:
        values["finished_at"] = now
    return values


def fail_task(
    db: Database,
    task_id: str,
    target: str,
    token: str,
    reason: str,
    message: str,
    max_attempts: int,
) -> Task:
    """A worker could not run the task: spend an attempt; re-queue or give up."""
    th = hash_token(token)
    error = normalize_failure(reason, message)

    def op(s: Session) -> Task:
        now = utcnow()
        row = _load(s, task_id, target)
        if row.state != TaskState.LEASED or row.lease_token_hash != th:
            raise StaleLease(_stale_message(row))
        used = row.attempts_used + 1
        give_up = used >= max_attempts
        return _require_held(s, row, th, **_attempt_spent(used, give_up, error, now))

    return db.run(op)


def release_task(db: Database, task_id: str, target: str, token: str) -> Task:
    """The worker gives the task back unfinished (shutting down): re-queue, no attempt
    spent."""
    th = hash_token(token)

    def op(s: Session) -> Task:
        return _require_held(s, _load(s, task_id, target), th, state=TaskState.QUEUED,
                             lease_token_hash=None, lease_expires_at=None)

    return db.run(op)


def reap_expired(db: Database, max_attempts: int, limit: int = 500) -> list[Reaped]:
    """Leases past their expiry: re-queue (spending an attempt) or fail the task."""
    now = utcnow()

    def find(s: Session):
        return s.execute(
            select(Task.id, Task.job_id, Task.target, Task.attempts_used, Task.worker_id,
                   Task.lease_token_hash, Task.expired_leases)
            .where(Task.state == TaskState.LEASED, Task.lease_expires_at < now)
            .limit(limit)
        ).all()

    rows = db.run(find, write=False)
    if not rows:
        return []

    def op(s: Session) -> list[Reaped]:
        out: list[Reaped] = []
        for r in rows:
            used = r.attempts_used + 1
            give_up = used >= max_attempts
            error = {
                "reason": "crashed",
                "message": f"lease expired without a heartbeat (attempt {used} of "
                f"{max_attempts}, worker {r.worker_id}); the worker was lost",
            }
            values = _attempt_spent(used, give_up, error, now)
            values["expired_leases"] = [*(r.expired_leases or []), r.lease_token_hash]
            rc = s.execute(
                update(Task)
                .where(Task.id == r.id, Task.state == TaskState.LEASED,
                       Task.lease_token_hash == r.lease_token_hash,
                       Task.lease_expires_at < now)
                .values(**values)
            ).rowcount
            if rc == 1:
                out.append(Reaped(r.id, r.job_id, r.target, requeued=not give_up))
        return out

    return db.run(op)


def extend_live_leases(db: Database, lease_timeout_s: float) -> int:
    """Give every lease a full lease from now. The scheduler calls it when it could not
    hear from the database (an outage, or a fresh start after the API was down): the
    workers' heartbeats were refused meanwhile, so an expiry says nothing about them.
    Returns how many leases were extended."""

    def op(s: Session) -> int:
        fresh = utcnow() + timedelta(seconds=lease_timeout_s)
        return s.execute(
            update(Task)
            .where(Task.state == TaskState.LEASED, Task.lease_expires_at < fresh)
            .values(lease_expires_at=fresh)
        ).rowcount

    return db.run(op)


def cancel_job_tasks(s: Session, job_id: str, now: datetime | None = None) -> int:
    """Cancel a job's tasks that are still queued or leased (the job was cancelled or
    failed): a worker holding one gets 409 on its next call."""
    return s.execute(
        update(Task)
        .where(Task.job_id == job_id, Task.state.in_(sources(TaskState.CANCELLED)))
        .values(state=TaskState.CANCELLED, lease_token_hash=None, lease_expires_at=None,
                finished_at=now or utcnow())
    ).rowcount


def enqueue(s: Session, *, job_id: str, trial_number: int, target: str, task: EvalTask,
            cache_key: str, now: datetime, kind: str = TaskKind.LATENCY) -> Task:
    """Queue a trial's measurement task, or its training (``kind`` quality, ``target`` the
    trainer pool): the scheduler, while it holds the job's lock."""
    row = Task(
        id=new_id() + new_id(),
        job_id=job_id,
        trial_number=trial_number,
        target=target,
        kind=kind,
        runtime=task.measure.runtime if task.measure is not None else "eager",
        state=TaskState.QUEUED,
        task=task.model_dump(mode="json"),
        cache_key=cache_key,
        attempts_used=0,
        created_at=now,
    )
    s.add(row)
    return row


def mark_told(s: Session, task_ids: list[str], now: datetime) -> None:
    """The scheduler told Optuna these tasks' outcomes."""
    s.execute(update(Task).where(Task.id.in_(task_ids)).values(told_at=now))


def mark_cancelled_told(s: Session, job_id: str, now: datetime) -> None:
    """A cancelled job's tasks: cancel any queued after the cancel, and mark them all
    told (a cancelled task has nothing to tell)."""
    cancel_job_tasks(s, job_id, now)
    s.execute(
        update(Task)
        .where(Task.job_id == job_id, Task.told_at.is_(None),
               Task.state == TaskState.CANCELLED)
        .values(told_at=now)
    )


def live_workers(s: Session, worker_timeout_s: float, target: str | None = None):
    """Count of live workers per target (last heartbeat within worker_timeout_s)."""
    since = utcnow() - timedelta(seconds=worker_timeout_s)
    q = (
        select(Worker.target, func.count())
        .where(Worker.last_heartbeat_at >= since)
        .group_by(Worker.target)
    )
    if target is not None:
        q = q.where(Worker.target == target)
    return dict(s.execute(q).all())


def task_counts(s: Session, job_id: str | None = None, target: str | None = None):
    """{state: count} for a job's or a target's tasks."""
    q = select(Task.state, func.count()).group_by(Task.state)
    if job_id is not None:
        q = q.where(Task.job_id == job_id)
    if target is not None:
        q = q.where(Task.target == target)
    return dict(s.execute(q).all())


__all__ = [
    "LeaseGrant",
    "Reaped",
    "StaleLease",
    "TaskNotFound",
    "WrongTarget",
    "cancel_job_tasks",
    "enqueue",
    "extend_live_leases",
    "fail_task",
    "heartbeat",
    "lease_one",
    "live_workers",
    "mark_cancelled_told",
    "mark_told",
    "reap_expired",
    "release_task",
    "submit_result",
    "task_counts",
]
