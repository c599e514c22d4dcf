"""``fitnas arch``: the real console script for the contract cases, the in-process runner
for the rest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blocks import PRESETS, load_spec, preset
from blocks.cost import estimate_cost
from service.cli import app

runner = CliRunner()


def fitnas(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    script = shutil.which("fitnas")
    cmd = [script] if script else [sys.executable, "-c", "from service.cli import main; main()"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, check=False)


def _one_line_error(proc_or_result, stderr: str) -> str:
    assert proc_or_result.returncode if hasattr(proc_or_result, "returncode") \
        else proc_or_result.exit_code
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr
    return lines[0]


# ---- the real console script -------------------------------------------------------------


def test_show_json_mobilenet_v2():
    proc = fitnas("arch", "show", "preset:mobilenet_v2", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["params"] == 3_504_872
    assert data["macs"] == 300_774_272
    spec = preset("mobilenet_v2")
    cost = estimate_cost(spec)
    assert data["activation_bytes"] == cost.activation_bytes
    assert data["activation_bytes_total"] == cost.activation_bytes_total
    assert data["hash"] == spec.hash
    assert data["name"] == "mobilenet_v2@1"
    assert data["resolution"] == 224
    assert load_spec(data["compact"]) == spec
    assert [b["name"] for b in data["blocks"]][:2] == ["stem", "stages[0]#0"]
    assert sum(b["params"] for b in data["blocks"]) == data["params"]


def test_bad_spec_gives_one_line_and_nonzero_exit():
    proc = fitnas("arch", "show", "preset:nope")
    assert proc.returncode != 0
    line = _one_line_error(proc, proc.stderr)
    assert "unknown preset 'nope'" in line
    assert proc.stdout == ""


def test_export_pytorch_then_run_it(tmp_path):
    proc = fitnas("arch", "export", "preset:mobilenet_v3_small@0.25", "--format", "pytorch",
                  "-o", str(tmp_path / "net.py"))
    assert proc.returncode == 0, proc.stderr
    assert "wrote pytorch export" in proc.stdout
    run = subprocess.run([sys.executable, str(tmp_path / "net.py")], capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    params = estimate_cost(preset("mobilenet_v3_small", 0.25)).params
    assert f"params={params} " in run.stdout


def test_export_bad_format_is_one_line(tmp_path):
    proc = fitnas("arch", "export", "preset:mobilenet_v2", "--format", "caffe", "-o",
                  str(tmp_path / "m"))
    assert "unknown format 'caffe'" in _one_line_error(proc, proc.stderr)
    assert not (tmp_path / "m").exists()


# ---- in process --------------------------------------------------------------------------


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_presets_lists_every_preset():
    result = _run("arch", "presets")
    assert result.exit_code == 0
    for name in PRESETS:
        assert name in result.stdout
    assert "3,504,872" in result.stdout
    data = json.loads(_run("arch", "presets", "--json").stdout)
    assert {p["name"] for p in data["presets"]} == set(PRESETS)
    by_name = {p["name"]: p for p in data["presets"]}
    assert by_name["resnext50"]["params"] == 25_028_904


def test_show_table_for_people():
    result = _run("arch", "show", "preset:mobilenet_v2@0.5", "--resolution", "160")
    assert result.exit_code == 0, result.output
    cost = estimate_cost(preset("mobilenet_v2", 0.5), resolution=160)
    assert f"{cost.params:,}" in result.stdout
    assert f"{cost.macs:,}" in result.stdout
    assert "stages[6]#0" in result.stdout and "classifier" in result.stdout
    table = result.stdout.split("compact ")[0]
    assert "ir_r" not in table  # each row is one repeat
    assert "ir_s2_c16_a-relu6" in table
    assert "ir_r2_s2_c16_a-relu6" in result.stdout.split("compact ")[1]


def test_show_accepts_compact_json_file_and_resolution(tmp_path):
    spec = preset("mnasnet", 0.5)
    path = tmp_path / "spec.json"
    path.write_text(spec.canonical_json())
    for arg in (spec.to_compact(), str(path), "preset:mnasnet@0.5"):
        data = json.loads(_run("arch", "show", arg, "--json", "-r", "96", "-b", "2").stdout)
        assert data["hash"] == spec.hash
        assert data["resolution"] == 96 and data["batch"] == 2
        assert data["macs"] == estimate_cost(spec, 96, 2).macs


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("arch", "show", "no-such-file.json"), "is not a preset"),
        (("arch", "show", "net_v1,stem:cn_c8,zz_c8"), "unknown block kind 'zz'"),
        (("arch", "show", "preset:mobilenet_v2@x"), "bad width"),
        (("arch", "show", "preset:mobilenet_v2", "-r", "4"), "--resolution: must be in"),
        (("arch", "show", "preset:mobilenet_v2", "-b", "0"), "--batch: must be >= 1"),
        (("arch", "show", '{"stem":{"out_channels":6},"stages":[{"block":{"kind":"conv",'
          '"out_channels":8,"groups":4}}]}'), "stages[0].block.groups"),
        (("arch", "show", '{"stem":{"out_channels":6},"stages":[{"block":{"kind":"conv",'
          '"out_channels":99999}}]}'), "out_channels"),
        (("arch", "show", "net_v1_r224,stem:cn_s2_c32,ir_e1.0_c16_a-relu7"),
         "part 3 ('ir_e1.0_c16_a-relu7'): stages.0.block.mbconv.act: Input should be 'relu'"),
        (("arch", "export", "preset:mobilenet_v2", "-f", "json"), "--output/-o is required"),
        (("arch", "export", "preset:mobilenet_v2", "-o", "x.bin"), "cannot tell the format"),
    ],
)
def test_bad_input_is_one_line(args, needle):
    result = _run(*args)
    assert result.exit_code != 0
    assert needle in _one_line_error(result, result.stderr)


def test_export_to_an_unwritable_path_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _run("arch", "export", "preset:mobilenet_v2@0.25", "-f", "json", "-o",
                  str(blocker / "m.json"))
    assert "cannot write" in _one_line_error(result, result.stderr)
    result = _run("arch", "export", "preset:mobilenet_v2@0.25", "-f", "json", "-o",
                  str(tmp_path))
    assert "is a directory" in _one_line_error(result, result.stderr)


def test_export_json_round_trips(tmp_path):
    out = tmp_path / "deep" / "m.json"
    result = _run("arch", "export", "preset:efficientnet_b0@0.5", "-f", "json", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert load_spec(str(out)) == preset("efficientnet_b0", 0.5)
