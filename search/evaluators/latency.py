"""Latency measurement, in process: the protocol of docs/measurement.md.

build -> eval() -> BatchNorm folded into the convolutions -> the runtime (eager PyTorch,
TorchScript traced + frozen, or an ONNX Runtime session) with a fixed thread count ->
warm-up -> timed rounds. Each round is a blocked run in the manner of
``torch.utils.benchmark.Timer.blocked_autorange``: blocks of ``number`` calls, timed as a
whole, until the round has lasted ``min_run_time_s``; every block gives one sample (its
time divided by ``number``). With a reference network each round alternates candidate and
reference blocks in the same process (A B B A A B ..., which of the two leads each pair
drawn at random) for ``2 * min_run_time_s``, and gives one ratio (candidate median / reference
median of that round): a figure that survives the drift of a shared machine far better
than absolute milliseconds.

With a latency budget (``EvalTask.budget``) the rounds are short and the measurement
stops as soon as the decision against the budget is clear (:mod:`.stopping`); without
one, the fixed protocol above. Either way the process's allocator thresholds are fixed
first (:mod:`.allocator`), so the figure does not depend on what ran before.

Isolation (child process, timeout, memory ceiling) is :mod:`search.evaluators.runner`'s
job; this module raises on failure.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from blocks.export import ONNX_OPSET, ExportError, onnx_bytes, torchscript_module
from blocks.spec import ArchSpec
from search.evaluators import allocator
from search.evaluators import fingerprint as fp
from search.evaluators.stats import median, median_interval, robust_cv, summarize
from search.evaluators.stopping import StoppingRule, default_max_rounds
from search.evaluators.types import (
    LatencyBudget,
    LatencyResult,
    LatencyStats,
    MeasureSettings,
    StopInfo,
)

# One block of calls lasts at least this long, so that reading the clock costs < 0.1%.
BLOCK_TARGET_S = 1e-3
BLOCK_TARGET_CUDA_S = 5e-3
WARMUP_MIN_CALLS = 3
MAX_ATTEMPTS = 3  # the first measurement plus up to two more when the spread is too wide
LOAD_SAMPLE_S = 0.25
LOAD_SAMPLE_BUDGET_S = 0.1  # budget-aware: still resolves other processes to 0.1 core

# A long-lived evaluator process keeps the prepared reference network between tasks
# (still timed interleaved with each candidate); None: prepare it for every measurement.
_reference_cache: dict[tuple, Prepared] | None = None


def enable_reference_reuse() -> None:
    """Keep the last prepared reference for the next measurement in this process."""
    global _reference_cache
    if _reference_cache is None:
        _reference_cache = {}


class UnsupportedSettings(ValueError):
    """The settings ask for something this runtime / device cannot do."""


_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, _DTYPES[name])


def check_settings(settings: MeasureSettings) -> None:
    """Refuse combinations that cannot be measured, before anything is built."""
    import torch

    if settings.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UnsupportedSettings(f"device {settings.device}: CUDA is not available here "
                                      f"(torch {torch.__version__})")
        index = torch.device(settings.device).index or 0
        if index >= torch.cuda.device_count():
            raise UnsupportedSettings(f"device {settings.device}: only "
                                      f"{torch.cuda.device_count()} CUDA device(s)")
    elif settings.dtype != "float32":
        raise UnsupportedSettings(f"dtype {settings.dtype} is measured on CUDA only; "
                                  "use float32 on cpu")
    if settings.runtime == "onnxruntime":
        if settings.channels_last:
            raise UnsupportedSettings("channels_last applies to eager and torchscript; ONNX "
                                      "graphs are NCHW and ONNX Runtime picks its own layouts")
        if settings.dtype == "bfloat16":
            raise UnsupportedSettings("bfloat16 is not measured on onnxruntime (its CUDA "
                                      "kernels for bfloat16 convolutions are incomplete)")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise UnsupportedSettings(f"onnxruntime is not installed ({exc})") from exc
        if (settings.device.startswith("cuda")
                and "CUDAExecutionProvider" not in ort.get_available_providers()):
            raise UnsupportedSettings("this onnxruntime build has no CUDAExecutionProvider "
                                      "(install onnxruntime-gpu)")


# ---- preparing a runnable model ------------------------------------------------------------


@dataclass
class Prepared:
    """One model ready to time: ``call()`` runs one inference on a fixed input."""

    name: str
    call: Callable[[], Any]
    cuda: bool
    cuda_events: bool  # True: time with CUDA events; False: perf_counter (+ synchronize)
    input_shape: tuple[int, ...]
    output: Any = None
    number: int = 1  # calls per timed block, set by calibrate()
    info: dict[str, Any] = field(default_factory=dict)


def build_folded(spec: ArchSpec):
    """Build the network, eval(), fold every BatchNorm into its convolution."""
    import torch

    from blocks.builder import build_model
    from blocks.fold import fold_batchnorm

    torch.manual_seed(0)
    return fold_batchnorm(build_model(spec), inplace=True)


def prepare(spec: ArchSpec, settings: MeasureSettings, resolution: int, threads: int,
            name: str = "model") -> Prepared:
    """Build, fold and load ``spec`` into the runtime of ``settings``."""
    import torch

    device = torch.device(settings.device)
    cuda = device.type == "cuda"
    dtype = _torch_dtype(settings.dtype)
    shape = (settings.batch, spec.in_channels, resolution, resolution)
    model = build_folded(spec)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    fmt = torch.channels_last if settings.channels_last else torch.contiguous_format

    if settings.runtime in ("eager", "torchscript"):
        model = model.to(device=device, dtype=dtype, memory_format=fmt)
        x = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        if settings.runtime == "torchscript":
            model = torchscript_module(model, x)

        def call(model=model, x=x):
            return model(x)

        out = call()
        return Prepared(name, call, cuda, cuda_events=cuda, input_shape=shape, output=out,
                        info={"memory_format": "channels_last" if settings.channels_last
                              else "contiguous"})

    # onnxruntime
    import numpy as np
    import onnxruntime as ort

    if cuda:
        model = model.to(device=device, dtype=dtype)
        x = x.to(device=device, dtype=dtype)
    data = onnx_bytes(model, x, dynamic_batch=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Idle pool threads must not spin: the reference's session runs in between and would
    # be timed against spinning threads of the candidate's (and vice versa).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if cuda:
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device.index or 0}),
                                "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(data, sess_options=so, providers=providers)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"ONNX Runtime could not load the exported model: {first}") from exc
    in_name = sess.get_inputs()[0].name
    info = {"providers": sess.get_providers(), "onnx_bytes": len(data), "opset": ONNX_OPSET,
            "allow_spinning": False}
    del data, model
    if cuda:
        binding = sess.io_binding()
        xc = x.contiguous()
        elem = np.float16 if settings.dtype == "float16" else np.float32
        binding.bind_input(in_name, "cuda", device.index or 0, elem, tuple(xc.shape),
                           xc.data_ptr())
        binding.bind_output(sess.get_outputs()[0].name, "cuda", device.index or 0)

        def call(sess=sess, binding=binding, keep=xc):
            sess.run_with_iobinding(binding)
            return binding

        call()
        out = torch.from_numpy(binding.copy_outputs_to_cpu()[0])
        return Prepared(name, call, True, cuda_events=False, input_shape=shape, output=out,
                        info=info)
    feed = {in_name: x.numpy()}

    def call(sess=sess, feed=feed):
        return sess.run(None, feed)

    out = torch.from_numpy(call()[0])
    return Prepared(name, call, False, cuda_events=False, input_shape=shape, output=out,
                    info=info)


# ---- timing -------------------------------------------------------------------------------


def _sync(p: Prepared) -> None:
    if p.cuda:
        import torch

        torch.cuda.synchronize()


def time_block(p: Prepared, number: int) -> float:
    """Seconds per call over one block of ``number`` calls."""
    if p.cuda_events:
        import torch

        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(number):
            p.call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / number
    _sync(p)
    t0 = time.perf_counter()
    for _ in range(number):
        p.call()
    _sync(p)
    return (time.perf_counter() - t0) / number


def warm_up(p: Prepared, seconds: float) -> None:
    calls, t0 = 0, time.perf_counter()
    while calls < WARMUP_MIN_CALLS or time.perf_counter() - t0 < seconds:
        p.call()
        calls += 1
    _sync(p)


def calibrate(p: Prepared) -> int:
    """Calls per block so that a block lasts at least the block target."""
    one = median([time_block(p, 1) for _ in range(3)])
    target = BLOCK_TARGET_CUDA_S if p.cuda else BLOCK_TARGET_S
    p.number = max(1, math.ceil(target / max(one, 1e-9)))
    return p.number


def timed_round(p: Prepared, min_run_time: float) -> list[float]:
    """One blocked run: block samples (ms per call) until ``min_run_time`` has passed."""
    samples: list[float] = []
    t0 = time.perf_counter()
    while not samples or time.perf_counter() - t0 < min_run_time:
        samples.append(time_block(p, p.number) * 1e3)
    return samples


@dataclass
class Attempt:
    cand: list[float]
    ref: list[float]
    ratios: list[float]
    cand_stats: LatencyStats
    ref_stats: LatencyStats | None
    ratio_stats: LatencyStats | None
    round_medians: list[float] = field(default_factory=list)  # the candidate's, per round

    def spread(self) -> float:
        """What decides a new attempt: the robust CV of the candidate's block samples and
        the CV of the per-round ratios, whichever is larger."""
        return max(robust_cv(self.cand), self.ratio_stats.cv if self.ratio_stats else 0.0)


def interleaved_round(cand: Prepared, ref: Prepared, min_run_time: float,
                      rng: random.Random) -> tuple[list[float], list[float]]:
    """One round of alternating blocks of the candidate and the reference until the round
    has lasted ``2 * min_run_time``: both see the same moments of the machine's load. Which
    of the two leads each pair is drawn at random (seeded), so that neither is favoured by
    a fixed phase against the scheduler's time slices."""
    c: list[float] = []
    f: list[float] = []
    t0 = time.perf_counter()
    while not c or time.perf_counter() - t0 < 2 * min_run_time:
        if rng.random() < 0.5:
            c.append(time_block(cand, cand.number) * 1e3)
            f.append(time_block(ref, ref.number) * 1e3)
        else:
            f.append(time_block(ref, ref.number) * 1e3)
            c.append(time_block(cand, cand.number) * 1e3)
    return c, f


