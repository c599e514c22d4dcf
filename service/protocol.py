"""The worker <-> API protocol: every request and answer body of ``/v1/workers/register``,
``/v1/workers/{id}/heartbeat`` and ``/v1/tasks/*``, and their paths.

One definition for both ends: the API validates with these models (``service/api``) and
the worker builds and reads its bodies with them (``service/worker/client.py``), as do the
tests. Pydantic only (plus the evaluator's own pydantic types), so the worker imports it
with ``fitnas[worker]`` alone.

lease (long poll) -> heartbeat* -> result | fail | release; docs/service.md has the
semantics (409: the lease is stale, abandon the task).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from search.evaluators.types import EvalOutcome

TargetName = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", examples=["cpu-x86-4t"])
]

REGISTER_PATH = "/v1/workers/register"


def worker_heartbeat_path(worker_id: str) -> str:
    return f"/v1/workers/{worker_id}/heartbeat"


LEASE_PATH = "/v1/tasks/lease"


def task_path(task_id: str, action: str) -> str:
    """``/v1/tasks/{id}/heartbeat|result|fail|release``."""
    return f"/v1/tasks/{task_id}/{action}"


class In(BaseModel):
    """A request body: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


# ---- registration ----------------------------------------------------------------------


class WorkerRegister(In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "target": "cpu-x86-4t",
                    "name": "bench-01",
                    "device": "cpu",
                    "runtimes": ["eager", "torchscript", "onnxruntime"],
                    "fingerprint": {"cpu": "AMD EPYC 7B13", "cores": 4, "torch": "2.4.0"},
                }
            ]
        },
    )

    target: TargetName
    name: str = Field(min_length=1, max_length=200)
    role: Literal["latency", "trainer"] = Field(
        "latency", description="what this worker does; must be its token's role "
        "(latency: measures on the target's device; trainer: trains for a trainer pool)")
    device: str = Field("cpu", max_length=64)
    runtimes: list[str] = Field(default_factory=list, max_length=16)
    fingerprint: dict[str, Any] = Field(default_factory=dict)


class WorkerRegistered(BaseModel):
    worker_id: str
    heartbeat_interval_s: float
    lease_timeout_s: float


# ---- the task protocol -----------------------------------------------------------------


class LeaseRequest(In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"worker_id": "a1b2c3d4e5f60718",
                                         "target": "cpu-x86-4t", "wait_s": 20}]},
    )

    worker_id: str = Field(min_length=1, max_length=32)
    target: TargetName
    wait_s: float = Field(0.0, ge=0, le=30, description="long poll: wait up to this long")
    kind: Literal["latency", "quality"] | None = Field(
        None, description="the kind of task wanted; None: the one the token's role leases "
        "(another is 403)")


class LeaseOut(BaseModel):
    task_id: str
    lease_token: str
    lease_expires_at: datetime
    attempt: int
    job_id: str
    trial_number: int
    kind: Literal["latency", "quality"] = "latency"
    task: dict[str, Any] = Field(description="an EvalTask (search.evaluators.types)")


class LeaseTokenIn(In):
    lease_token: str = Field(min_length=1, max_length=200)


class HeartbeatOut(BaseModel):
    lease_expires_at: datetime


class ResultIn(In):
    lease_token: str = Field(min_length=1, max_length=200)
    outcome: EvalOutcome


class ResultOut(BaseModel):
    accepted: bool
    duplicate: bool = False


class ProgressIn(In):
    """A rung of a training task: the validation accuracy after ``step`` steps. Extends
    the lease (it is also a heartbeat) and asks the job's pruner."""

    lease_token: str = Field(min_length=1, max_length=200)
    step: int = Field(ge=0, le=10_000_000)
    value: float = Field(ge=-1e9, le=1e9)


class ProgressOut(BaseModel):
    go_on: bool = Field(description="False: the pruner stopped the candidate; report the "
                        "result at this step and end the task")
    lease_expires_at: datetime


class FailIn(In):
    lease_token: str = Field(min_length=1, max_length=200)
    reason: str = Field(max_length=100, examples=["crashed"])
    message: str = Field("", max_length=10_000)


class FailOut(BaseModel):
    requeued: bool
    attempts_used: int
    max_attempts: int


class ReleaseOut(BaseModel):
    requeued: bool = True


class Status(BaseModel):
    status: str
