"""Budget-aware stopping is honest: the median interval, the look schedule, and on
recorded per-round values (tests/data/rounds.json, benchmarks/record_rounds.py on a
contended 2-core machine) a candidate whose true median lies within the margin of the
budget is never stopped early, while a clear one stops at the first look."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from search.evaluators.stats import median, median_interval
from search.evaluators.stopping import StoppingRule, default_max_rounds, look_schedule, simulate
from search.evaluators.types import LatencyBudget

RECORDED = json.loads((Path(__file__).parent / "data" / "rounds.json").read_text())["records"]
BUDGET = LatencyBudget(ratio=1.0)


def test_median_interval_order_statistics():
    xs = [float(v) for v in range(1, 101)]
    assert median_interval(xs, 0.05) == (40.0, 61.0)  # the textbook 95 % interval, n = 100
    assert median_interval(xs[:7], 0.05) == (1.0, 7.0)  # 1 - 2/128 = 98.4 % >= 95 %
    assert median_interval(xs[:5], 0.05) is None  # (min, max) of 5 covers only 93.75 %
    assert median_interval(xs[:9], 0.05 / 7) == (1.0, 9.0)
    assert median_interval(xs[:8], 0.05 / 7) is None


def test_look_schedule_and_maximum():
    assert look_schedule(9, 84) == [9, 14, 21, 32, 48, 72, 84]
    # the maximum is the fixed protocol's longest: 3 attempts x 7 rounds x 0.2 s
    assert default_max_rounds(BUDGET, 7, 0.2, 3) == 84
    rule = StoppingRule(BUDGET, 84)
    assert rule.alpha == pytest.approx(0.05 / 7)


def _scaled(values: list[float], at: float, noise: float = 1.0) -> list[float]:
    """The recording moved so that its median is ``at``, its spread times ``noise``."""
    med = median(values)
    return [at * (1 + noise * (v / med - 1)) for v in values]


@pytest.mark.parametrize("name", sorted(RECORDED))
@pytest.mark.parametrize("noise", [1.0, 0.1])
def test_within_the_margin_is_never_stopped_early(name, noise):
    """The recorded rounds in 200 random orders, their median moved inside the margin
    (and their spread as recorded, or a tenth of it: a quiet machine)."""
    values = RECORDED[name]["ratio"]
    m = BUDGET.margin
    rng = random.Random(0)
    for offset in (-2 * m / 3, -m / 2, 0.0, m / 2, 2 * m / 3):
        moved = _scaled(values, BUDGET.ratio * (1 + offset), noise)
        for _ in range(200):
            rng.shuffle(moved)
            stop = simulate(moved, BUDGET)
            assert stop.reason == "max_rounds" and stop.rounds == len(moved), (offset, stop)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_on_the_margin_early_stops_stay_under_the_error_rate(name):
    """A median exactly on budget x (1 -/+ margin): an early stop needs an interval that
    misses the median, which the Bonferroni split keeps below 1 - confidence."""
    values = RECORDED[name]["ratio"]
    rng = random.Random(1)
    for offset in (-BUDGET.margin, BUDGET.margin):
        moved = _scaled(values, BUDGET.ratio * (1 + offset), noise=0.1)
        early = 0
        for _ in range(400):
            rng.shuffle(moved)
            early += simulate(moved, BUDGET).reason != "max_rounds"
        assert early / 400 <= 1 - BUDGET.confidence


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_clear_candidates_stop_at_the_first_look(name):
    values = RECORDED[name]["ratio"]
    quiet_below = _scaled(values, 0.7, noise=0.1)
    stop = simulate(quiet_below, BUDGET)
    assert (stop.reason, stop.rounds) == ("below_budget", 9)
    lo, hi = stop.intervals["ratio"]
    assert lo <= median(quiet_below[:9]) <= hi < 1.0 * (1 - BUDGET.margin)
    assert simulate(_scaled(values, 1.4, noise=0.1), BUDGET).reason == "above_budget"
    # a median per round of the absolute time, against a budget in ms
    ms = RECORDED[name]["ms"]
    ms_budget = LatencyBudget(ms=2 * median(ms))
    assert simulate(_scaled(ms, median(ms), noise=0.1), ms_budget, name="ms").reason \
        == "below_budget"


def test_precision_is_judged_on_the_reported_interval():
    """Nine rounds whose extremes are wide but whose reported 95 % interval (x_(2), x_(8))
    is within the precision: the decision interval (x_(1), x_(9)) is clear of the budget,
    so the first look stops; one more wide pair inside the reported order statistics and
    it does not."""
    rounds = [0.70, 0.80, 0.81, 0.815, 0.82, 0.825, 0.83, 0.84, 0.90]
    stop = simulate(rounds, BUDGET, max_rounds=84)
    assert (stop.reason, stop.rounds) == ("below_budget", 9)
    assert stop.intervals["ratio"] == (0.70, 0.90)  # the decision interval it judged
    reported = median_interval(rounds, 1 - BUDGET.confidence)
    assert reported == (0.80, 0.84)
    assert (reported[1] - reported[0]) / 2 <= BUDGET.precision * median(rounds)
    assert BUDGET.precision * median(rounds) < (0.90 - 0.70) / 2  # the old rule went on
    wide = [0.70, 0.74, 0.81, 0.815, 0.82, 0.825, 0.83, 0.88, 0.90]
    assert simulate(wide, BUDGET, max_rounds=84).reason == "max_rounds"


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_too_wide_never_stops_early(name):
    """The contended recording as it is: its interval is wider than the precision, so
    even a candidate far below the budget is measured to the maximum."""
    moved = _scaled(RECORDED[name]["ratio"], 0.8)
    first = simulate(moved[:9], BUDGET, max_rounds=len(moved))  # the first look only
    lo, hi = first.intervals["ratio"]
    assert first.reason == "max_rounds"
    assert (hi - lo) / 2 > BUDGET.precision * median(moved[:9])  # clear, but too wide
    stop = simulate(moved, BUDGET)
    assert stop.rounds > 9 and stop.reason in ("max_rounds", "below_budget")


def test_search_tasks_carry_the_budget_outside_the_study_identity():
    from blocks import load_spec
    from search.study import Budgets, SearchConfig

    spec = load_spec("preset:mobilenet_v2@0.25")
    ratio = SearchConfig(space="default", budgets=Budgets(max_latency_ratio=1.0))
    task = ratio.eval_task(spec)
    assert task.budget == LatencyBudget(ratio=1.0) and task.measure == ratio.measure
    ms = SearchConfig(space="default", budgets=Budgets(max_latency_ms=20.0))
    assert ms.eval_task(spec).budget == LatencyBudget(ms=20.0)
    assert SearchConfig(space="default", budgets=Budgets(max_params=10**6)) \
        .eval_task(spec).budget is None
    # the budget is not a setting of the measurement: the same spec, the same key
    assert ratio.measure.key(spec.hash, "cpu") == ms.measure.key(spec.hash, "cpu")
    assert "budget" not in ratio.identity()["measure"]


def test_budget_aware_measurement_records_how_it_stopped():
    from blocks import load_spec
    from search.evaluators.latency import measure_latency
    from search.evaluators.types import MeasureSettings

    settings = MeasureSettings(resolution=32, min_run_time_s=0.02, rounds=3, threads=1,
                               reference="preset:mobilenet_v2@0.25")
    budget = LatencyBudget(ratio=100.0, round_s=0.01, max_rounds=14)
    r = measure_latency(load_spec("preset:mobilenet_v2@0.25"), settings, budget)
    stop = r.stopping
    assert stop is not None and stop.reason in ("below_budget", "max_rounds")
    assert stop.rounds in (9, 14) and r.ratio_to_reference.n == stop.rounds
    assert r.load["rounds"] == stop.rounds and stop.looks >= 1
    lo, hi = stop.intervals["ratio"]
    assert lo <= r.ratio_to_reference.median <= hi
    if stop.reason == "below_budget":
        # clear of the budget at the look it stopped (the first, or the next one when
        # the precision condition was not met yet)
        assert hi < 100.0 * (1 - budget.margin)
    # without a budget, the fixed protocol
    fixed = measure_latency(load_spec("preset:mobilenet_v2@0.25"), settings)
    assert fixed.stopping is None and fixed.ratio_to_reference.n % settings.rounds == 0
