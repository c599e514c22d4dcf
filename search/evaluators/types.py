"""The evaluation contract shared by the local search, the service scheduler and the
device worker: what to measure (:class:`EvalTask`) and what came back
(:class:`EvalOutcome`). Plain pydantic, JSON over the wire; no torch import here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from search.evaluators import allocator

Runtime = Literal["eager", "torchscript", "onnxruntime"]
DType = Literal["float32", "float16", "bfloat16"]
Signal = Literal["none", "synflow", "naswot", "grad_norm", "zico", "meco", "params", "macs",
                 "train"]
FailureReason = Literal[
    "timeout",
    "out_of_memory",
    "export_failed",
    "invalid_spec",
    "runtime_error",
    "crashed",
    "unsupported",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# What a SPEC sent over the wire may be (blocks.load.parse_spec reads exactly these). A
# path is never one: the worker would open it, and a client could probe its file system.
SPEC_TEXT_PREFIXES = ("preset:", "net", "{")


def _spec_text(v: str | None) -> str | None:
    if v is not None and not v.strip().startswith(SPEC_TEXT_PREFIXES):
        raise ValueError("a SPEC here is preset:NAME[@WIDTH], a compact spec (net_v1_...) "
                         "or inline JSON, never a path")
    return v


SpecText = Annotated[str, AfterValidator(_spec_text), Field(max_length=200_000)]
# A data set is a name: built in ('digits') or one the worker's own configuration maps.
DataName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                                max_length=64)]


class MeasureSettings(_Model):
    """How latency is measured. Everything here is part of the measurement key."""

    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    runtime: Runtime = "eager"
    batch: int = Field(1, ge=1, le=256)
    resolution: int | None = Field(None, ge=8, le=1024, description="None: the spec's own")
    dtype: DType = "float32"
    channels_last: bool = False
    threads: int | None = Field(None, ge=1, le=256, description="None: free cores, at most 4")
    reference: SpecText | None = Field(
        "preset:mobilenet_v2@0.5",
        description="SPEC of the reference network timed interleaved (A B A B) with the "
        "candidate; None disables ratio_to_reference",
    )
    min_run_time_s: float = Field(0.2, gt=0, le=30, description="per timed round")
    rounds: int = Field(7, ge=3, le=100, description="timed rounds (each a blocked autorange)")
    max_cv: float = Field(0.10, gt=0, le=1.0, description="measure again above this spread")

    def key(self, spec_hash: str, target: str) -> str:
        """Measurement cache key: spec hash, target, runtime, input shape, batch, dtype,
        layout, reference and the allocator policy the evaluations run under. Timing-effort
        knobs (rounds, round length, a budget's early stopping) are not part of it."""
        parts = {
            "spec": spec_hash,
            "target": target,
            "device": self.device,
            "runtime": self.runtime,
            "batch": self.batch,
            "resolution": self.resolution,
            "dtype": self.dtype,
            "channels_last": self.channels_last,
            "threads": self.threads,
            "reference": self.reference,
            "allocator": allocator.key(),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class QualitySettings(_Model):
    """What quality signal to compute and how. The default signal is ``params``: on the
    signal-quality benchmark (docs/quality.md) no zero-cost proxy ranks networks by their
    trained accuracy better than the exact parameter count, which costs nothing."""

    signal: Signal = "params"
    data: DataName = Field("digits", description="'digits' (built in) or a name the worker's own "
                      "configuration maps to an ImageFolder directory or .npz file")
    steps: int = Field(200, ge=1, le=100_000, description="optimizer steps for 'train'")
    rungs: list[int] | None = Field(
        None, max_length=32, description="'train': steps at which the validation accuracy "
        "is reported (an Optuna intermediate value; a pruner may stop the run there); "
        "increasing, each <= steps, steps itself is always the last. None: steps/2, "
        "steps (a rung a quarter of the way ranks networks almost at random: "
        "docs/quality.md)")
    batch: int = Field(32, ge=1, le=1024)
    resolution: int | None = Field(None, ge=8, le=1024, description="None: 32 for proxies "
                                   "and digits training")
    seed: int = 0
    threads: int | None = Field(
        1, ge=1, le=256, description="CPU threads while evaluating; float32 sums (training, "
        "grad_norm) depend on the count, so a fixed one keeps values reproducible across "
        "machines. None: the process's current setting")

    @model_validator(mode="after")
    def _check_rungs(self) -> QualitySettings:
        if self.rungs is not None:
            r = self.rungs
            if any(b <= a for a, b in itertools.pairwise(r)) or (r and r[0] < 1):
                raise ValueError("rungs must be increasing positive step counts")
            if r and r[-1] > self.steps:
                raise ValueError(f"rungs must be <= steps ({self.steps}); got {r[-1]}")
        return self

    def rung_steps(self) -> list[int]:
        """The steps at which 'train' reports (see ``rungs``); the last is ``steps``."""
        rungs = list(self.rungs) if self.rungs is not None else [max(1, round(self.steps / 2))]
        return sorted({*(s for s in rungs if s < self.steps), self.steps})


class LatencyBudget(_Model):
    """Budget-aware measurement (docs/measurement.md, "Measuring until the decision is
    clear"): after ``min_rounds`` short rounds, stop as soon as the interval of the median
    (per-round ratios for ``ratio``, per-round candidate medians for ``ms``) lies beyond
    the budget by ``margin`` and is narrower than ``precision``; otherwise go on up to
    ``max_rounds``. Not part of the measurement key: a result measured this way is a
    valid measurement of the spec."""

    ms: float | None = Field(None, gt=0, description="budget on the median latency, ms")
    ratio: float | None = Field(None, gt=0, description="budget on the ratio to the reference")
    margin: float = Field(0.03, ge=0, le=1, description="relative: a candidate whose "
                          "median is within this of the budget is measured to the maximum")
    precision: float = Field(0.05, gt=0, le=1, description="largest relative half-width "
                             "of the interval at which a measurement may stop early")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="of the decision over all "
                              "looks together")
    round_s: float = Field(0.05, gt=0, le=30, description="per model and round")
    min_rounds: int = Field(9, ge=3, le=10_000)
    max_rounds: int | None = Field(None, ge=3, le=10_000, description="None: the time "
                                   "the fixed protocol may take at most (all attempts)")

    def is_empty(self) -> bool:
        return self.ms is None and self.ratio is None


class StopInfo(_Model):
    """How a budget-aware measurement ended."""

    reason: Literal["below_budget", "above_budget", "max_rounds"]
    rounds: int
    looks: int
    intervals: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="per budget ('ms', 'ratio'): the interval of "
        "the median at the last look")
    confidence: float


