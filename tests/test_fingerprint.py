"""Device fingerprint, load sampling and the thread / contention policy."""

from __future__ import annotations

import os
import time

import pytest
import torch

from search.evaluators import fingerprint as fp


def test_fingerprint_describes_this_machine():
    d = fp.device_fingerprint("cpu", threads=1)
    assert d["device"] == "cpu"
    assert d["threads"] == 1
    assert d["torch"] == torch.__version__
    assert d["logical_cores"] == min(len(os.sched_getaffinity(0)), os.cpu_count())
    assert d["cpu_model"] and d["cpu_model"] != "unknown"
    assert d["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    import onnxruntime

    assert d["onnxruntime"] == onnxruntime.__version__
    if not torch.cuda.is_available():
        assert d["gpu"] is None
    assert len(d["id"]) == 16


def test_fingerprint_id_is_stable_and_ignores_threads():
    a = fp.device_fingerprint("cpu", threads=1)
    b = fp.device_fingerprint("cpu", threads=2)
    assert a["id"] == b["id"]
    assert a["threads"] != b["threads"]
    assert fp.device_fingerprint("cuda:0", threads=1)["id"] != a["id"]


def test_default_threads_is_current_torch_setting():
    assert fp.device_fingerprint("cpu")["threads"] == torch.get_num_threads()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_fingerprint_names_the_gpu():
    d = fp.device_fingerprint("cuda:0", threads=1)
    assert d["gpu"]["name"] == torch.cuda.get_device_name(0)
    assert d["gpu"]["cuda"] == torch.version.cuda
    assert d["gpu"]["memory_mb"] > 0


def test_load_window_counts_own_cpu_time():
    w = fp.LoadWindow().start()
    t0 = time.perf_counter()
    x = 0
    while time.perf_counter() - t0 < 0.3:
        x += 1
    out = w.stop()
    assert out["own_cores"] > 0.3  # a busy loop, even on a loaded machine
    assert out["busy_cores"] >= out["other_cores"] >= 0.0
    assert out["seconds"] >= 0.3


def test_sample_load_fields():
    s = fp.sample_load(0.05)
    assert s["own_cores"] < 0.5  # sleeping
    assert s["other_cores"] is not None and s["other_cores"] >= 0
    assert s["procs_running"] >= 1
    assert len(s["loadavg"]) == 3


def test_a_zero_second_sample_is_a_snapshot_without_sleeping():
    import time

    t0 = time.perf_counter()
    s = fp.sample_load(0)
    assert time.perf_counter() - t0 < 0.05
    assert s["other_cores"] is None and s["seconds"] == 0.0
    assert s["procs_running"] >= 1
    # nothing in it to resolve cores from: the load average decides
    assert 1 <= fp.free_cores(s, cores=2) <= 2


def test_budget_aware_measurement_with_given_threads_does_not_sleep_for_load():
    from search.evaluators.latency import (
        LOAD_SAMPLE_BUDGET_S,
        LOAD_SAMPLE_S,
        load_sample_seconds,
    )
    from search.evaluators.types import LatencyBudget, MeasureSettings

    budget = LatencyBudget(ratio=1.0)
    assert load_sample_seconds(MeasureSettings(threads=1), None) == LOAD_SAMPLE_S
    assert load_sample_seconds(MeasureSettings(threads=None), budget) == LOAD_SAMPLE_BUDGET_S
    assert load_sample_seconds(MeasureSettings(threads=1), budget) == 0.0


@pytest.mark.parametrize(
    "other, cores, free",
    [(0.0, 2, 2), (0.3, 2, 2), (0.6, 2, 1), (1.0, 2, 1), (1.9, 2, 1), (5.0, 2, 1),
     (0.0, 16, 16), (3.2, 16, 13)],
)
def test_free_cores(other, cores, free):
    assert fp.free_cores({"other_cores": other}, cores=cores) == free


def test_choose_threads_policy():
    idle = {"other_cores": 0.0}
    busy = {"other_cores": 1.0}
    assert fp.choose_threads(None, idle, cores=2) == (2, [])
    assert fp.choose_threads(None, idle, cores=16) == (4, [])  # at most 4 by default
    assert fp.choose_threads(None, busy, cores=2) == (1, [])
    assert fp.choose_threads(1, busy, cores=2) == (1, [])
    threads, notes = fp.choose_threads(2, busy, cores=2)  # one core busy: never 2 threads
    assert threads == 1
    assert "asked for 2 threads" in notes[0]
    assert fp.choose_threads(8, idle, cores=16) == (8, [])


def test_contention_flag():
    assert not fp.is_contended(1, 0.2, 0.4, None, cores=2)
    assert fp.is_contended(1, 0.2, 1.6, 0.1, cores=2)
    assert fp.is_contended(2, 0.0, 0.6, 0.0, cores=2)
    assert not fp.is_contended(2, 0.0, 0.4, 0.0, cores=2)
    assert not fp.is_contended(2, None, None, cores=2)
