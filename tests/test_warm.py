"""The warm evaluator keeps the one-shot child's guarantees: same typed failures, same
figures, a child replaced after a failure and recycled after N tasks, no process or
temporary directory left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from blocks import load_spec
from search.evaluators.runner import evaluate
from search.evaluators.types import EvalTask, MeasureSettings
from search.evaluators.warm import WarmEvaluator

FAST = MeasureSettings(resolution=32, min_run_time_s=0.02, rounds=3, threads=1, reference=None)


def tiny_task(**kw) -> EvalTask:
    spec = load_spec("preset:mobilenet_v2@0.25").canonical_dict()
    return EvalTask(spec=spec, **{"measure": FAST, "timeout_s": 120.0, **kw})


def _wait_for_child(marker: str, timeout: float = 60.0) -> psutil.Process:
    """The evaluation child of this process whose command line holds ``marker``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.Process().children(recursive=True):
            try:
                if marker in " ".join(p.cmdline()):
                    return p
            except psutil.Error:
                continue
        threading.Event().wait(0.02)  # polling for a process to appear, not for time
    raise AssertionError(f"no child with {marker!r} appeared")


def test_warm_reuses_one_child_recycles_and_cleans_up():
    with WarmEvaluator(max_tasks=2, prespawn=False) as w:
        outs = [w(tiny_task()) for _ in range(3)]
        assert all(o.ok for o in outs), [o.failure for o in outs]
        assert [o.evaluator.fresh for o in outs] == [True, False, True]
        assert [o.evaluator.task_index for o in outs] == [0, 1, 0]
        assert w.children_started == 2
        assert all(o.latency.latency_ms.median > 0 for o in outs)
        assert outs[1].latency.device["allocator"].startswith("glibc:mmap_threshold=")
        pid, tmp = w.child_pid, w._dir
        assert pid is not None and tmp.is_dir()
    assert not tmp.exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_warm_threads_resolved_once_for_its_lifetime():
    task = tiny_task(measure=FAST.model_copy(update={"threads": None}))
    with WarmEvaluator(prespawn=False) as w:
        a, b = w(task), w(task)
    assert a.ok and b.ok
    assert a.evaluator.threads == b.evaluator.threads >= 1
    assert a.latency.settings.threads == a.evaluator.threads


def test_invalid_spec_and_precheck_stay_in_the_caller():
    spec = load_spec("preset:mobilenet_v2@1.0").canonical_dict()
    big = EvalTask(spec=spec, measure=MeasureSettings(batch=32, resolution=512), memory_mb=256)
    with WarmEvaluator(prespawn=False) as w:
        out = w(big)
        assert out.failure.reason == "out_of_memory"
        assert "refused before allocating" in out.failure.message
        assert w.children_started == 0


@pytest.mark.parametrize("mode", [pytest.param("one_shot", marks=pytest.mark.slow), "warm"])
def test_failure_corpus_is_typed_the_same_both_ways(mode):
    """A model that times out, one over the memory ceiling, one whose interpreter dies of
    a signal: the same reasons from the one-shot child and from the warm one, and the
    next model is measured."""
    w = WarmEvaluator(prespawn=False) if mode == "warm" else None
    run = w if w is not None else evaluate
    marker = "warm --child" if mode == "warm" else "runner --child"
    try:
        slow = tiny_task(measure=FAST.model_copy(update={"min_run_time_s": 30.0,
                                                         "rounds": 10}), timeout_s=4.0)
        out = run(slow)
        assert out.failure is not None and out.failure.reason == "timeout", out.failure

        big = EvalTask(spec=load_spec("preset:mobilenet_v2@1.0").canonical_dict(),
                       measure=FAST.model_copy(update={"batch": 32, "resolution": 512}),
                       memory_mb=256, timeout_s=120)
        out = run(big, precheck=False)
        assert out.failure is not None and out.failure.reason == "out_of_memory", out.failure
        assert "allocate" in out.failure.message

        result = {}
        hang = tiny_task(measure=FAST.model_copy(update={"min_run_time_s": 30.0}),
                         timeout_s=120.0)
        thread = threading.Thread(target=lambda: result.update(out=run(hang)))
        thread.start()
        _wait_for_child(marker).send_signal(signal.SIGSEGV)
        thread.join(60)
        out = result["out"]
        assert out.failure is not None and out.failure.reason == "crashed", out.failure
        assert "SIGSEGV" in out.failure.message

        out = run(tiny_task())
        assert out.ok, out.failure
        assert out.evaluator.mode == mode and out.evaluator.fresh
    finally:
        if w is not None:
            w.close()


