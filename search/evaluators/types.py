"""The evaluation contract shared by the local search, the service scheduler and the
device worker: what to measure (:class:`EvalTask`) and what came back
(:class:`EvalOutcome`). Plain pydantic, JSON over the wire; no torch import here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class MeasureSettings(_Model):
    """How latency is measured. Everything here is part of the measurement key."""

    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    runtime: Runtime = "eager"
    batch: int = Field(1, ge=1, le=256)
    resolution: int | None = Field(None, ge=8, le=1024, description="None: the spec's own")
    dtype: DType = "float32"
    channels_last: bool = False
    threads: int | None = Field(None, ge=1, le=256, description="None: free cores, at most 4")
    reference: str | None = Field(
        "preset:mobilenet_v2@0.5",
        description="SPEC of the reference network timed interleaved (A B A B) with the "
        "candidate; None disables ratio_to_reference",
    )
    min_run_time_s: float = Field(0.2, gt=0, le=30, description="per timed round")
    rounds: int = Field(7, ge=3, le=100, description="timed rounds (each a blocked autorange)")
    max_cv: float = Field(0.10, gt=0, le=1.0, description="measure again above this spread")

    def key(self, spec_hash: str, target: str) -> str:
        """Measurement cache key: spec hash, target, runtime, input shape, batch, dtype,
        layout, reference. Timing-effort knobs are not part of it."""
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
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class QualitySettings(_Model):
    """What quality signal to compute and how. The default signal is ``params``: on the
    signal-quality benchmark (docs/quality.md) no zero-cost proxy ranks networks by their
    trained accuracy better than the exact parameter count, which costs nothing."""

    signal: Signal = "params"
    data: str = Field("digits", description="'digits' (built in) or a name the worker's own "
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


class EvalOutcome(_Model):
    ok: bool
    latency: LatencyResult | None = None
    quality: QualityResult | None = None
    failure: Failure | None = None
    seconds: float = 0.0
