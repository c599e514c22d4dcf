"""A short run of benchmarks/repeatability.py (the full run takes minutes: run the script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_repeatability_benchmark_short_run(tmp_path):
    models = ["preset:mobilenet_v1@0.25", "preset:mobilenet_v2@0.5", "preset:mobilenet_v2@1"]
    out = tmp_path / "raw.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "repeatability.py"), "--models", *models,
         "--processes", "2", "--resolution", "64", "--min-run-time", "0.05", "--rounds", "3",
         "--timer-min-run-time", "0.2", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for m in models:
        assert m in text
    assert "Spearman rank correlation, ratio_to_reference" in text
    raw = json.loads(out.read_text())
    assert set(raw) == set(models)
    for rs in raw.values():
        assert len(rs) == 2
        for r in rs:
            assert r["median_ms"] > 0 and r["timer_median_ms"] > 0 and r["ratio"] > 0
    # the bigger network is slower than the smaller one relative to the same reference
    ratio = {m: sorted(r["ratio"] for r in rs)[0] for m, rs in raw.items()}
    assert ratio["preset:mobilenet_v2@1"] > ratio["preset:mobilenet_v1@0.25"]
