"""The statistics behind every latency figure, checked against numpy / scipy."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats as sps

from search.evaluators import stats


@pytest.mark.parametrize("q", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_quantile_matches_numpy_linear(q):
    rng = random.Random(3)
    for n in (1, 2, 3, 7, 50):
        xs = [rng.lognormvariate(0, 0.5) for _ in range(n)]
        assert stats.quantile(xs, q) == pytest.approx(float(np.percentile(xs, q * 100)))


def test_summarize_known_sample():
    s = stats.summarize([10.0, 11.0, 12.0, 13.0, 100.0])
    assert s.n == 5
    assert s.median == 12.0
    assert s.min == 10.0 and s.max == 100.0
    assert s.mean == pytest.approx(29.2)
    assert s.iqr == pytest.approx(13.0 - 11.0)
    assert s.p90 == pytest.approx(13.0 + 0.6 * 87.0)
    assert s.cv == pytest.approx(float(np.std([10, 11, 12, 13, 100], ddof=1) / 29.2))


def test_cv_and_robust_cv():
    rng = random.Random(0)
    xs = [rng.gauss(100.0, 5.0) for _ in range(4000)]
    assert stats.cv(xs) == pytest.approx(0.05, rel=0.08)
    assert stats.robust_cv(xs) == pytest.approx(0.05, rel=0.08)
    # a few preemption spikes blow up the CV but barely move the robust CV
    spiked = xs + [1000.0] * 20
    assert stats.cv(spiked) > 0.5
    assert stats.robust_cv(spiked) == pytest.approx(0.05, rel=0.1)
    assert stats.cv([4.0]) == 0.0
    assert stats.cv([3.0, 3.0, 3.0]) == 0.0


def test_summarize_refuses_empty_and_nonfinite():
    with pytest.raises(ValueError):
        stats.summarize([])
    with pytest.raises(ValueError):
        stats.summarize([1.0, math.nan])
    with pytest.raises(ValueError):
        stats.quantile([1.0], 1.5)


def test_ranks_average_ties():
    assert stats.ranks([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]
    assert stats.ranks([1.0, 2.0, 2.0, 5.0]) == [1.0, 2.5, 2.5, 4.0]


def test_spearman_matches_scipy():
    rng = random.Random(7)
    for n in (3, 5, 12):
        x = [rng.random() for _ in range(n)]
        y = [v + rng.gauss(0, 0.3) for v in x]
        assert stats.spearman(x, y) == pytest.approx(sps.spearmanr(x, y).statistic)
    tied_x, tied_y = [1, 2, 2, 3, 4], [1, 3, 2, 4, 4]
    assert stats.spearman(tied_x, tied_y) == pytest.approx(
        sps.spearmanr(tied_x, tied_y).statistic)
    assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        stats.spearman([1, 2], [1, 2, 3])
