"""Can the space meet the cost budgets at all? Checked before the first trial, so that an
impossible budget (``--max-params 10``) is one clear line instead of a search that
pre-screens every trial and ends with "run more trials".

The exact minimum of params, MACs or activation memory over a space is a combinatorial
problem (kinds, widths and depths interact through the channels), so the check looks at
the networks most likely to be smallest: the smallest number at every numeric choice,
with the block kinds chosen by coordinate descent on the figure; and a seeded random
sample. It says "cannot" only for a budget that, alone, none of them meets, and the
message says what it looked at and the smallest figure it found.
"""

from __future__ import annotations

import random
from typing import Any

from blocks.cost import estimate_cost
from search.space import DesignSpace

RANDOM_PROBES = 256
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class _Smallest:
    """A trial that answers every numeric choice with its smallest value and every
    other choice (a block kind) with its ``index``-th option, or the option that
    ``overrides`` names for that parameter. Records the non-numeric choices it saw."""

    def __init__(self, index: int, overrides: dict[str, int] | None = None):
        self.index = index
        self.overrides = overrides or {}
        self.kinds: dict[str, int] = {}

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        choices = list(choices)
        if all(isinstance(c, int | float) and not isinstance(c, bool) for c in choices):
            return min(choices)
        self.kinds[name] = len(choices)
        return choices[self.overrides.get(name, self.index) % len(choices)]

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return low


class _Random:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self.rng.choice(list(choices))

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return self.rng.randint(low, high)


def _figures(space: DesignSpace, trial: Any, resolution: int | None, batch: int,
             dtype: str) -> dict[str, int] | None:
    try:
        spec = space.sample(trial)
    except Exception:
        return None  # an option combination the space's repairs refuse
    cost = estimate_cost(spec, resolution=resolution, batch=batch,
                         dtype_bytes=DTYPE_BYTES[dtype])
    return {"params": cost.params, "macs": cost.macs // max(1, cost.batch),
            "activation_bytes": cost.activation_bytes}


def _smallest(space: DesignSpace, key: str, resolution: int | None, batch: int,
              dtype: str) -> tuple[float, int]:
    """The smallest ``key`` figure among the smallest-choice networks: each kind option
    everywhere, then one stage's kind at a time changed while it makes the figure
    smaller (coordinate descent over the kinds). Returns (figure, networks probed)."""
    n_kinds = max([len(st.kind_names()) for st in space.stages] + [1])
    best, best_trial, probed = float("inf"), None, 0
    for index in range(n_kinds):
        trial = _Smallest(index)
        fig = _figures(space, trial, resolution, batch, dtype)
        probed += 1
        if fig is not None and fig[key] < best:
            best, best_trial = fig[key], trial
    if best_trial is None:
        return best, probed
    choice = {name: best_trial.index for name in best_trial.kinds}
    improved = True
    while improved:
        improved = False
        for name, n in list(best_trial.kinds.items()):
            for option in range(n):
                if option == choice.get(name):
                    continue
                trial = _Smallest(best_trial.index, {**choice, name: option})
                fig = _figures(space, trial, resolution, batch, dtype)
                probed += 1
                if fig is not None and fig[key] < best:
                    best, choice, improved = fig[key], {**choice, name: option}, True
    return best, probed


CLI_NAMES = {"params": "--max-params", "macs": "--max-macs",
             "activation_bytes": "--max-memory-mb"}
API_NAMES = {"params": "budgets.max_params", "macs": "budgets.max_macs",
             "activation_bytes": "budgets.max_activation_bytes"}


def unreachable_budgets(space: DesignSpace, limits: dict[str, float], *,
                        resolution: int | None = None, batch: int = 1,
                        dtype: str = "float32", seed: int = 0,
                        names: dict[str, str] = CLI_NAMES) -> str | None:
    """``None`` when some probed network meets every cost budget in ``limits`` (keys
    ``params``, ``macs``, ``activation_bytes``); otherwise one line saying which budget
    no probed network meets and the smallest figure found for it."""
    if not limits:
        return None
    # any random network that meets every budget together ends the check at once
    rng = random.Random(seed)
    for _ in range(RANDOM_PROBES):
        fig = _figures(space, _Random(rng), resolution, batch, dtype)
        if fig is not None and all(fig[k] <= v for k, v in limits.items()):
            return None
    parts, probed = [], RANDOM_PROBES
    for key, limit in limits.items():
        best, n = _smallest(space, key, resolution, batch, dtype)
        probed += n
        if best > limit:
            parts.append(f"{names[key]} {_fmt(key, limit)} (the smallest has "
                         f"{_fmt(key, best)})")
    if not parts:
        return None  # each budget alone is reachable; together they may be: let it run
    return (f"no network of the space meets {' and '.join(parts)}: checked the "
            f"smallest-choice networks and {probed} in all; loosen the budget or use a "
            "smaller space")


def _fmt(key: str, value: float) -> str:
    if key == "activation_bytes":
        return f"{value / 2**20:.3g} MiB"
    return f"{int(value):,}"