def run_rounds(cand: Prepared, ref: Prepared | None, rounds: int,
               min_run_time: float) -> Attempt:
    """``rounds`` timed rounds. With a reference, each round alternates candidate and
    reference blocks (A B A B ..., the leader of each pair drawn at random) and gives one
    ratio: the candidate's median over the reference's median in that round."""
    cand_all: list[float] = []
    ref_all: list[float] = []
    ratios: list[float] = []
    medians: list[float] = []
    rng = random.Random(0)
    for _ in range(rounds):
        if ref is None:
            c = timed_round(cand, min_run_time)
            cand_all += c
            medians.append(median(c))
            continue
        c, f = interleaved_round(cand, ref, min_run_time, rng)
        medians.append(median(c))
        cand_all += c
        ref_all += f
        ratios.append(median(c) / median(f))
    return Attempt(
        cand_all, ref_all, ratios, summarize(cand_all),
        summarize(ref_all) if ref_all else None,
        summarize(ratios) if ratios else None, medians,
    )


def pool(attempts: list[Attempt]) -> Attempt:
    """All attempts' samples together: more rounds, a more precise median."""
    if len(attempts) == 1:
        return attempts[0]
    cand = [v for a in attempts for v in a.cand]
    ref = [v for a in attempts for v in a.ref]
    ratios = [v for a in attempts for v in a.ratios]
    medians = [v for a in attempts for v in a.round_medians]
    return Attempt(cand, ref, ratios, summarize(cand), summarize(ref) if ref else None,
                   summarize(ratios) if ratios else None, medians)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_threads(settings: MeasureSettings, before: dict[str, Any]) -> tuple[int, list[str]]:
    return fp.choose_threads(settings.threads, before)


