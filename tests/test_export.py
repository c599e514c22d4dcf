"""Exports: JSON spec, standalone PyTorch source, TorchScript, ONNX."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from strategies import arch_specs

from blocks import PRESETS, ArchSpec, SpecError, build_model, load_spec, preset
from blocks.cost import estimate_cost
from blocks.export import FILE_NAMES, ExportError, export, export_all, pytorch_source

torch.set_num_threads(1)


def _fill(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministic weights AND BatchNorm statistics, in state_dict order (the same
    procedure runs in the subprocess on the generated model)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=gen) * 0.5 + (0.5 if
                            key.endswith("running_var") else -0.2))
    return model.eval()


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- JSON --------------------------------------------------------------------------------


def test_json_export_round_trips_with_the_same_hash(tmp_path):
    spec = preset("mobilenet_v3_small", 0.75)
    path = export(spec, "json", tmp_path / "sub" / "spec.json")
    assert path.is_file()
    back = load_spec(str(path))
    assert back == spec
    assert back.hash == spec.hash
    assert json.loads(path.read_text()) == json.loads(spec.canonical_json())


# ---- standalone PyTorch ------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import importlib.util, json, sys
    sys.modules["blocks"] = None  # the generated files must not need fitnas
    import torch
    torch.set_num_threads(1)
    out = {}
    for path in sys.argv[1:-1]:
        spec = importlib.util.spec_from_file_location("gen", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        model = mod.build_model()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if value.is_floating_point():
                    value.copy_(torch.rand(value.shape, generator=gen) * 0.5
                                + (0.5 if key.endswith("running_var") else -0.2))
        model.eval()
        x = torch.randn(2, *mod.INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = model(x)
        out[path] = {"params": sum(p.numel() for p in model.parameters()),
                     "keys": list(model.state_dict()), "y": y.tolist(),
                     "hash": mod.SPEC_HASH}
    json.dump(out, open(sys.argv[-1], "w"))
""")


def test_pytorch_export_of_every_preset_rebuilds_identically_with_only_torch(tmp_path):
    specs = {name: preset(name, resolution=32) for name in PRESETS}
    paths = {name: export(spec, "pytorch", tmp_path / f"{name}.py")
             for name, spec in specs.items()}
    result_file = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, paths.values()), str(result_file)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(result_file.read_text())
    for name, spec in specs.items():
        got = results[str(paths[name])]
        model = _fill(build_model(spec))
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = model(x)
        assert got["params"] == estimate_cost(spec).params, name
        assert got["params"] == sum(p.numel() for p in model.parameters()), name
        assert got["keys"] == list(model.state_dict()), name
        assert got["hash"] == spec.hash
        torch.testing.assert_close(torch.tensor(got["y"]), y, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(spec=arch_specs())
def test_pytorch_export_of_random_specs_loads_the_builders_weights(tmp_path, spec):
    path = tmp_path / f"net_{spec.short_hash}.py"
    path.write_text(pytorch_source(spec))
    mod = _import(path, f"gen_{spec.short_hash}")
    ours = _fill(build_model(spec))
    theirs = mod.build_model().eval()
    theirs.load_state_dict(ours.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, spec.in_channels, spec.resolution, spec.resolution)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert json.loads(mod.SPEC_JSON) == spec.canonical_dict()


# ---- TorchScript -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["shufflenet_v1", "mobilenet_v3_small"])
def test_torchscript_matches_eager_and_carries_the_spec(tmp_path, name):
    spec = preset(name, 0.5, resolution=64)
    model = _fill(build_model(spec), seed=3).train()  # export must use eval mode
    path = export(spec, "torchscript", tmp_path / "m.pt", model=model)
    assert model.training  # left as it was
    extra = {"fitnas_spec.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["fitnas_spec.json"]) == spec.canonical_dict()
    x = torch.randn(2, 3, 64, 64)  # traced at batch 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-4, atol=1e-5)


# ---- ONNX --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["shufflenet_v1", "mobilenet_v3_small", "resnext50"])
def test_onnx_passes_the_checker_and_matches_eager(tmp_path, name):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    width = 0.25 if name == "resnext50" else 0.5
    spec = preset(name, width, resolution=64)
    model = _fill(build_model(spec), seed=5)
    path = export(spec, "onnx", tmp_path / "m.onnx", model=model)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["fitnas_spec_hash"] == spec.hash
    assert ArchSpec.model_validate_json(meta["fitnas_spec.json"]) == spec
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 64, 64)  # dynamic batch
    (y,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-4)


# ---- random specs through the traced formats (slow) --------------------------------------


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(spec=arch_specs())
def test_random_specs_export_to_torchscript_and_onnx(tmp_path, spec):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _fill(build_model(spec), seed=7)
    x = torch.randn(2, spec.in_channels, spec.resolution, spec.resolution)
    with torch.no_grad():
        expected = model(x)
    ts = export(spec, "torchscript", tmp_path / f"{spec.short_hash}.pt", model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(ts))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-4)
    path = export(spec, "onnx", tmp_path / f"{spec.short_hash}.onnx", model=model)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-4, atol=1e-4)


# ---- export_all and errors ---------------------------------------------------------------


def test_export_all_writes_every_format(tmp_path):
    pytest.importorskip("onnx")
    spec = preset("mobilenet_v2", 0.25, resolution=32)
    paths = export_all(spec, tmp_path / "out")
    assert set(paths) == {"json", "pytorch", "torchscript", "onnx"}
    for fmt, path in paths.items():
        assert path == tmp_path / "out" / FILE_NAMES[fmt]
        assert path.stat().st_size > 0
    assert load_spec(str(paths["json"])).hash == spec.hash


def test_export_errors_are_one_line(tmp_path):
    spec = preset("mobilenet_v2", 0.25)
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export(spec, "tflite", tmp_path / "x")  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="is a directory"):
        export(spec, "json", tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="cannot write") as err:
        export(spec, "pytorch", blocker / "model.py")
    assert "\n" not in str(err.value)
    bad = ArchSpec.model_validate({
        "stem": {"out_channels": 6},
        "stages": [{"block": {"kind": "conv", "out_channels": 8, "groups": 4}}],
    })
    with pytest.raises(SpecError) as serr:
        export(bad, "json", tmp_path / "bad.json")
    assert serr.value.field == "stages[0].block.groups"
    assert not (tmp_path / "bad.json").exists()


def test_pytorch_export_says_how_to_see_the_measured_latency():
    """The export's header names the allocator environment every evaluator runs with."""
    from blocks.export import pytorch_source
    from blocks.presets import preset
    from search.evaluators import allocator

    src = pytorch_source(preset("mobilenet_v2", 0.35))
    for key, value in allocator.DEPLOY_ENV.items():
        assert f"{key}={value}" in src
