"""Quality signals for one architecture: zero-cost proxies or a short seeded training run.

``evaluate_quality(spec, settings, data_sources)`` is what the isolation runner calls in
its child process. Higher ``value`` is better for every signal:

=========== ===========================================================================
signal      value
=========== ===========================================================================
synflow     log of the SynFlow score (all-ones input, no data needed beyond its shape)
naswot      log-determinant of the NASWOT activation kernel over one training minibatch
grad_norm   sum of conv/linear weight-gradient L2 norms of cross-entropy on one minibatch
zico        ZiCo: sum over layers of log(sum mean|g| / std(g)) over two minibatches
meco        MeCo: sum over conv layers of the least eigenvalue of the channel correlation
            matrix of the layer's output for one training image
params      the adapted spec's parameter count (a baseline that needs no model run)
macs        the adapted spec's multiply-accumulates per image (likewise)
train       validation accuracy (0..1) after ``steps`` seeded optimizer steps, reported
            at every rung of ``rungs`` (multi-fidelity; a pruner may stop it early)
=========== ===========================================================================

The spec is adapted to the data before anything is built: ``num_classes`` becomes the
data's class count, ``resolution`` becomes ``settings.resolution`` (default 32), and
``in_channels`` becomes the data's channel count, except that single-channel data (the
built-in digits, grayscale folders) is repeated to the spec's own ``in_channels`` so the
stem stays the one the spec describes. The adapted spec's hash, params and MACs are in
``details``.

Determinism: for a given spec, settings (seed included), data and thread count, the
value is the same on every run: the model's initialization, the minibatch, the training
order and dropout all come from ``settings.seed``. ``settings.threads`` (default 1) fixes
the CPU thread count while evaluating, because float32 sums, and so training, depend on
it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from blocks.builder import build_model
from blocks.cost import estimate_cost
from blocks.spec import ArchSpec
from search.evaluators.datasets import Dataset, fit_channels, load_dataset
from search.evaluators.latency import torch_threads
from search.evaluators.proxies import grad_norm, meco, naswot, synflow, zico
from search.evaluators.types import QualityResult, QualitySettings

DEFAULT_RESOLUTION = 32
# Short-training recipe (fixed so values are comparable between trials).
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
WARMUP_FRACTION = 0.05
LABEL_SMOOTHING = 0.0
EVAL_BATCH = 256
ZICO_BATCHES = 2  # ZiCo's gradient statistics are over minibatches; the paper uses two


class QualityError(ValueError):
    """The signal cannot be computed for this spec/settings (one-line message)."""


def adapt_spec(spec: ArchSpec, data: Dataset, resolution: int) -> ArchSpec:
    """The spec as evaluated on ``data`` (see the module docstring)."""
    in_channels = spec.in_channels if data.in_channels == 1 else data.in_channels
    update = {"num_classes": data.num_classes, "in_channels": in_channels,
              "resolution": resolution}
    return ArchSpec.model_validate({**spec.model_dump(), **update})


def _threads(count: int | None, device: torch.device) -> contextlib.AbstractContextManager:
    if count is None or device.type != "cpu":
        return contextlib.nullcontext()
    return torch_threads(count)


def _seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on CUDA. CPU kernels are deterministic for a fixed thread
    count already, and switching the flag on costs an import of seconds."""
    if device.type == "cpu":
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def _minibatch(data: Dataset, batch: int, generator: torch.Generator, in_channels: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n = data.x_train.shape[0]
    idx = torch.randperm(n, generator=generator)[: min(batch, n)]
    x = fit_channels(data.x_train[idx], in_channels).to(device)
    return x, data.y_train[idx].to(device)


def _cost(spec: ArchSpec, resolution: int) -> dict[str, int]:
    report = estimate_cost(spec, resolution=resolution, batch=1)
    return {"params": int(report.params), "macs": int(report.macs)}


def _lr_at(step: int, steps: int) -> float:
    warm = max(1, int(steps * WARMUP_FRACTION))
    if step < warm:
        return LEARNING_RATE * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return LEARNING_RATE * 0.5 * (1.0 + math.cos(math.pi * t))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, in_channels: int,
              device: torch.device) -> tuple[float, float]:
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], EVAL_BATCH):
            xb = fit_channels(x[i:i + EVAL_BATCH], in_channels).to(device)
            yb = y[i:i + EVAL_BATCH].to(device)
            logits = model(xb)
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    n = x.shape[0]
    return correct / n, loss_sum / n