def round_intervals(a: Attempt, confidence: float = 0.95) -> dict[str, tuple[float, float]]:
    """The distribution-free interval of the median of the per-round values ('ms': the
    candidate's round medians, 'ratio': the round ratios), where there are enough rounds."""
    out = {}
    for name, values in (("ms", a.round_medians), ("ratio", a.ratios)):
        iv = median_interval(values, 1 - confidence) if values else None
        if iv is not None:
            out[name] = iv
    return out


def run_until_decided(cand: Prepared, ref: Prepared | None, budget: LatencyBudget,
                      max_rounds: int, max_s: float | None = None) -> tuple[Attempt, StopInfo]:
    """Short rounds (``budget.round_s`` per model) until :class:`StoppingRule` says the
    decision is clear, or ``max_rounds`` (or ``max_s`` seconds of rounds: a round lasts a
    little longer than ``round_s`` when a block of a slow model overshoots it). The
    series it judges: per-round ratios (ratio budget) and per-round candidate medians
    (ms budget). Stopping at the time cap decides nothing early: it ends as
    ``max_rounds``."""
    rule = StoppingRule(budget, max_rounds)
    rng = random.Random(0)
    cand_all: list[float] = []
    ref_all: list[float] = []
    ratios: list[float] = []
    medians: list[float] = []
    reason = None
    t0 = time.perf_counter()
    while reason is None:
        if ref is None:
            c = timed_round(cand, budget.round_s)
        else:
            c, f = interleaved_round(cand, ref, budget.round_s, rng)
            ref_all += f
            ratios.append(median(c) / median(f))
        cand_all += c
        medians.append(median(c))
        series = {"ms": medians}
        if ref is not None:
            series["ratio"] = ratios
        reason = rule.update(series)
        if (reason is None and max_s is not None and len(medians) >= budget.min_rounds
                and time.perf_counter() - t0 >= max_s):
            reason = "max_rounds"
    attempt = Attempt(cand_all, ref_all, ratios, summarize(cand_all),
                      summarize(ref_all) if ref_all else None,
                      summarize(ratios) if ratios else None, medians)
    return attempt, rule.info(reason, len(medians))


