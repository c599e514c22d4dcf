"""``fitnas evaluate`` through the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

TINY = ("net_v1_r32_nc10_n-tiny,stem:cn_s2_c16_a-relu6,ir_s2_e2.0_c16_a-relu6,"
        "ir_r2_s2_e3.0_c32_a-hswish,head:cn_k1_c64")


def fitnas(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    exe = shutil.which("fitnas")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "service.cli", *args]
    full_env = {**os.environ, "FITNAS_DATA_SOURCES": "", "FITNAS_DATA_SOURCES_FILE": ""}
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def test_naswot_json_is_deterministic_across_processes():
    args = ("evaluate", TINY, "--signal", "naswot", "--batch", "16", "--seed", "5",
            "--threads", "1", "--json")
    a, b = fitnas(*args), fitnas(*args)
    assert a.returncode == 0, a.stderr
    out = json.loads(a.stdout)
    assert out["signal"] == "naswot" and out["details"]["seed"] == 5
    assert out["details"]["batch"] == 16 and out["details"]["num_classes"] == 10
    assert out["spec"]["name"] == "tiny"
    assert 0 < out["value"] < 1e6
    assert json.loads(b.stdout)["value"] == out["value"]


def test_train_prints_accuracy_for_people():
    r = fitnas("evaluate", TINY, "--signal", "train", "--steps", "60", "--threads", "1",
               "--resolution", "24")
    assert r.returncode == 0, r.stderr
    assert "validation accuracy" in r.stdout and "24x24" in r.stdout
    acc = float(r.stdout.split("validation accuracy ")[1].split()[0])
    assert 0.3 < acc <= 1.0


def test_configured_npz_source(tmp_path):
    """A data set named in the worker configuration (relative paths: relative to the file)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 12, 12, 3), dtype=np.uint8)
    y = np.repeat([0, 1], 20)
    x[y == 1, :, :, 0] = 255
    np.savez(tmp_path / "two.npz", x=x, y=y)
    (tmp_path / "sources.json").write_text(json.dumps({"two": "two.npz"}))
    r = fitnas("evaluate", TINY, "--signal", "grad_norm", "--data", "two", "--batch", "8",
               "--json", env={"FITNAS_DATA_SOURCES_FILE": str(tmp_path / "sources.json")})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)["details"]
    assert d["num_classes"] == 2 and d["data"] == "two" and d["in_channels"] == 3


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("--signal", "synflow", "--data", "imagenet"), None, "unknown data set 'imagenet'"),
        (("--signal", "zen"), None, "--signal must be one of"),
        (("--signal", "train", "--steps", "0"), None, "--steps"),
        (("--signal", "synflow"), {"FITNAS_DATA_SOURCES": "{bad"}, "FITNAS_DATA_SOURCES"),
        (("--signal", "synflow", "--data-sources", "/nonexistent/sources.json"), None,
         "cannot read data sources file"),
    ],
)
def test_errors_are_one_line(args, env, message):
    r = fitnas("evaluate", TINY, *args, env=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in r.stderr


def test_bad_spec_is_one_line():
    r = fitnas("evaluate", "preset:nosuch", "--signal", "synflow")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown preset")
