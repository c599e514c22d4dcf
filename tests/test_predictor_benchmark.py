"""benchmarks/predictor.py on the committed recording (nothing is measured), and the
recorder on a couple of candidates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


@pytest.mark.slow
def test_predictor_benchmark_quick_beats_the_macs_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "predictor.py"),
                           "--quick"], capture_output=True, text=True, timeout=600,
                          env=ENV, check=False)
    assert proc.returncode == 0, proc.stderr
    key = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("within_10pct", "kendall_tau", "n_train", "baseline_within_10pct",
                 "coverage"):
        assert name in key
    assert key["n_train"] == 200
    assert key["within_10pct"] > key["baseline_within_10pct"]
    assert key["kendall_tau"] > key["baseline_kendall_tau"]
    assert 0.75 <= key["coverage"] <= 1.0
    assert "MACs linear" in proc.stdout and "predictor" in proc.stdout


@pytest.mark.slow
def test_recorder_appends_and_skips_what_it_has(tmp_path):
    out = tmp_path / "rec.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "predictor_record.py"), "--n", "2",
           "--out", str(out)]
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV,
                              check=False)
        assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and len({r["spec"] for r in rows}) == 4
    assert {r["space"] for r in rows} == {"default", "mobilenet_v2"}
    assert all(r["ratio"] > 0 and r["ms"] > 0 for r in rows)


def test_predictor_benchmark_refuses_too_few_records(tmp_path):
    data = tmp_path / "few.jsonl"
    data.write_text("")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "predictor.py"),
                           "--quick", "--data", str(data)], capture_output=True, text=True,
                          timeout=120, env=ENV, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: 0 recorded candidates")