def test_warm_child_dies_with_its_parent(tmp_path):
    code = (
        "import os, sys\n"
        "from blocks import load_spec\n"
        "from search.evaluators.types import EvalTask, MeasureSettings\n"
        "from search.evaluators.warm import WarmEvaluator\n"
        "w = WarmEvaluator(prespawn=False)\n"
        "t = EvalTask(spec=load_spec('preset:mobilenet_v2@0.25').canonical_dict(), "
        "measure=MeasureSettings(resolution=32, min_run_time_s=0.02, rounds=3, threads=1, "
        "reference=None))\n"
        "assert w(t).ok\n"
        "print(w._dir, w.child_pid, flush=True)\n"
        "os._exit(0)\n"  # no close(): the parent vanishes
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180, env=env, check=True)
    tmp, pid = out.stdout.split()[-2], int(out.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        threading.Event().wait(0.05)  # polling for the process to go, not for time
    else:
        raise AssertionError("the warm child outlived its parent")
    assert not os.path.exists(tmp)  # and took its temporary directory with it


def test_warm_and_one_shot_agree_within_their_spread():
    """The same specs, fixed protocol, measured by fresh one-shot children and by one
    warm child (the second spec on a used child, the reference kept from the first):
    the ratios' medians differ by less than the two measurements' spreads (IQR), or by
    less than 5 % where five rounds give an IQR narrower than the ratio's variation between
    processes (1.3 % mean, 2.1 % worst CV on a quiet machine: README, "Repeatability")."""
    settings = MeasureSettings(resolution=64, min_run_time_s=0.05, rounds=5, threads=1,
                               reference="preset:mobilenet_v2@0.35", max_cv=1.0)
    specs = ["preset:mobilenet_v2@0.25", "preset:mobilenet_v3_small@0.5"]
    tasks = [EvalTask(spec=load_spec(s).canonical_dict(), measure=settings, timeout_s=120)
             for s in specs]
    with WarmEvaluator(prespawn=False) as w:
        warm = [w(t) for t in tasks]
    one_shot = [evaluate(t) for t in tasks]
    assert warm[1].latency.device["reference_reused"] is True
    assert not warm[1].evaluator.fresh
    for a, b in zip(warm, one_shot, strict=True):
        assert a.ok and b.ok, (a.failure, b.failure)
        ra, rb = a.latency.ratio_to_reference, b.latency.ratio_to_reference
        assert abs(ra.median - rb.median) <= max(ra.iqr + rb.iqr, 0.05 * rb.median), (ra, rb)
        assert a.latency.device["allocator"] == b.latency.device["allocator"]


def test_abort_from_another_thread_ends_the_evaluation_in_flight():
    """What a worker does when its lease is lost: the evaluation returns at once, and the
    next task gets a fresh child."""
    hang = tiny_task(measure=FAST.model_copy(update={"min_run_time_s": 30.0}),
                     timeout_s=120.0)
    with WarmEvaluator(prespawn=False) as w:
        result = {}
        thread = threading.Thread(target=lambda: result.update(out=w(hang)))
        thread.start()
        _wait_for_child("warm --child")
        while w.child_pid is None:
            threading.Event().wait(0.02)  # polling for the child to be registered
        t0 = time.monotonic()
        w.abort()
        thread.join(30)
        assert time.monotonic() - t0 < 10
        out = result["out"]
        assert out.failure.reason == "crashed" and "aborted" in out.failure.message
        nxt = w(tiny_task())
        assert nxt.ok and nxt.evaluator.fresh
