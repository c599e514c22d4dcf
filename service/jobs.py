"""Job transitions: every change of a job's ``status`` (``service/states.py``), each one a
conditional ``UPDATE ... WHERE status IN (the states it may come from)`` in the caller's
transaction, so a writer that read an old status changes nothing.

The API cancels; the scheduler starts, fails and finalizes. Cancelling or failing a job
also cancels its tasks that are still in flight (``leases.cancel_job_tasks``), the same
way for both.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.leases import cancel_job_tasks
from service.models import Job
from service.states import JobStatus, sources


def _move(s: Session, job_id: str, to: JobStatus, *, also_from: tuple = (),
          **values: Any) -> bool:
    rc = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(sources(to) + also_from))
        .values(status=to, **values)
    ).rowcount
    return rc == 1


def start(s: Session, job_id: str, now: datetime) -> bool:
    """queued -> running: the scheduler opened the job's study."""
    return _move(s, job_id, JobStatus.RUNNING, started_at=now, updated_at=now)


def cancel(s: Session, job: Job, now: datetime) -> bool:
    """queued | running -> cancelled, by its owner; its in-flight tasks are cancelled.
    False (nothing changed) when the job is past that. ``job`` is refreshed."""
    moved = _move(s, job.id, JobStatus.CANCELLED, finished_at=now, updated_at=now)
    if moved:
        cancel_job_tasks(s, job.id, now)
    s.refresh(job)
    return moved


def record_error(s: Session, job_id: str, message: str, now: datetime, *,
                 fatal: bool) -> None:
    """Store the scheduler's last error on an active job; ``fatal``: queued | running ->
    failed, and its in-flight tasks are cancelled."""
    values: dict[str, Any] = {"error": message, "updated_at": now}
    if not fatal:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(sources(JobStatus.FAILED)))
            .values(**values)
        )
        return
    if _move(s, job_id, JobStatus.FAILED, finished_at=now, **values):
        cancel_job_tasks(s, job_id, now)


def finalize(s: Session, job: Job, now: datetime, **results: Any) -> JobStatus:
    """Store the final results (Pareto set, winner, best, progress) and end the job:
    completed, or, for a job its owner cancelled, cancelled (it keeps that status).
    ``finished_at`` is set when not already."""
    values: dict[str, Any] = {"finalized_at": now, "updated_at": now, **results}
    if job.finished_at is None:
        values["finished_at"] = now
    if job.status == JobStatus.CANCELLED:
        _move(s, job.id, JobStatus.CANCELLED, also_from=(JobStatus.CANCELLED,), **values)
        return JobStatus.CANCELLED
    _move(s, job.id, JobStatus.COMPLETED, **values)
    return JobStatus.COMPLETED
