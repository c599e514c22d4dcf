"""The two state machines of the service, as enums: a job's ``status`` and a task's
``state``. The values are the strings stored in the database and shown by the API.

* job: ``queued`` (created) -> ``running`` (study opened by the scheduler) ->
  ``completed`` (N trials finished) | ``cancelled`` (by its owner) | ``failed`` (the
  scheduler could not drive it; ``error`` says why). ``finalized_at`` is set once the
  Pareto set and the winner are stored. The writes are in ``service/jobs.py``.
* task: ``queued`` -> ``leased`` -> ``done`` (result stored; also from ``queued``: the
  late result of an expired lease) | back to ``queued`` (lease
  expired, worker failure or release) | ``failed`` (attempts exhausted) | ``cancelled``
  (job cancelled or failed). ``told_at`` is set once the scheduler has told Optuna. The
  writes are in ``service/leases.py``.

Plain Python on purpose: the models, the API schemas and the scheduler all import it.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


class TaskState(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class WorkerRole(StrEnum):
    """What a worker token may do: measure latency on its target's device, or train
    candidates for a pool of trainers (its "target" is then the pool's name)."""

    LATENCY = "latency"
    TRAINER = "trainer"


class TaskKind(StrEnum):
    """A candidate's latency (a worker of the job's target) or its quality by training
    (a trainer of the job's trainer pool); the second only for candidates the first
    found within every budget."""

    LATENCY = "latency"
    QUALITY = "quality"


# The task kind each role leases.
ROLE_KIND = {WorkerRole.LATENCY: TaskKind.LATENCY, WorkerRole.TRAINER: TaskKind.QUALITY}
# The trainer pool of a job that trains, unless the job names another.
DEFAULT_TRAINER_POOL = "trainers"

# A job the scheduler still drives (or may still fail).
ACTIVE_JOB = (JobStatus.QUEUED, JobStatus.RUNNING)
# A task that still needs a worker: it counts against the job's parallelism.
IN_FLIGHT = (TaskState.QUEUED, TaskState.LEASED)
# A task whose outcome the scheduler tells Optuna (a result, or failed for good).
FINISHED = (TaskState.DONE, TaskState.FAILED)

JOB_TRANSITIONS: dict[JobStatus, tuple[JobStatus, ...]] = {
    JobStatus.QUEUED: (JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED,
                       JobStatus.COMPLETED),
    JobStatus.RUNNING: (JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.FAILED),
    JobStatus.COMPLETED: (),
    JobStatus.CANCELLED: (),
    JobStatus.FAILED: (),
}

TASK_TRANSITIONS: dict[TaskState, tuple[TaskState, ...]] = {
    # queued -> done: the late result of a lease that expired (service/leases.py)
    TaskState.QUEUED: (TaskState.LEASED, TaskState.DONE, TaskState.CANCELLED),
    TaskState.LEASED: (TaskState.DONE, TaskState.QUEUED, TaskState.FAILED,
                       TaskState.CANCELLED),
    TaskState.DONE: (),
    TaskState.FAILED: (),
    TaskState.CANCELLED: (),
}


def sources(to: JobStatus | TaskState) -> tuple:
    """The states that may move to ``to``: the ``WHERE status IN (...)`` of the conditional
    UPDATE that makes the transition (so a stale writer changes nothing)."""
    table: dict = JOB_TRANSITIONS if isinstance(to, JobStatus) else TASK_TRANSITIONS
    return tuple(s for s, nexts in table.items() if to in nexts)
