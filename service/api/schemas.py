"""Request and response models of the user-facing REST API (with OpenAPI examples). The
worker protocol's models are in ``service/protocol.py``, shared with the worker."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictInt, Tag

from search.evaluators.types import MeasureSettings, QualitySettings, Signal
from search.space import DesignSpace
from search.study import Budgets
from service.protocol import In as _In
from service.protocol import TargetName
from service.states import DEFAULT_TRAINER_POOL, JobStatus

ExportFormat = Literal["json", "pytorch", "torchscript", "onnx"]


# Every number that reaches a database column fits it: offsets and trial numbers stay
# within a signed 32-bit integer (SQLite and PostgreSQL both hold it).
MAX_OFFSET = 2**31 - 1


def _space_form(v: Any) -> str:
    return "name" if isinstance(v, str) else "inline"


# A name or an inline space, told apart by the value's JSON type, so that an invalid
# inline space reports its own errors (not "space: Input should be a valid string").
SpaceField = Annotated[
    Annotated[str, Tag("name"), Field(max_length=100)]
    | Annotated[DesignSpace, Tag("inline")],
    Discriminator(_space_form),
]


# ---- jobs ------------------------------------------------------------------------------------

JOB_EXAMPLE = {
    "name": "edge-classifier",
    "target": "cpu-x86-4t",
    "space": "default",
    "budgets": {"max_latency_ms": 15.0, "max_params": 3_000_000},
    "trials": 40,
    "parallelism": 2,
    "measure": {"runtime": "onnxruntime", "batch": 1, "resolution": 160, "threads": 1},
    "quality": {"signal": "synflow"},
    "sampler": "tpe",
    "seed": 0,
}


class JobCreate(_In):
    """A search job: what to search (design space), on which device class (target), under
    which hard budgets, with how many trials and how many measurements at once.

    The target must exist before a job names it: `fitnas admin create-worker-token
    --target cpu-x86-4t` (or `POST /v1/targets`) creates it, and a worker with that token
    measures for it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_EXAMPLE]})

    name: str | None = Field(None, max_length=200)
    target: TargetName
    space: SpaceField = Field(
        "default",
        description="a built-in space name ('default', 'mobilenet_v2') or an inline design "
        "space (docs/search.md); never a server path",
    )
    budgets: Budgets = Budgets()
    trials: StrictInt = Field(40, ge=1, description="trials to finish (over-budget and cached "
                        "ones count)")
    parallelism: StrictInt = Field(2, ge=1, description="measurements in flight at once; also "
                             "bounded by the live workers of the target")
    measure: MeasureSettings = MeasureSettings()
    quality: QualitySettings = QualitySettings()
    signal: Signal | None = Field(None, description="shorthand for quality.signal")
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: StrictInt | None = Field(None, ge=0, le=2**31 - 1)
    population_size: StrictInt | None = Field(None, ge=2, le=1000,
                                              description="NSGA-II only")
    timeout_s: float = Field(300.0, gt=0, le=24 * 3600, description="per evaluation")
    memory_mb: StrictInt = Field(4096, ge=64, le=1_048_576, description="per evaluation")
    trainer_pool: TargetName = Field(
        DEFAULT_TRAINER_POOL, description="signal 'train': the trainers that train the "
        "candidates found within budget (`fitnas admin create-worker-token --role trainer "
        "--target POOL`); the target's workers only measure latency")
    seed_specs: list[str | dict[str, Any]] = Field(
        default_factory=list, max_length=100, description="networks tried first (compact "
        "strings, preset:NAME[@WIDTH] or spec objects); each must be a point of the space")


class Progress(BaseModel):
    trials: int = 0
    finished: int = 0
    running: int = 0
    measured: int = 0
    cached: int = 0
    over_budget: int = 0
    failed: int = 0
    interrupted: int = 0
    feasible: int = 0
    tasks_queued: int = 0
    tasks_leased: int = 0


TRIAL_EXAMPLE = {
    "number": 7,
    "state": "COMPLETE",
    "status": "measured",
    "values": {"quality": 512.3, "latency_ms": 9.81},
    "feasible": True,
    "constraints": {"latency_ms": -0.346, "params": -0.41},
    "spec_hash": "5c1d0f0b6a7e...",
    "spec_compact": "net_v1_r160_c3_n1000_stem_c16_k3_s2_a.hswish_...",
    "params": 1771240,
    "macs": 98122304,
    "latency_ms": 9.81,
}


class TrialOut(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [TRIAL_EXAMPLE]})

    number: int
    state: str
    status: str | None = None
    values: dict[str, float] | None = None
    feasible: bool = False
    constraints: dict[str, float] = {}
    spec_hash: str | None = None
    spec_compact: str | None = None
    params: int | None = None
    macs: int | None = None
    latency_ms: float | None = None
    quality: float | None = None
    spec: dict[str, Any] | None = None


class JobOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f9a1c2b7d4e5f60",
                    "name": "edge-classifier",
                    "target": "cpu-x86-4t",
                    "status": "running",
                    "trials": 40,
                    "parallelism": 2,
                    "study_name": "fitnas-job-3f9a1c2b7d4e5f60",
                    "progress": {"trials": 40, "finished": 12, "running": 2, "measured": 8,
                                 "cached": 1, "over_budget": 3, "feasible": 6},
                    "best": TRIAL_EXAMPLE,
                    "created_at": "2025-01-01T12:00:00Z",
                }
            ]
        }
    )

    id: str
    name: str | None
    target: str
    status: JobStatus
    trials: int
    parallelism: int
    study_name: str
    progress: Progress
    best: TrialOut | None = None
    error: str | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    finalized: bool = False
    config: dict[str, Any] | None = None


class Page(BaseModel):
    total: int
    offset: int
    limit: int


class JobPage(Page):
    items: list[JobOut]


class TrialPage(Page):
    items: list[TrialOut]


class ParetoOut(BaseModel):
    job_id: str
    final: bool = Field(description="true once the job has finished (completed/cancelled)")
    items: list[TrialOut]


class WinnerOut(BaseModel):
    job_id: str
    final: bool
    trial: TrialOut | None = Field(description="null when no trial met every budget")
    exports: dict[str, str] = Field(
        default_factory=dict, description="download URL per format"
    )


# ---- targets and workers ------------------------------------------------------------------


class TargetCreate(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "cpu-x86-4t",
                                         "description": "x86 server, 4 threads"}]},
    )

    name: TargetName
    description: str = Field("", max_length=2000)


class TargetOut(BaseModel):
    name: str
    description: str
    created_at: datetime
    live_workers: int = 0
    queued_tasks: int = 0
    leased_tasks: int = 0


class WorkerOut(BaseModel):
    id: str
    target: str
    name: str
    device: str
    runtimes: list[str]
    fingerprint: dict[str, Any]
    registered_at: datetime
    last_heartbeat_at: datetime
    live: bool


class WorkerPage(Page):
    items: list[WorkerOut]