def _prepare_reference(ref_spec: ArchSpec, settings: MeasureSettings, resolution: int,
                       threads: int) -> tuple[Prepared, bool]:
    """The reference, prepared here or kept from the previous measurement of this process
    (:func:`enable_reference_reuse`). Returns (prepared, reused)."""
    global _reference_cache
    key = (settings.reference, settings.runtime, settings.device, settings.batch, resolution,
           settings.dtype, settings.channels_last, threads)
    if _reference_cache is not None and key in _reference_cache:
        return _reference_cache[key], True
    ref = prepare(ref_spec, settings, resolution, threads, name="reference")
    if _reference_cache is not None:
        _reference_cache = {key: ref}  # one: a new key replaces the old
    return ref, False


def load_sample_seconds(settings: MeasureSettings, budget: LatencyBudget | None) -> float:
    """How long to sample the machine's load before and after the timed rounds. The fixed
    protocol: 0.25 s. Budget-aware with a thread count to resolve: 0.1 s. Budget-aware
    with the thread count given: none (a snapshot of the run queue): nothing is chosen from
    the sample, and the window over the timed rounds themselves (``load.during``) is what
    says whether other processes took cores this measurement needed."""
    if budget is None:
        return LOAD_SAMPLE_S
    return 0.0 if settings.threads is not None else LOAD_SAMPLE_BUDGET_S


