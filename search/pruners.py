"""Hyperband over the quality view of a multi-objective study.

Optuna's ``HyperbandPruner`` runs successive halving in brackets of different
aggressiveness, each bracket seeing only its own trials. It builds those brackets as
``Study`` subclasses of the study it is given, which read the raw trials and the study's
single direction: neither exists here (the study is multi-objective; the pruners see
:class:`search.study._QualityView`, quality maximized, rungs as intermediate values). So
the brackets are filtered views of that quality view, and each runs Optuna's own
``SuccessiveHalvingPruner`` with the bracket's early-stopping rate, as Hyperband does.

A trial's bracket is a pure function of the study's name and the trial's number (a CRC32
hash, weighted by each bracket's budget as in Optuna): stable across processes, so any
replica of the service answers a trial's rung the same way.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Container
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState


class _BracketView:
    """One bracket's trials of a quality view (what successive halving reads)."""

    direction = optuna.study.StudyDirection.MAXIMIZE

    def __init__(self, view: Any, pruner: QualityHyperband, bracket: int):
        self._view = view
        self._pruner = pruner
        self._bracket = bracket
        self._storage = view._storage
        self._study_id = view._study_id

    def get_trials(self, deepcopy: bool = True,
                   states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return [t for t in self._view.get_trials(deepcopy=deepcopy, states=states)
                if self._pruner.bracket_of(t.number) == self._bracket]


class QualityHyperband(optuna.pruners.BasePruner):
    """Hyperband (Li et al., 2018) for :class:`search.study._QualityView`: brackets of
    successive halving from ``min_resource`` to ``max_resource`` steps, the bracket of
    index i stopping early at rate i."""

    def __init__(self, min_resource: int, max_resource: int, reduction_factor: int = 3,
                 study_name: str = ""):
        if not 1 <= min_resource <= max_resource:
            raise ValueError("hyperband needs 1 <= min_resource <= max_resource")
        if reduction_factor < 2:
            raise ValueError("hyperband needs a reduction factor of at least 2")
        self.min_resource = min_resource
        self.max_resource = max_resource
        self.reduction_factor = reduction_factor
        self.study_name = study_name
        n = math.floor(math.log(max_resource / min_resource, reduction_factor) + 1e-9) + 1
        self.n_brackets = max(1, n)
        self._pruners = [
            optuna.pruners.SuccessiveHalvingPruner(
                min_resource=min_resource, reduction_factor=reduction_factor,
                min_early_stopping_rate=i)
            for i in range(self.n_brackets)
        ]
        # as Optuna: a bracket's share of the trials grows with how many it starts
        self._budgets = [
            math.ceil(self.n_brackets * reduction_factor ** (self.n_brackets - 1 - i)
                      / (self.n_brackets - i))
            for i in range(self.n_brackets)
        ]

    def bracket_of(self, trial_number: int) -> int:
        """The bracket of a trial: stable, a function of the study name and number."""
        h = zlib.crc32(f"{self.study_name}_{trial_number}".encode()) % sum(self._budgets)
        for i, budget in enumerate(self._budgets):
            if h < budget:
                return i
            h -= budget
        return self.n_brackets - 1  # pragma: no cover - the budgets sum to the modulus

    def prune(self, study: Any, trial: FrozenTrial) -> bool:
        bracket = self.bracket_of(trial.number)
        return self._pruners[bracket].prune(_BracketView(study, self, bracket), trial)


__all__ = ["QualityHyperband"]