RungCallback = Callable[[int, float], bool]


def train_rungs(model: nn.Module, data: Dataset, rungs: list[int], batch: int,
                generator: torch.Generator, in_channels: int, device: torch.device,
                on_rung: RungCallback | None = None) -> tuple[float, dict[str, Any]]:
    """Multi-fidelity training: one seeded run of ``rungs[-1]`` steps (AdamW, linear
    warm-up then cosine decay over the whole run, minibatches drawn epoch by epoch from a
    seeded permutation) with the validation accuracy taken at every rung.

    After each rung but the last, ``on_rung(step, accuracy)`` decides whether to go on
    (False: the run is pruned and stops there). The learning-rate schedule is that of the
    full run, so a rung's accuracy is the same whether the run goes on or not: a pruned
    candidate's value is exactly the full run's value at that step.

    Returns (accuracy at the last rung reached, details with ``rungs`` = [[step, acc]...]
    and ``pruned``).
    """
    if batch < 2:
        raise QualityError("training needs batch >= 2 (BatchNorm uses batch statistics)")
    if not rungs or any(b <= a for a, b in itertools.pairwise(rungs)):
        raise QualityError(f"rungs must be increasing step counts (got {rungs})")
    steps = rungs[-1]
    n = data.x_train.shape[0]
    batch = min(batch, n)
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    order = torch.randperm(n, generator=generator)
    pos = 0
    tail = max(1, steps // 10)
    tail_losses: list[float] = []
    reached: list[list[float]] = []
    rung_seconds: list[float] = []
    t0 = time.perf_counter()
    pruned = False
    acc, val_loss, step = 0.0, float("nan"), 0
    pending = list(rungs)
    model.train()
    for step in range(1, steps + 1):
        if pos + batch > n:
            order = torch.randperm(n, generator=generator)
            pos = 0
        idx = order[pos:pos + batch]
        pos += batch
        xb = fit_channels(data.x_train[idx], in_channels).to(device)
        yb = data.y_train[idx].to(device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step - 1, steps)
        loss = nn.functional.cross_entropy(model(xb), yb, label_smoothing=LABEL_SMOOTHING)
        if not torch.isfinite(loss):
            raise QualityError(f"training diverged at step {step - 1} (loss {float(loss)})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step > steps - tail:
            tail_losses.append(float(loss.detach()))
        if step == pending[0]:
            pending.pop(0)
            acc, val_loss = _accuracy(model, data.x_val, data.y_val, in_channels, device)
            model.train()
            reached.append([step, acc])
            rung_seconds.append(round(time.perf_counter() - t0, 3))
            if pending and on_rung is not None and not on_rung(step, acc):
                pruned = True
                break
    details: dict[str, Any] = {
        "val_accuracy": acc,
        "val_loss": val_loss,
        "steps": step,
        "planned_steps": steps,
        "rungs": reached,
        "rung_seconds": rung_seconds,
        "pruned": pruned,
        "epochs": round(step * batch / n, 2),
        "optimizer": f"AdamW lr={LEARNING_RATE} wd={WEIGHT_DECAY}, warm-up + cosine "
                     f"over {steps} steps",
        "chance_accuracy": float(torch.bincount(data.y_val).max()) / data.y_val.numel(),
    }
    if tail_losses:
        details["train_loss"] = sum(tail_losses) / len(tail_losses)
    return acc, details


def train_and_validate(model: nn.Module, data: Dataset, steps: int, batch: int,
                       generator: torch.Generator, in_channels: int,
                       device: torch.device) -> tuple[float, dict[str, Any]]:
    """Single-fidelity training: :func:`train_rungs` with the one rung ``steps``."""
    return train_rungs(model, data, [steps], batch, generator, in_channels, device)


def evaluate_quality(
    spec: ArchSpec,
    settings: QualitySettings,
    data_sources: dict[str, str] | None = None,
    *,
    device: str = "cpu",
    on_rung: RungCallback | None = None,
) -> QualityResult:
    """Compute ``settings.signal`` for ``spec`` in this process.

    ``data_sources`` is the worker's own name -> path mapping (``digits`` is built in).
    Raises :class:`~search.evaluators.datasets.DataError` for an unknown or unusable data
    set, :class:`QualityError` / :class:`~search.evaluators.proxies.ProxyError` when the
    signal has no value for this network, and :class:`blocks.shapes.SpecError` for a
    spec that cannot be built.

    ``on_rung(step, accuracy) -> bool`` is called by ``train`` after every rung but the
    last (see :func:`train_rungs`); returning False stops the run and the result has
    ``pruned=True``. The other signals never call it.
    """
    if settings.signal == "none":
        raise QualityError("signal 'none' has no value to compute")
    start = time.perf_counter()
    resolution = settings.resolution or DEFAULT_RESOLUTION
    data = load_dataset(settings.data, resolution, data_sources)
    adapted = adapt_spec(spec, data, resolution)
    dev = torch.device(device)
    with _deterministic(dev), _threads(settings.threads, dev):
        generator = _seed_all(settings.seed)
        model = build_model(adapted)
        model.to(dev)
        details: dict[str, Any] = {
            **data.describe(),
            "in_channels": adapted.in_channels,
            "data_channels": data.in_channels,
            "batch": settings.batch,
            "seed": settings.seed,
            "spec_hash": adapted.hash,
            "threads": torch.get_num_threads(),
            "device": str(dev),
            **_cost(adapted, resolution),
        }
        if data.notes:
            details["data_notes"] = list(data.notes)
        if settings.signal == "synflow":
            if dev.type != "cpu":
                model = model.cpu()
            value, extra = synflow(model, (adapted.in_channels, resolution, resolution))
        elif settings.signal == "naswot":
            x, _ = _minibatch(data, settings.batch, generator, adapted.in_channels, dev)
            value, extra = naswot(model, x)
        elif settings.signal == "grad_norm":
            if settings.batch < 2:
                raise QualityError("grad_norm needs batch >= 2 (BatchNorm uses batch "
                                   "statistics)")
            x, y = _minibatch(data, settings.batch, generator, adapted.in_channels, dev)
            value, extra = grad_norm(model, x, y)
        elif settings.signal == "zico":
            if settings.batch < 2:
                raise QualityError("zico needs batch >= 2 (BatchNorm uses batch statistics)")
            batches = [_minibatch(data, settings.batch, generator, adapted.in_channels, dev)
                       for _ in range(ZICO_BATCHES)]
            value, extra = zico(model, batches)
        elif settings.signal == "meco":
            x, _ = _minibatch(data, 1, generator, adapted.in_channels, dev)
            value, extra = meco(model, x)
        elif settings.signal in ("params", "macs"):
            value, extra = float(details[settings.signal]), {}
        elif settings.signal == "train":
            value, extra = train_rungs(model, data, settings.rung_steps(), settings.batch,
                                       generator, adapted.in_channels, dev, on_rung)
        else:  # pragma: no cover - Signal is a closed Literal
            raise QualityError(f"unknown signal {settings.signal!r}")
    details.update(extra)
    return QualityResult(signal=settings.signal, value=float(value),
                         seconds=time.perf_counter() - start, details=details,
                         pruned=bool(details.get("pruned", False)))
