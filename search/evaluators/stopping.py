"""Budget-aware stopping: measure until the decision against the latency budget is clear.

The rule (docs/measurement.md, "Measuring until the decision is clear"), in the spirit of
MLPerf LoadGen's early stopping: rounds are short; at a few *looks* (after
``min_rounds`` rounds, then each time the count has grown by half, and at
``max_rounds``) a distribution-free interval of the median of the per-round values is
computed (:func:`search.evaluators.stats.median_interval`). The measurement stops when,
for the budgets given,

- the *decision* interval lies entirely below ``budget x (1 - margin)`` (every budget:
  ``below_budget``) or entirely above ``budget x (1 + margin)`` (any budget:
  ``above_budget``), and
- the *reported* interval (the ``confidence`` interval of the median that the result
  carries, :func:`search.evaluators.latency.round_intervals`) is narrow enough:
  half-width <= ``precision`` x median.

The decision interval uses ``alpha = (1 - confidence) / looks``: a Bonferroni split over
all the looks a measurement may take, so the chance that *any* look's interval misses the
true median is at most ``1 - confidence``. The precision condition is about what the user
reads, so it is judged on the figure the user reads; it decides nothing about the budget.
A candidate whose true median lies within the margin of the budget can only be stopped
early by a decision interval that misses its median, so that happens with probability
below ``1 - confidence`` (in practice far below: the interval must also miss by the
margin).

Pure Python; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from search.evaluators.stats import median, median_interval
from search.evaluators.types import LatencyBudget, StopInfo

GROWTH = 1.5  # rounds grow by half between looks


def look_schedule(min_rounds: int, max_rounds: int) -> list[int]:
    """Round counts at which the rule looks: min_rounds, x1.5, ..., max_rounds."""
    max_rounds = max(max_rounds, min_rounds)
    looks: list[int] = []
    n = min_rounds
    while n < max_rounds:
        looks.append(n)
        n = max(n + 1, math.ceil(n * GROWTH))
    looks.append(max_rounds)
    return looks


def default_max_rounds(budget: LatencyBudget, fixed_rounds: int, fixed_round_s: float,
                       attempts: int) -> int:
    """As much timed time as the fixed protocol may take at most (all its attempts)."""
    if budget.max_rounds is not None:
        return max(budget.max_rounds, budget.min_rounds)
    return max(budget.min_rounds,
               math.ceil(attempts * fixed_rounds * fixed_round_s / budget.round_s))


class StoppingRule:
    """Feed it the per-round series after every round; it says when to stop."""

    def __init__(self, budget: LatencyBudget, max_rounds: int):
        self.budget = budget
        self.max_rounds = max(max_rounds, budget.min_rounds)
        self.looks = look_schedule(budget.min_rounds, self.max_rounds)
        self.alpha = (1.0 - budget.confidence) / len(self.looks)
        self.looked = 0
        self.intervals: dict[str, tuple[float, float]] = {}

    def limits(self) -> dict[str, float]:
        return {name: v for name, v in (("ms", self.budget.ms), ("ratio", self.budget.ratio))
                if v is not None}

    def verdict(self, series: Mapping[str, Sequence[float]]) -> str | None:
        """At a look: ``below_budget``, ``above_budget`` or None (not clear yet)."""
        b = self.budget
        verdicts: list[str | None] = []
        for name, limit in self.limits().items():
            values = series.get(name) or []
            interval = median_interval(values, self.alpha)
            reported = median_interval(values, 1.0 - b.confidence)
            if interval is None or reported is None:
                return None
            self.intervals[name] = interval
            lo, hi = interval
            if (reported[1] - reported[0]) / 2 > b.precision * abs(median(values)):
                verdicts.append(None)
            elif hi < limit * (1 - b.margin):
                verdicts.append("below_budget")
            elif lo > limit * (1 + b.margin):
                verdicts.append("above_budget")
            else:
                verdicts.append(None)
        if "above_budget" in verdicts:
            return "above_budget"
        if verdicts and all(v == "below_budget" for v in verdicts):
            return "below_budget"
        return None

    def update(self, series: Mapping[str, Sequence[float]]) -> str | None:
        """After a round: the reason to stop now, or None to go on."""
        n = max((len(v) for v in series.values()), default=0)
        if n not in self.looks:
            return None
        self.looked += 1
        reason = self.verdict(series)
        if reason is None and n >= self.max_rounds:
            return "max_rounds"
        return reason

    def info(self, reason: str, rounds: int) -> StopInfo:
        return StopInfo(reason=reason, rounds=rounds, looks=self.looked,
                        intervals=dict(self.intervals), confidence=self.budget.confidence)


def simulate(values: Sequence[float], budget: LatencyBudget, name: str = "ratio",
             max_rounds: int | None = None) -> StopInfo:
    """Run the rule over recorded per-round values (``name``: which budget they are
    for); the measurement would have stopped where this stops."""
    rule = StoppingRule(budget, max_rounds or len(values))
    for i in range(1, len(values) + 1):
        reason = rule.update({name: values[:i]})
        if reason is not None:
            return rule.info(reason, i)
    return rule.info("max_rounds", len(values))
