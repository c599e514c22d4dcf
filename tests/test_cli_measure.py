"""``fitnas measure``: JSON result, the table for people, one-line failures."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from blocks import load_spec
from blocks.cost import estimate_cost
from service.cli import app

FAST = ["-r", "32", "--min-run-time", "0.02", "--rounds", "3", "--threads", "1"]
runner = CliRunner()


def test_measure_json_isolated():
    """The real command, isolated in a child process (the default)."""
    cmd = [sys.executable, "-c", "from service.cli import main; main()", "measure",
           "preset:mobilenet_v2@0.25", *FAST, "--reference", "preset:mobilenet_v2@0.35",
           "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("median", "p90", "iqr", "cv", "n"):
        assert key in data["latency_ms"]
    assert data["latency_ms"]["median"] > 0
    assert data["ratio_to_reference"]["n"] == 3 * data["load"]["attempts"]
    assert data["reference"] == "preset:mobilenet_v2@0.35"
    assert data["runtime"] == "eager"
    assert data["device"]["threads"] == 1 and data["device"]["input_shape"] == [1, 3, 32, 32]
    assert data["device"]["cpu_model"]
    cost = estimate_cost(load_spec("preset:mobilenet_v2@0.25"), 32, 1)
    assert (data["params"], data["macs"]) == (cost.params, cost.macs)
    assert data["spec"]["name"] == "mobilenet_v2@0.25"


def test_measure_table_in_process():
    res = runner.invoke(app, ["measure", "preset:mobilenet_v2@0.25", *FAST, "--runtime",
                              "onnxruntime", "--reference", "none", "--in-process"])
    assert res.exit_code == 0, res.output
    for word in ("latency", "onnxruntime on cpu", "input 1x3x32x32", "threads", "load"):
        assert word in res.output
    assert "vs reference" not in res.output


def test_measure_failures_are_one_line():
    res = runner.invoke(app, ["measure", "preset:nope"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "unknown preset" in res.output

    res = runner.invoke(app, ["measure", "preset:mobilenet_v2@0.25", "--dtype", "float16",
                              "--in-process"])
    assert res.exit_code == 1
    assert res.output.strip() == ("error: unsupported: dtype float16 is measured on CUDA "
                                  "only; use float32 on cpu")

    res = runner.invoke(app, ["measure", "preset:mobilenet_v2@0.25", "--batch", "0"])
    assert res.exit_code == 2 and "batch" in res.output

    res = runner.invoke(app, ["measure", "preset:mobilenet_v2@1.0", "--batch", "64", "-r",
                              "512", "--memory-mb", "256", "--json"])
    assert res.exit_code == 1
    assert json.loads(res.stdout)["failure"]["reason"] == "out_of_memory"
    assert res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("error: out_of_memory: refused before allocating")


def test_measure_timeout():
    res = runner.invoke(app, ["measure", "preset:mobilenet_v2@0.25", "--timeout", "1"])
    assert res.exit_code == 1
    assert res.output.strip() == "error: timeout: no result after 1 s; the evaluation was killed"