def measure_latency(spec: ArchSpec, settings: MeasureSettings,
                    budget: LatencyBudget | None = None) -> LatencyResult:
    """Measure ``spec`` under ``settings`` in this process (see the module docstring);
    with a non-empty ``budget``, until the decision against it is clear.

    Raises :class:`UnsupportedSettings`, :class:`ExportError`,
    :class:`blocks.shapes.SpecError` / :class:`blocks.load.SpecLoadError` (the spec or the
    reference), or whatever the runtime raises (MemoryError, RuntimeError).
    """
    import torch

    from blocks.cost import estimate_cost
    from blocks.load import SpecLoadError, parse_spec
    from blocks.shapes import resolve

    check_settings(settings)
    resolve(spec)  # SpecError before anything is built
    resolution = settings.resolution or spec.resolution
    ref_spec = None
    if settings.reference:
        try:
            ref_spec = parse_spec(settings.reference)
        except SpecLoadError as exc:
            raise SpecLoadError(f"reference {settings.reference!r}: {exc}") from exc
    ref_resolution = settings.resolution or (ref_spec.resolution if ref_spec else resolution)
    if budget is not None and budget.is_empty():
        budget = None

    allocator.apply()
    load_s = load_sample_seconds(settings, budget)
    clock = time.perf_counter()
    before = fp.sample_load(load_s)
    threads, notes = resolve_threads(settings, before)
    free = fp.free_cores(before)
    # budget-aware: one short round of warm-up (the timed rounds that follow are short too)
    warm_s = max(0.05, settings.min_run_time_s if budget is None else budget.round_s)
    stop: StopInfo | None = None
    ref_reused = False

    with torch_threads(threads):
        if settings.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(settings.device))
            torch.backends.cudnn.benchmark = True
        with torch.no_grad():
            t_build = time.perf_counter()
            cand = prepare(spec, settings, resolution, threads, name="candidate")
            ref = None
            if ref_spec is not None:
                ref, ref_reused = _prepare_reference(ref_spec, settings, ref_resolution,
                                                     threads)
        t_warm = time.perf_counter()
        with torch.inference_mode():
            warm_up(cand, warm_s)
            calibrate(cand)
            if ref is not None and ref_reused:
                warm_up(ref, 0.0)  # a few calls: back into the caches; blocks as before
            elif ref is not None:
                warm_up(ref, warm_s)
                calibrate(ref)
            window = fp.LoadWindow().start()
            t_timed = time.perf_counter()
            if budget is None:
                attempts = [run_rounds(cand, ref, settings.rounds, settings.min_run_time_s)]
                while (attempts[-1].spread() > settings.max_cv
                       and len(attempts) < MAX_ATTEMPTS):
                    attempts.append(run_rounds(cand, ref, settings.rounds,
                                               settings.min_run_time_s))
            else:
                max_rounds = default_max_rounds(budget, settings.rounds,
                                                settings.min_run_time_s, MAX_ATTEMPTS)
                # at most the time the fixed protocol may take (all its attempts), or
                # that of max_rounds nominal rounds where that is longer
                per = 1 if ref is None else 2
                max_s = per * max(MAX_ATTEMPTS * settings.rounds * settings.min_run_time_s,
                                  max_rounds * budget.round_s)
                attempt, stop = run_until_decided(cand, ref, budget, max_rounds,
                                                  max_s if budget.max_rounds is None else None)
                attempts = [attempt]
            during = window.stop()
    t_after = time.perf_counter()
    after = fp.sample_load(load_s)
    phases = {"load_sampling": t_build - clock + time.perf_counter() - t_after,
              "build": t_warm - t_build, "warm_up": t_timed - t_warm,
              "timed": t_after - t_timed}

    best = pool(attempts)
    remeasured = len(attempts) > 1
    if remeasured:
        spreads = ", ".join(f"{a.spread():.3f}" for a in attempts)
        notes.append(
            f"spread above max_cv={settings.max_cv:g}: measured {len(attempts)} times "
            f"(spread {spreads}); the figures pool all {len(attempts)} attempts"
        )
        if attempts[-1].spread() > settings.max_cv:
            notes.append(f"spread still above max_cv after {len(attempts)} attempts: "
                         "treat this result with care")

    contended = fp.is_contended(threads, before.get("other_cores"), during.get("other_cores"),
                                after.get("other_cores"))
    if contended:
        notes.append("other processes used cores this measurement needed (see load): "
                     "absolute times are suspect" + (", ratio_to_reference less so"
                                                     if ref is not None else
                                                     "; a reference would give a sturdier "
                                                     "ratio"))

    device = fp.device_fingerprint(settings.device, threads)
    device.update({
        "threads_requested": settings.threads,
        "runtime": settings.runtime,
        "input_shape": list(cand.input_shape),
        "batch": settings.batch,
        "resolution": resolution,
        "dtype": settings.dtype,
        "channels_last": settings.channels_last,
        "timer": "cuda_event" if cand.cuda_events else (
            "perf_counter+synchronize" if cand.cuda else "perf_counter"),
        "calls_per_block": cand.number,
        "runtime_info": cand.info,
        "allocator": allocator.describe(),
    })
    if settings.device.startswith("cuda"):
        device["cudnn_benchmark"] = True
    if ref is not None:
        device["reference_input_shape"] = list(ref.input_shape)
        device["reference_calls_per_block"] = ref.number
        device["reference_reused"] = ref_reused
    if stop is not None and stop.reason == "max_rounds":
        notes.append(f"close to the budget: measured the maximum of {stop.rounds} rounds")

    dtype_bytes = 2 if settings.dtype in ("float16", "bfloat16") else 4
    cost = estimate_cost(spec, resolution, settings.batch, dtype_bytes=dtype_bytes)
    return LatencyResult(
        latency_ms=best.cand_stats,
        ratio_to_reference=best.ratio_stats,
        reference=settings.reference if ref is not None else None,
        reference_latency_ms=best.ref_stats,
        runtime=settings.runtime,
        settings=settings,
        device=device,
        load={"before": before, "during": during, "after": after, "free_cores": free,
              "attempts": len(attempts),
              "rounds": stop.rounds if stop is not None else settings.rounds * len(attempts)},
        contended=contended,
        remeasured=remeasured,
        stopping=stop,
        phases={k: round(v, 4) for k, v in phases.items()},
        intervals=round_intervals(best),
        notes=notes,
        params=cost.params,
        macs=cost.macs,
    )
