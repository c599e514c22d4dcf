"""Multi-fidelity evaluation with pruning: the driver records each rung as an intermediate
value and asks the configured Optuna pruner; a pruned candidate is told PRUNED with its
last value; the isolated runner carries the rungs from the child to the caller."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState

from search.evaluators.runner import evaluate
from search.evaluators.types import (
    EvalOutcome,
    EvalTask,
    LatencyResult,
    LatencyStats,
    MeasureSettings,
    QualityResult,
    QualitySettings,
)
from search.local import _trial_line, run_search
from search.space import DesignSpace
from search.study import SearchConfig, SearchDriver, named_constraints
from tests.test_quality import TINY
from tests.test_study import TINY_SPACE

optuna.logging.set_verbosity(optuna.logging.WARNING)

TRAIN = QualitySettings(signal="train", data="shapes32", steps=120, rungs=[30, 60])


def config(**kw) -> SearchConfig:
    base = dict(space=DesignSpace.from_dict(TINY_SPACE), trials=6, seed=3,
                measure=MeasureSettings(reference="preset:mobilenet_v2@0.5"), quality=TRAIN)
    base.update(kw)
    return SearchConfig(**base)


def stats(median: float) -> LatencyStats:
    return LatencyStats(median=median, p90=median, iqr=0.0, cv=0.01, n=3, mean=median,
                        min=median, max=median)


def outcome(settings: MeasureSettings, rungs: list[list[float]], pruned: bool,
            latency_ms: float = 2.0) -> EvalOutcome:
    lat = LatencyResult(latency_ms=stats(latency_ms), ratio_to_reference=stats(0.5),
                        reference=settings.reference, reference_latency_ms=stats(4.0),
                        runtime="eager", settings=settings, device={"cpu": "test"},
                        params=1, macs=1)
    details = {"rungs": rungs, "steps": int(rungs[-1][0]), "planned_steps": 120,
               "pruned": pruned}
    return EvalOutcome(ok=True, latency=lat, seconds=1.0, quality=QualityResult(
        signal="train", value=rungs[-1][1], seconds=0.5, details=details, pruned=pruned))


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/search.db"


def test_successive_halving_prunes_below_the_best_half_and_records_it(url):
    cfg = config()
    driver = SearchDriver.open(url, "s", cfg)
    a = driver.ask()
    assert driver.report_rung(a.trial_number, 30, 0.5)  # alone at its rung: goes on
    assert driver.report_rung(a.trial_number, 60, 0.6)
    driver.tell(a.trial_number, outcome(cfg.measure, [[30, 0.5], [60, 0.6], [120, 0.7]],
                                        pruned=False))
    b = driver.ask()
    assert not driver.report_rung(b.trial_number, 30, 0.3)  # below the best half of 2
    driver.tell(b.trial_number, outcome(cfg.measure, [[30, 0.3]], pruned=True))
    c = driver.ask()
    assert driver.report_rung(c.trial_number, 30, 0.8)  # the best so far at 30 steps

    ta, tb = driver._frozen(a.trial_number), driver._frozen(b.trial_number)
    assert ta.state == TrialState.COMPLETE and ta.values[0] == 0.7
    assert ta.user_attrs["rungs"] == [[30, 0.5], [60, 0.6], [120, 0.7]]
    assert tb.state == TrialState.PRUNED and tb.user_attrs["rungs"] == [[30, 0.3]]
    # intermediate values too (dashboards plot them); the pruned trial carries the
    # 'pruned' constraint, so TPE ranks it as infeasible and never reads them
    assert ta.intermediate_values == {30: 0.5, 60: 0.6, 120: 0.7}
    assert tb.intermediate_values == {30: 0.3}
    assert named_constraints(tb)["pruned"] == 1.0
    assert tb.user_attrs["status"] == "pruned" and tb.user_attrs["quality"] == 0.3
    assert tb.user_attrs["pruned_at_step"] == 30 and tb.user_attrs["latency_ms"] == 2.0
    assert [t.number for t in driver.pareto()] == [a.trial_number]  # pruned: not a point
    assert "(pruned)" in _trial_line(driver, b.trial_number)
    assert "at step 30 of 120" in _trial_line(driver, b.trial_number)


def test_median_pruner_and_no_pruner(url):
    cfg = config(pruner="median")
    driver = SearchDriver.open(url, "m", cfg)
    for value in (0.5, 0.6, 0.7, 0.4, 0.55):  # five complete trials: the startup
        p = driver.ask()
        assert driver.report_rung(p.trial_number, 30, value)
        driver.tell(p.trial_number, outcome(cfg.measure, [[30, value], [120, value]], False))
    low, high = driver.ask(), driver.ask()
    assert not driver.report_rung(low.trial_number, 30, 0.45)  # below the median 0.55
    assert driver.report_rung(high.trial_number, 30, 0.65)
    none = SearchDriver.open(url, "n", config(pruner="none"))
    p = none.ask()
    assert none.report_rung(p.trial_number, 30, 0.0) and none.make_pruner() is None
    # a single-fidelity signal has nothing to prune
    assert SearchDriver.open(url, "p", config(quality=QualitySettings(
        signal="params"))).make_pruner() is None


def test_local_search_prunes_and_counts_pruned_trials(tmp_path):
    """run_search measures the latency first, then trains with the driver's pruner on an
    evaluator that takes on_progress."""
    cfg = config(trials=6, measure=MeasureSettings(reference="preset:mobilenet_v2@0.5"))
    calls = {"n": 0, "latency": 0}

    def fake(task: EvalTask, on_progress=None) -> EvalOutcome:
        if task.quality is None:  # the latency part: no training in it
            calls["latency"] += 1
            lat = outcome(task.measure, [[120, 0.0]], pruned=False)
            return lat.model_copy(update={"quality": None})
        assert task.measure is None and on_progress is not None  # the training part
        calls["n"] += 1
        final = 0.9 - 0.1 * calls["n"]  # every candidate worse than the one before
        rungs = []
        for step in task.quality.rung_steps():
            value = final * step / 120
            rungs.append([step, value])
            if step < 120 and not on_progress(step, value):
                return outcome(cfg.measure, rungs, pruned=True)
        return outcome(cfg.measure, rungs, pruned=False)

    url = f"sqlite:///{tmp_path}/fitnas.db"
    res = run_search(cfg, url, "local", tmp_path / "out", progress=False, presets=[],
                     evaluate=fake, export=False)
    counts = json.loads(res.result_json.read_text())["counts"]
    assert counts["trials"] == 6 and counts["pruned"] >= 4, counts
    assert counts["measured"] + counts["pruned"] + counts["cached"] == 6
    assert calls["latency"] == calls["n"] == 6  # every candidate was within the budget


def test_over_budget_candidates_are_never_trained(tmp_path):
    """Latency first: a candidate over the latency budget is told PRUNED with its
    latency and quality_skipped, and its training never runs."""
    from search.study import Budgets

    cfg = config(trials=4, budgets=Budgets(max_latency_ms=3.0))
    trained: list[int] = []
    seen = {"n": 0}

    def fake(task: EvalTask, on_progress=None) -> EvalOutcome:
        if task.quality is None:
            seen["n"] += 1
            ms = 2.0 if seen["n"] % 2 else 5.0  # every other candidate over 3 ms
            lat = outcome(task.measure, [[120, 0.0]], pruned=False, latency_ms=ms)
            return lat.model_copy(update={"quality": None})
        trained.append(seen["n"])
        return outcome(MeasureSettings(reference="preset:mobilenet_v2@0.5"),
                       [[60, 0.4], [120, 0.5]], pruned=False)

    url = f"sqlite:///{tmp_path}/fitnas.db"
    run_search(cfg, url, "local", tmp_path / "out", progress=False, presets=[],
               evaluate=fake, export=False)
    assert trained == [1, 3]
    study = optuna.load_study(study_name="local", storage=url)
    skipped = [t for t in study.trials if t.user_attrs.get("quality_skipped")]
    assert len(skipped) == 2
    assert all(t.state == optuna.trial.TrialState.PRUNED and t.user_attrs["latency_ms"] == 5.0
               and not t.user_attrs.get("rungs") for t in skipped)


def test_isolated_runner_carries_rungs_and_stops_when_told():
    task = EvalTask(spec=TINY.canonical_dict(), measure=None, quality=QualitySettings(
        signal="train", data="digits", steps=8, rungs=[2, 4], batch=16))
    seen: list[tuple[int, float]] = []
    out = evaluate(task, on_progress=lambda s, v: seen.append((s, v)) or s < 4)
    assert out.ok, out.failure
    assert out.quality.pruned and [s for s, _ in seen] == [2, 4]
    assert out.quality.details["rungs"] == [list(r) for r in seen]
    assert out.quality.value == seen[-1][1] and out.quality.details["steps"] == 4


def test_tpe_goes_on_past_its_startup_with_pruned_trials_that_have_intermediate_values(url):
    """Optuna's TPE asks for the study's single direction when it ranks a PRUNED trial
    with intermediate values; in this multi-objective study the 'pruned' constraint sends
    such trials to the infeasible group instead."""
    cfg = config(trials=30, seed=1)
    driver = SearchDriver.open(url, "tpe", cfg)
    for i in range(16):  # TPE's start-up is at most 10 trials
        p = driver.ask()
        if p.task is None:
            continue
        value = 0.3 + 0.02 * (i % 7)
        go_on = driver.report_rung(p.trial_number, 30, value)
        rungs = [[30, value]] if not go_on else [[30, value], [120, value + 0.1]]
        driver.tell(p.trial_number, outcome(cfg.measure, rungs, pruned=not go_on))
    pruned = [t for t in driver.trials(TrialState.PRUNED)
              if t.user_attrs.get("status") == "pruned"]
    assert pruned and all(t.intermediate_values for t in pruned)
    assert driver.ask().spec is not None  # past the start-up: TPE ranks them all


def test_hyperband_brackets_are_stable_and_it_prunes(url):
    """Hyperband over the quality view: each trial's bracket is a function of the study
    name and its number (the same in another process), brackets of different
    aggressiveness are used, and a candidate far below its bracket's best is stopped."""
    from search.pruners import QualityHyperband

    cfg = config(trials=40, pruner="hyperband", pruner_reduction_factor=2,
                 quality=TRAIN.model_copy(update={"steps": 120, "rungs": [15, 30, 60]}))
    driver = SearchDriver.open(url, "hb", cfg)
    pruner = driver.make_pruner()
    assert isinstance(pruner, QualityHyperband) and pruner.n_brackets == 4
    again = QualityHyperband(15, 120, 2, study_name="hb")
    assert [pruner.bracket_of(n) for n in range(40)] == [again.bracket_of(n)
                                                          for n in range(40)]
    assert len({pruner.bracket_of(n) for n in range(40)}) >= 3
    stopped = []
    for i in range(24):
        p = driver.ask()
        value = 0.8 - 0.02 * i  # every candidate worse than the ones before
        rungs = []
        for step in (15, 30, 60):
            rungs.append([step, value * step / 120])
            if not driver.report_rung(p.trial_number, step, value * step / 120):
                stopped.append(p.trial_number)
                break
        else:
            rungs.append([120, value])
        driver.tell(p.trial_number, outcome(cfg.measure, rungs, pruned=rungs[-1][0] < 120))
    assert len(stopped) >= 8
    # the bracket that never stops early (the last) let its candidates run to the end
    lazy = [n for n in range(24) if pruner.bracket_of(n) == pruner.n_brackets - 1]
    assert not set(lazy) & set(stopped)
