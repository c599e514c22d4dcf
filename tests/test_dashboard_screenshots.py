"""What a person sees in optuna-dashboard: headless Chromium screenshots of a small
search's study page and of one trial's page.

    FITNAS_SCREENSHOT_DIR=shots python3 -m pytest -m slow tests/test_dashboard_screenshots.py

writes ``study.png`` and ``trial.png`` there (a temp folder otherwise). Needs Chromium
(``apt-get install chromium``); skips without it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from service_harness import free_port
from test_cli_trials import _fake
from test_dashboard_review import _serve, _wait
from test_search_local import tiny_config

from search.local import run_search

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def _shot(url: str, out: Path) -> None:
    subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--window-size=1400,1000",
                    "--virtual-time-budget=8000", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
def test_screenshots_of_the_study_and_a_trial(tmp_path):
    out = Path(os.environ.get("FITNAS_SCREENSHOT_DIR") or tmp_path / "shots")
    out.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp_path}/fitnas.db"
    res = run_search(tiny_config(10, max_latency_ms=0.9), url, "tiny", tmp_path,
                     progress=False, presets=[], evaluate=_fake)
    port = free_port()
    proc = _serve(url, port)
    base = f"http://127.0.0.1:{port}"
    try:
        [summary] = _wait(proc, base)
        sid = summary["study_id"]
        winner = res.result["winner"]["number"]
        _shot(f"{base}/dashboard/studies/{sid}", out / "study.png")
        _shot(f"{base}/dashboard/studies/{sid}/trials?numbers={winner}", out / "trial.png")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    for name in ("study.png", "trial.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, name
