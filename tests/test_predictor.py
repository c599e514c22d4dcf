"""The per-target latency predictor: features, fit, calibrated intervals, stored state,
the screening policy, the driver's pre-screen and ``fitnas predictor show``."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from blocks.cost import estimate_cost
from blocks.presets import preset
from search.evaluators.types import (
    EvalOutcome,
    LatencyResult,
    LatencyStats,
    MeasureSettings,
    QualityResult,
    QualitySettings,
)
from search.predictor import (
    FEATURE_NAMES,
    PredictorPolicy,
    PredictorState,
    PredictorStore,
    feature_vector,
    fit_state,
    over_budget,
    spec_features,
    target_key,
)
from search.space import DesignSpace
from search.study import Budgets, SearchConfig, SearchDriver, SQLMeasurementCache

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)

# a latency that is additive in the features, as a device's roughly is
TRUE = {"const": 0.05, "dw.k3.macs": 0.004, "dw.k5.macs": 0.003, "mbconv.macs": 0.002,
        "mbconv.n": 0.01, "ds.macs": 0.003, "ds.n": 0.008, "stem.macs": 0.002, "head.macs": 0.001,
        "classifier.macs": 0.001, "mbconv.bytes": 0.01, "ds.bytes": 0.01}

SPACE = {
    "name": "pred", "num_classes": 10, "resolution": [32, 48, 64],
    "width_mult": [0.5, 1.0, 2.0], "stem": {"width": [8, 16]},
    "stages": [
        {"kinds": ["mbconv", "ds"], "stride": 2, "width": [16, 32, 64], "depth": [1, 3],
         "kernel": [3, 5]},
        {"kinds": ["mbconv", "ds"], "stride": 2, "width": [32, 64, 128], "depth": [1, 3]},
    ],
}


def true_ratio(spec, noise: float = 0.0, rng: random.Random | None = None) -> float:
    f = spec_features(spec)
    v = sum(TRUE.get(k, 0.0) * x for k, x in f.items())
    return v * (math.exp(rng.gauss(0, noise)) if rng else 1.0)


def sample_specs(n: int, seed: int = 0):
    space = DesignSpace.from_dict(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        t = study.ask()
        out.append(space.sample(t))
        study.tell(t, state=TrialState.PRUNED)
    return out


def test_features_are_the_cost_models_figures_split_by_operation():
    spec = preset("mobilenet_v2", 0.5)
    f = spec_features(spec)
    assert list(f) == list(FEATURE_NAMES)
    cost = estimate_cost(spec)
    # every MAC is counted once: dense per kind, grouped, depthwise per kernel size
    parts = [k for k in f if k.endswith(".macs") and k != "dilated.macs"]
    assert sum(f[k] for k in parts) * 1e6 == pytest.approx(cost.macs)
    assert f["mbconv.n"] == 17 and f["stem.n"] == 1 and f["head.n"] == 1
    assert f["dw.k3.macs"] > 0 and f["dw.k5.macs"] == 0 and f["grouped.macs"] == 0
    # a lower resolution costs less of everything that depends on the image size
    small = spec_features(spec, resolution=160)
    assert small["dw.k3.macs"] < f["dw.k3.macs"] and small["mbconv.n"] == 17


def test_fit_recovers_an_additive_latency_and_its_interval_covers():
    rng = random.Random(1)
    specs = sample_specs(260)
    rows = [{"features": spec_features(s), "ratio": true_ratio(s, 0.03, rng),
             "ms": 10 * true_ratio(s)} for s in specs]
    st = fit_state("k", "cpu", rows[:200])
    assert st.n == 200 and st.ratio is not None and st.ms is not None
    held = rows[200:]
    preds = [st.ratio.predict(feature_vector(r["features"])) for r in held]
    rel = [abs(p.value / r["ratio"] - 1) for p, r in zip(preds, held, strict=True)]
    assert sum(x <= 0.10 for x in rel) / len(rel) >= 0.95
    cover = sum(p.lo <= r["ratio"] <= p.hi for p, r in zip(preds, held, strict=True))
    assert 0.8 <= cover / len(held) <= 1.0  # 90% intervals
    # noise-free milliseconds are fitted almost exactly
    ms = [st.ms.predict(feature_vector(r["features"])).value / r["ms"] for r in held]
    assert max(abs(x - 1) for x in ms) < 0.02
    # out-of-fold error is reported and close to what held-out data shows
    assert st.ratio.median_abs_error == pytest.approx(sorted(rel)[len(rel) // 2], abs=0.02)


def test_state_round_trips_and_the_policy_gates_screening(tmp_path):
    store = PredictorStore(f"sqlite:///{tmp_path}/p.db")
    specs = sample_specs(60)
    for s in specs:
        store.add("k", "cpu", s.hash, spec_features(s), true_ratio(s), 10 * true_ratio(s))
    store.add("k", "cpu", specs[0].hash, spec_features(specs[0]), 99.0, 99.0)  # first stays
    assert store.count("k") == 60
    policy = PredictorPolicy(min_observations=50, max_error=0.08)
    st = store.refit("k", "cpu", policy)
    assert st.n == 60 and store.load("k").to_json() == st.to_json()
    assert [s.target_key for s in store.states("cpu")] == ["k"] and store.states("gpu") == []
    assert policy.enabled(st) == (True, "on")
    assert not policy.needs_refit(st, 61) and policy.needs_refit(st, 66)
    few = PredictorState.from_json(st.to_json())
    few.n = 20
    assert policy.enabled(few)[0] is False and "20 < 50" in policy.enabled(few)[1]
    bad = PredictorState.from_json(st.to_json())
    bad.recent = [0.3] * 10
    assert policy.enabled(bad) == (False, "recent error 0.300 > 0.08")
    preds = st.predict(spec_features(specs[1]))
    hi = preds["latency_ratio"].lo * 1.01
    assert over_budget(preds, {"latency_ratio": hi * 0.5}) == ["latency_ratio"]
    assert over_budget(preds, {"latency_ratio": hi}) == []  # the interval reaches it


def _stats(x: float) -> LatencyStats:
    return LatencyStats(median=x, p90=x, iqr=0.0, cv=0.01, n=5, mean=x, min=x, max=x)


def _measure(p, config) -> EvalOutcome:
    ratio = true_ratio(p.spec)
    lat = LatencyResult(latency_ms=_stats(10 * ratio), ratio_to_reference=_stats(ratio),
                        reference=config.measure.reference,
                        reference_latency_ms=_stats(10.0), runtime="eager",
                        settings=config.measure, device={"cpu": "test"},
                        params=p.cost.params, macs=p.cost.macs)
    return EvalOutcome(ok=True, latency=lat, seconds=0.1,
                       quality=QualityResult(signal="synflow", value=float(p.cost.params),
                                             seconds=0.0))


def test_driver_screens_confident_candidates_and_never_selects_them(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    space = DesignSpace.from_dict(SPACE)
    specs = sample_specs(200, seed=3)
    ratios = sorted(true_ratio(s) for s in specs)
    budget = ratios[len(ratios) // 3]  # two thirds of the space is over it
    config = SearchConfig(space=space, trials=80, seed=0, sampler="random",
                          budgets=Budgets(max_latency_ratio=budget),
                          measure=MeasureSettings(reference="preset:mobilenet_v2@0.5"),
                          quality=QualitySettings(signal="synflow"))
    store = PredictorStore(url)
    cache = SQLMeasurementCache(url)
    policy = PredictorPolicy(min_observations=20, audit_share=0.25)
    driver = SearchDriver.open(url, "s", config, cache, predictor=store, policy=policy)
    told = {"measured": 0, "predicted_over_budget": 0}
    for _ in range(80):
        p = driver.ask()
        if p.task is not None:
            driver.tell(p.trial_number, _measure(p, config))
            told["measured"] += 1
        elif p.reason == "predicted_over_budget":
            told["predicted_over_budget"] += 1
    assert told["predicted_over_budget"] >= 10
    trials = driver.trials()
    # nothing was screened before the predictor had learned from 20 measurements
    first = min(t.number for t in trials
                if t.user_attrs.get("status") == "predicted_over_budget")
    measured_before = sum(1 for t in trials if t.number < first
                          and t.user_attrs.get("status") == "measured")
    assert measured_before >= 20
    for t in trials:
        ua = t.user_attrs
        if ua.get("status") != "predicted_over_budget":
            continue
        assert t.state == TrialState.PRUNED
        assert ua["predicted_latency_ratio_lo"] > budget  # confidently over
        assert ua["predicted_latency_ratio_lo"] <= ua["predicted_latency_ratio"] \
            <= ua["predicted_latency_ratio_hi"]
        assert true_ratio(driver.spec_of(t)) > budget  # and it was right to skip it
        assert cache.get(ua["cache_key"]) is None  # a prediction is never cached
    # audits: some would-be-screened candidates were measured, and their error recorded
    audits = [t for t in trials if t.user_attrs.get("predictor_audit")]
    assert audits and all(t.user_attrs["status"] == "measured" for t in audits)
    assert all("predictor_error" in t.user_attrs for t in audits)
    # every Pareto member was measured and meets the budget, on the ratio
    front = driver.pareto()
    assert front
    for t in front:
        assert t.user_attrs["status"] == "measured"
        assert t.user_attrs["latency_ratio"] <= budget
        assert t.values[1] == t.user_attrs["latency_ratio"]
    key = target_key("cpu", config.measure)
    assert store.count(key) == told["measured"] and store.load(key).recent


def test_cli_predictor_show(tmp_path):
    url = f"sqlite:///{tmp_path}/p.db"
    store = PredictorStore(url)
    measure = MeasureSettings(threads=1)
    key = target_key("lab-cpu", measure)
    for s in sample_specs(30):
        store.add(key, "lab-cpu", s.hash, spec_features(s), true_ratio(s), 10 * true_ratio(s))
    store.refit(key, "lab-cpu", PredictorPolicy(), settings={"runtime": "eager", "threads": 1})
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "service.cli", "predictor", "show",
                               *args], env=env, capture_output=True, text=True, timeout=120)

    r = cli("--target", "lab-cpu", "--storage", url)
    assert r.returncode == 0, r.stderr
    assert "learned from      30 measurements" in r.stdout
    assert "within ±10%" in r.stdout and "last refit" in r.stdout
    assert "screening         off (learned from 30 < 50 measurements)" in r.stdout
    r = cli("--target", "lab-cpu", "--storage", url, "--json")
    data = json.loads(r.stdout)
    assert data[0]["n"] == 30 and data[0]["settings"]["threads"] == 1
    r = cli("--target", "gpu", "--storage", url)
    assert r.returncode == 2 and r.stderr.startswith("error: no latency predictor for target")
    assert "Traceback" not in r.stderr
    r = cli("--target", "cpu", "--storage", f"sqlite:///{tmp_path}/none.db")
    assert r.returncode == 2 and r.stderr.startswith("error: no database at")