class EvaluatorInfo(_Model):
    """Which evaluator process produced an outcome."""

    mode: Literal["one_shot", "warm", "in_process"]
    fresh: bool = Field(description="the first task of its process")
    task_index: int = 0
    threads: int | None = Field(None, description="thread count resolved once for the "
                                "evaluator's lifetime (None: not resolved by it)")


class LatencyStats(_Model):
    median: float
    p90: float
    iqr: float
    cv: float
    n: int
    mean: float
    min: float
    max: float


class LatencyResult(_Model):
    latency_ms: LatencyStats
    ratio_to_reference: LatencyStats | None = None
    reference: str | None = None
    reference_latency_ms: LatencyStats | None = None
    runtime: Runtime
    settings: MeasureSettings
    device: dict[str, Any] = Field(description="device fingerprint")
    load: dict[str, Any] = Field(default_factory=dict, description="system load around the run")
    contended: bool = False
    remeasured: bool = False
    stopping: StopInfo | None = Field(None, description="budget-aware measurements only")
    intervals: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="95 % distribution-free interval of the median of "
        "the per-round values: 'ratio' (round ratios), 'ms' (the candidate's round medians)")
    phases: dict[str, float] = Field(default_factory=dict, description="seconds spent in "
                                     "load sampling, build (and export), warm-up (and "
                                     "calibration), timed rounds")
    notes: list[str] = Field(default_factory=list)
    params: int
    macs: int


class QualityResult(_Model):
    signal: Signal
    value: float
    seconds: float
    pruned: bool = Field(False, description="'train' stopped at a rung by the pruner; value "
                         "is that rung's accuracy")
    details: dict[str, Any] = Field(default_factory=dict)


class Failure(_Model):
    reason: FailureReason
    message: str


class EvalTask(_Model):
    """One evaluation: a spec (canonical dict) plus what to measure."""

    spec: dict[str, Any]
    measure: MeasureSettings | None = MeasureSettings()
    quality: QualitySettings | None = None
    timeout_s: float = Field(300.0, gt=0, le=24 * 3600)
    memory_mb: int = Field(4096, ge=64, le=1_048_576)
    budget: LatencyBudget | None = Field(None, description="measure until the decision "
                                         "against it is clear; None: the fixed protocol")


class EvalOutcome(_Model):
    ok: bool
    latency: LatencyResult | None = None
    quality: QualityResult | None = None
    failure: Failure | None = None
    seconds: float = 0.0
    evaluator: EvaluatorInfo | None = None
