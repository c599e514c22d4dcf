"""Evaluation isolation: typed failures, timeout, memory ceiling, and a caller that lives on."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil

from blocks import load_spec
from blocks.shapes import SpecError
from search.evaluators.latency import ExportError, UnsupportedSettings
from search.evaluators.runner import classify, evaluate, exit_failure, memory_estimate
from search.evaluators.types import EvalTask, MeasureSettings, QualitySettings

FAST = MeasureSettings(resolution=32, min_run_time_s=0.02, rounds=3, threads=1, reference=None)


def tiny_task(**kw) -> EvalTask:
    spec = load_spec("preset:mobilenet_v2@0.25").canonical_dict()
    return EvalTask(spec=spec, **{"measure": FAST, "timeout_s": 120.0, **kw})


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_invalid_spec_fails_typed_without_a_child():
    spec = load_spec("preset:shufflenet_v1@0.5").canonical_dict()
    spec["stages"][1]["block"]["groups"] = 7  # does not divide the widths
    t0 = time.perf_counter()
    out = evaluate(EvalTask(spec=spec, measure=FAST))
    assert not out.ok and out.failure.reason == "invalid_spec"
    assert "groups" in out.failure.message
    assert time.perf_counter() - t0 < 2.0  # refused in the caller, no child started

    out = evaluate(EvalTask(spec={"stages": "nope"}, measure=FAST))
    assert not out.ok and out.failure.reason == "invalid_spec"


def test_bad_reference_is_invalid_spec():
    out = evaluate(tiny_task(measure=FAST.model_copy(update={"reference": "preset:nope"})),
                   isolated=False)
    assert out.failure.reason == "invalid_spec" and "reference" in out.failure.message


def test_obviously_too_big_is_refused_before_allocating():
    spec = load_spec("preset:mobilenet_v2@1.0").canonical_dict()
    task = EvalTask(spec=spec, measure=MeasureSettings(batch=32, resolution=512),
                    memory_mb=256)
    need, why = memory_estimate(task)
    assert need > 900 * 2**20 and "batch 32, resolution 512" in why
    t0 = time.perf_counter()
    out = evaluate(task)
    assert not out.ok and out.failure.reason == "out_of_memory"
    assert "refused before allocating" in out.failure.message
    assert time.perf_counter() - t0 < 2.0
    # the tiny model at the same ceiling passes the pre-check
    assert memory_estimate(tiny_task(memory_mb=256))[0] < 64 * 2**20


def test_in_process_failures_are_typed_not_raised():
    out = evaluate(tiny_task(measure=FAST.model_copy(update={"dtype": "float16"})),
                   isolated=False)
    assert not out.ok and out.failure.reason == "unsupported"


def test_in_process_latency_and_quality():
    out = evaluate(tiny_task(quality=QualitySettings(signal="synflow", batch=4, resolution=32)),
                   isolated=False)
    assert out.ok, out.failure
    assert out.latency.latency_ms.median > 0
    assert out.quality.signal == "synflow"


def test_isolation_timeout_then_oom_then_success():
    """A hang is killed at the timeout, a model over the memory ceiling fails with
    out_of_memory in the child, and the caller goes on to measure the next model."""
    before = _children()
    slow = tiny_task(measure=FAST.model_copy(update={"min_run_time_s": 30.0, "rounds": 10}),
                     timeout_s=3.0)
    t0 = time.perf_counter()
    out = evaluate(slow)
    elapsed = time.perf_counter() - t0
    assert not out.ok and out.failure.reason == "timeout", out.failure
    assert 3.0 <= elapsed < 20.0
    time.sleep(0.2)
    assert _children() <= before  # the whole child process group is gone

    big = EvalTask(spec=load_spec("preset:mobilenet_v2@1.0").canonical_dict(),
                   measure=FAST.model_copy(update={"batch": 32, "resolution": 512}),
                   memory_mb=256, timeout_s=120)
    out = evaluate(big, precheck=False)  # allocate for real: the ceiling must hold
    assert not out.ok and out.failure.reason == "out_of_memory", out.failure
    assert "allocate" in out.failure.message

    out = evaluate(tiny_task(memory_mb=512))
    assert out.ok, out.failure
    assert out.latency.latency_ms.median > 0
    assert out.latency.device["threads"] == 1
    assert out.seconds > 0


def test_exception_classification():
    assert classify(SpecError("stages[0].block.groups", "bad")).reason == "invalid_spec"
    assert classify(UnsupportedSettings("x")).reason == "unsupported"
    assert classify(ExportError("ONNX export failed: x")).reason == "export_failed"
    assert classify(MemoryError()).reason == "out_of_memory"
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 268435456 bytes.")
    assert classify(oom).reason == "out_of_memory"
    assert classify(RuntimeError("CUDA out of memory. Tried to allocate")).reason \
        == "out_of_memory"
    other = classify(ValueError("something else\nsecond line"))
    assert other.reason == "runtime_error" and other.message == "ValueError: something else"


def test_exit_classification():
    assert exit_failure(-signal.SIGKILL, "").reason == "out_of_memory"
    seg = exit_failure(-signal.SIGSEGV, "")
    assert seg.reason == "crashed" and "SIGSEGV" in seg.message
    assert exit_failure(-signal.SIGABRT, "terminate called after throwing an instance of "
                        "'std::bad_alloc'").reason == "out_of_memory"
    crashed = exit_failure(1, "Traceback...\nImportError: boom")
    assert crashed.reason == "crashed" and "ImportError: boom" in crashed.message


def test_runner_imports_without_torch():
    code = ("import sys, search.evaluators.runner, search.evaluators.types; "
            "sys.exit(1 if 'torch' in sys.modules or 'optuna' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_folders_of_dead_evaluators_are_swept_on_the_next_start(tmp_path):
    """kill -9 of a parent and its child together leaves their folder; the next
    evaluator that starts removes it, and never a live process's folder."""
    import subprocess
    import sys

    from search.evaluators.runner import OWNER_FILE, sweep_stale_dirs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / "fitnas-eval-gone"
    gone.mkdir()
    (gone / OWNER_FILE).write_text(str(dead.pid))
    (gone / "task.json").write_text("{}")
    live = tmp_path / "fitnas-warm-live"
    live.mkdir()
    (live / OWNER_FILE).write_text("1")  # init: always alive
    mine = tmp_path / "fitnas-eval-mine"
    mine.mkdir()
    (mine / OWNER_FILE).write_text(str(__import__("os").getpid()))
    other = tmp_path / "unrelated"
    other.mkdir()
    (other / OWNER_FILE).write_text(str(dead.pid))
    assert sweep_stale_dirs(str(tmp_path)) == [str(gone)]
    assert not gone.exists() and live.exists() and mine.exists() and other.exists()
