"""The in-process measurement protocol: runtimes, reference ratios, remeasuring, threads,
settings refused before anything is built. Tiny models at resolution 32, short rounds."""

from __future__ import annotations

import pytest
import torch

from blocks import load_spec
from blocks.cost import estimate_cost
from search.evaluators.latency import (
    UnsupportedSettings,
    build_folded,
    measure_latency,
    prepare,
)
from search.evaluators.types import MeasureSettings

TINY = "preset:mobilenet_v2@0.25"
FAST = {"resolution": 32, "min_run_time_s": 0.02, "rounds": 3, "threads": 1}
has_cuda = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny():
    return load_spec(TINY)


def test_eager_with_reference_ratio(tiny):
    s = MeasureSettings(reference="preset:mobilenet_v2@0.35", **FAST)
    r = measure_latency(tiny, s)
    lat, ratio, ref = r.latency_ms, r.ratio_to_reference, r.reference_latency_ms
    assert r.runtime == "eager" and r.settings == s
    assert 0 < lat.min <= lat.median <= lat.p90 <= lat.max
    assert lat.n >= s.rounds and lat.iqr >= 0 and lat.cv >= 0
    # one ratio per round, each candidate-median / reference-median of that round
    assert ratio.n == s.rounds * r.load["attempts"]
    assert ref.n >= s.rounds
    assert 0.3 * lat.median / ref.median < ratio.median < 3 * lat.median / ref.median
    assert r.reference == "preset:mobilenet_v2@0.35"
    # fingerprint and input description
    d = r.device
    assert d["input_shape"] == [1, 3, 32, 32]
    assert d["reference_input_shape"] == [1, 3, 32, 32]
    assert d["threads"] == 1 and d["runtime"] == "eager" and d["dtype"] == "float32"
    assert d["channels_last"] is False and d["batch"] == 1 and d["timer"] == "perf_counter"
    assert d["torch"] == torch.__version__
    cost = estimate_cost(tiny, 32, 1)
    assert (r.params, r.macs) == (cost.params, cost.macs)
    for phase in ("before", "during", "after"):
        assert r.load[phase]["other_cores"] is not None
    assert r.load["free_cores"] >= 1
    assert torch.get_num_threads() >= 1  # the caller's thread setting is restored


def test_threads_setting_is_restored(tiny):
    before = torch.get_num_threads()
    measure_latency(tiny, MeasureSettings(reference=None, **FAST))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("runtime", ["torchscript", "onnxruntime"])
def test_runtime_computes_the_same_function(tiny, runtime):
    """The timed runtime is the same network: its output equals eager PyTorch's."""
    base = MeasureSettings(runtime="eager", **FAST)
    with torch.no_grad():
        eager = prepare(tiny, base, 32, 1)
        other = prepare(tiny, base.model_copy(update={"runtime": runtime}), 32, 1)
    assert other.output.shape == (1, 1000)
    torch.testing.assert_close(other.output.float(), eager.output.float(), atol=1e-4, rtol=1e-3)
    if runtime == "onnxruntime":
        assert other.info["providers"] == ["CPUExecutionProvider"]


def test_folded_model_matches_unfolded(tiny):
    from blocks import build_model

    torch.manual_seed(0)
    model = build_model(tiny).eval()
    folded = build_folded(tiny)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("runtime", ["eager", "torchscript", "onnxruntime"])
def test_each_runtime_measures(tiny, runtime):
    r = measure_latency(tiny, MeasureSettings(runtime=runtime, reference=None, **FAST))
    assert r.runtime == runtime and r.device["runtime"] == runtime
    assert r.latency_ms.median > 0 and r.ratio_to_reference is None
    if runtime == "onnxruntime":
        assert r.device["runtime_info"]["onnx_bytes"] > 100_000
        assert r.device["onnxruntime"]


def test_channels_last_is_recorded(tiny):
    r = measure_latency(tiny, MeasureSettings(channels_last=True, reference=None, **FAST))
    assert r.settings.channels_last and r.device["channels_last"]
    assert r.device["runtime_info"]["memory_format"] == "channels_last"


def test_bigger_model_is_slower_relative_to_the_reference():
    """Real behaviour: ~6x the MACs is clearly slower than the reference it is timed
    against, whatever the machine's load (ONNX Runtime, where compute dominates)."""
    big = load_spec("preset:mobilenet_v2@1.0")
    r = measure_latency(big, MeasureSettings(runtime="onnxruntime", resolution=64,
                                             reference=TINY, min_run_time_s=0.02, rounds=3,
                                             threads=1))
    assert r.ratio_to_reference.median > 1.5
    assert r.latency_ms.median > r.reference_latency_ms.median


def test_wide_spread_is_measured_again_and_said(tiny):
    r = measure_latency(tiny, MeasureSettings(reference=None, max_cv=1e-6, **FAST))
    assert r.remeasured
    assert r.load["attempts"] == 3
    assert any("measured 3 times" in n for n in r.notes)
    assert any("still above max_cv" in n for n in r.notes)


def test_threads_are_capped_at_free_cores(tiny):
    from search.evaluators.fingerprint import logical_cores

    r = measure_latency(tiny, MeasureSettings(**{**FAST, "threads": 64}, reference=None))
    assert r.device["threads"] <= logical_cores()
    assert r.device["threads_requested"] == 64
    assert any("asked for 64 threads" in n for n in r.notes)


@pytest.mark.parametrize(
    "update, words",
    [
        ({"dtype": "float16"}, "CUDA only"),
        ({"runtime": "onnxruntime", "channels_last": True}, "channels_last"),
        ({"device": "cuda:0"} if not has_cuda else {"device": "cuda:99"}, "cuda"),
    ],
)
def test_unsupported_settings_are_refused(tiny, update, words):
    with pytest.raises(UnsupportedSettings, match=words):
        measure_latency(tiny, MeasureSettings(**{**FAST, **update}))


# ---- CUDA (skipped without a GPU) ------------------------------------------------------------

cuda = pytest.mark.skipif(not has_cuda, reason="no CUDA GPU on this machine")


@cuda
@pytest.mark.parametrize("runtime, dtype", [("eager", "float32"), ("eager", "float16"),
                                            ("eager", "bfloat16"), ("torchscript", "float16")])
def test_cuda_measures(tiny, runtime, dtype):
    r = measure_latency(tiny, MeasureSettings(device="cuda:0", runtime=runtime, dtype=dtype,
                                              reference=TINY, **FAST))
    assert r.device["timer"] == "cuda_event"
    assert r.device["gpu"]["name"]
    assert r.latency_ms.median > 0 and r.ratio_to_reference is not None


@cuda
def test_cuda_onnxruntime(tiny):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here")
    r = measure_latency(tiny, MeasureSettings(device="cuda:0", runtime="onnxruntime",
                                              reference=None, **FAST))
    assert r.device["runtime_info"]["providers"][0] == "CUDAExecutionProvider"
