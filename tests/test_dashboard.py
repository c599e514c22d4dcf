"""``fitnas dashboard`` serves optuna-dashboard on a search storage: started as a real
process on a free port, read back over the dashboard's HTTP API."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import optuna
import pytest
from service_harness import exe, free_port

from search.evaluators.types import (
    EvalOutcome,
    LatencyResult,
    LatencyStats,
    MeasureSettings,
    QualityResult,
    QualitySettings,
)
from search.space import DesignSpace
from search.study import Budgets, SearchConfig, SearchDriver, SQLMeasurementCache

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _stats(x: float) -> LatencyStats:
    return LatencyStats(median=x, p90=x, iqr=0.0, cv=0.01, n=5, mean=x, min=x, max=x)


@pytest.fixture
def storage(tmp_path):
    """A study written by the search driver: one measured, one over a params budget."""
    url = f"sqlite:///{tmp_path}/fitnas.db"
    space = DesignSpace.from_dict({
        "name": "dash", "num_classes": 10, "resolution": [32], "stem": {"width": [8]},
        "stages": [{"kinds": ["mbconv", "ds"], "stride": 2, "width": [16, 512],
                    "depth": [1, 2]}]})
    config = SearchConfig(space=space, trials=4, seed=0,
                          budgets=Budgets(max_latency_ms=5.0, max_params=30_000),
                          measure=MeasureSettings(reference=None),
                          quality=QualitySettings(signal="synflow"))
    driver = SearchDriver.open(url, "dash-study", config, SQLMeasurementCache(url))
    measured = over = 0
    while not (measured and over):
        p = driver.ask()
        if p.told:
            over += p.reason == "over_budget"
            continue
        lat = LatencyResult(latency_ms=_stats(1.25), runtime="eager", settings=config.measure,
                            device={"cpu": "test"}, params=p.cost.params, macs=p.cost.macs)
        driver.tell(p.trial_number, EvalOutcome(
            ok=True, latency=lat, quality=QualityResult(signal="synflow", value=7.5,
                                                        seconds=0.1)))
        measured += 1
    return url


def test_dashboard_serves_the_study_metric_names_and_user_attrs(storage, tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        exe(["fitnas", "dashboard", "--storage", storage, "--host", "127.0.0.1",
             "--port", str(port)]),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        studies = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            try:
                r = httpx.get(f"{base}/api/studies", timeout=5)
                if r.status_code == 200:
                    studies = r.json()["study_summaries"]
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert studies is not None, "optuna-dashboard did not answer in time"
        assert [s["study_name"] for s in studies] == ["dash-study"]
        summary = studies[0]
        assert summary["directions"] == ["maximize", "minimize"]
        study_attrs = {a["key"]: a["value"] for a in summary["user_attrs"]}
        assert study_attrs["fitnas.budget.max_latency_ms"] == "5.0"

        detail = httpx.get(f"{base}/api/studies/{summary['study_id']}", timeout=10).json()
        assert detail["objective_names"] == ["quality (synflow)", "latency_ms"]
        states = {t["state"] for t in detail["trials"]}
        assert {"Complete", "Pruned"} <= states
        complete = next(t for t in detail["trials"] if t["state"] == "Complete")
        assert [float(v) for v in complete["values"]] == [7.5, 1.25]
        attrs = {a["key"]: a["value"] for a in complete["user_attrs"]}
        assert float(attrs["latency_ms"]) == 1.25
        assert float(attrs["constraint_latency_ms"]) == pytest.approx(1.25 / 5 - 1)
        assert int(attrs["params"]) > 0 and attrs["status"] == "measured"
        # the dashboard lists numeric user attributes as sortable columns
        sortable = {a["key"]: a["sortable"] for a in detail["union_user_attrs"]}
        for key in ("params", "macs", "activation_bytes", "latency_ms", "quality",
                    "constraint_params", "constraint_latency_ms", "feasible"):
            assert sortable.get(key) is True, key
        pruned = next(t for t in detail["trials"] if t["state"] == "Pruned")
        pattrs = {a["key"]: a["value"] for a in pruned["user_attrs"]}
        assert pattrs["status"] == "over_budget" and float(pattrs["constraint_params"]) > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
