"""Review in optuna-dashboard, read back through the dashboard's own HTTP API: no trial
over a budget among its "best trials", a study note and trial notes with the
architecture, the legacy constraints list, and artifacts for every Pareto member."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import optuna
from service_harness import exe, free_port
from test_cli_trials import _fake
from test_search_local import tiny_config

from search.local import run_search

ROOT = Path(__file__).resolve().parents[1]


def _serve(storage: str, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        exe(["fitnas", "dashboard", "--storage", storage, "--port", str(port)]),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc, base: str) -> list[dict]:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            r = httpx.get(f"{base}/api/studies", timeout=5)
            if r.status_code == 200:
                return r.json()["study_summaries"]
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError("optuna-dashboard did not answer in time")


def test_dashboard_review_tells_the_truth(tmp_path):
    url = f"sqlite:///{tmp_path}/fitnas.db"
    # a latency budget that some of the tiny space's networks miss once measured
    res = run_search(tiny_config(12, max_latency_ms=0.9), url, "tiny", tmp_path,
                     progress=False, presets=[], evaluate=_fake)
    review = res.result["review"]
    assert review["notes"] >= 13, review
    pareto = {m["number"] for m in res.result["pareto"]}
    assert pareto and set(review["artifacts"]) == {str(n) for n in pareto} | {"study"}
    study = optuna.load_study(study_name="tiny", storage=url)
    over = [t for t in study.trials if t.user_attrs.get("status") == "measured"
            and not t.user_attrs.get("feasible")]
    assert over, "the budget should leave some measured networks over it"

    port = free_port()
    proc = _serve(url, port)
    base = f"http://127.0.0.1:{port}"
    try:
        [summary] = _wait(proc, base)
        detail = httpx.get(f"{base}/api/studies/{summary['study_id']}", timeout=10).json()
        by_number = {t["number"]: t for t in detail["trials"]}
        # no infeasible trial is among the dashboard's best trials
        best = detail["best_trials"]
        assert best and {t["number"] for t in best} >= pareto
        for t in best:  # the same network found twice (once cached) may be there twice
            attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
            assert attrs["feasible"] == "1" and t["state"] == "Complete", t["number"]
        for t in over:
            assert by_number[t.number]["state"] == "Pruned"
            assert by_number[t.number]["constraints"], "the legacy constraints list"
            assert max(by_number[t.number]["constraints"]) > 0
        # notes: the study's and one per trial, with the architecture table
        note = detail["note"]["body"]
        assert "**target** `cpu`" in note and "max_latency_ms = 0.9" in note
        assert "**quality signal**" in note and "**sampler**" in note
        member = by_number[min(pareto)]
        assert "| stage | kind | repeats |" in member["note"]["body"]
        assert "latency median / p90" in member["note"]["body"]
        # artifacts: JSON spec, PyTorch code and ONNX on every Pareto member, the plot
        for n in pareto:
            names = sorted(a["filename"] for a in by_number[n]["artifacts"])
            assert names == ["model.json", "model.onnx", "model.py"], names
            art = by_number[n]["artifacts"][0]
            got = httpx.get(f"{base}/artifacts/{summary['study_id']}/"
                            f"{by_number[n]['trial_id']}/{art['artifact_id']}", timeout=10)
            assert got.status_code == 200 and len(got.content) > 100
        assert [a["filename"] for a in detail["artifacts"]] == ["pareto.png"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
