"""Pure statistics for latency samples: no torch, no numpy, nothing but the standard library.

Conventions (documented in docs/measurement.md):

- quantiles interpolate linearly between order statistics (the same definition as
  ``numpy.percentile(..., method="linear")``);
- ``iqr`` is p75 - p25;
- ``cv`` (coefficient of variation) is the sample standard deviation (n - 1) divided by
  the mean; 0 for a single sample;
- Spearman's rank correlation uses average ranks for ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from search.evaluators.types import LatencyStats


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile, ``q`` in [0, 1]."""
    if not values:
        raise ValueError("quantile of an empty sample")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1] (got {q})")
    xs = sorted(float(v) for v in values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return xs[lo] + (xs[hi] - xs[lo]) * frac


def median(values: Sequence[float]) -> float:
    return quantile(values, 0.5)


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of an empty sample")
    return math.fsum(values) / len(values)


def stdev(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))


def cv(values: Sequence[float]) -> float:
    """Coefficient of variation: sample standard deviation over the mean."""
    m = mean(values)
    if m == 0:
        return 0.0 if stdev(values) == 0 else math.inf
    return stdev(values) / abs(m)


def iqr(values: Sequence[float]) -> float:
    return quantile(values, 0.75) - quantile(values, 0.25)


def robust_cv(values: Sequence[float]) -> float:
    """IQR / 1.349 / median: the CV a normal sample would have, insensitive to the rare
    long outliers (preemptions) that inflate the standard deviation."""
    med = median(values)
    if med == 0:
        return 0.0
    return iqr(values) / 1.349 / abs(med)


def summarize(values: Sequence[float]) -> LatencyStats:
    """Median, p90, IQR, CV, n, mean, min, max of a sample (any unit; the caller's)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("cannot summarize an empty sample")
    if any(not math.isfinite(v) for v in vals):
        raise ValueError("sample contains a non-finite value")
    return LatencyStats(
        median=median(vals),
        p90=quantile(vals, 0.9),
        iqr=iqr(vals),
        cv=cv(vals),
        n=len(vals),
        mean=mean(vals),
        min=min(vals),
        max=max(vals),
    )


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties get the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1
        for k in range(i, j + 1):
            out[order[k]] = avg
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) != len(y):
        raise ValueError("pearson: samples differ in length")
    if len(x) < 2:
        raise ValueError("pearson: need at least two pairs")
    mx, my = mean(x), mean(y)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks)."""
    return pearson(ranks(x), ranks(y))


def binom_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    if k < 0:
        return 0.0
    return math.fsum(math.comb(n, i) for i in range(min(k, n) + 1)) / 2**n


def median_interval(values: Sequence[float], alpha: float) -> tuple[float, float] | None:
    """Distribution-free interval for the median: the order statistics
    (x_(k), x_(n+1-k)) with the largest k for which P(Binomial(n, 1/2) < k) <= alpha / 2,
    so that it holds the true median with probability >= 1 - alpha for any continuous
    distribution of independent values. None when ``n`` is too small for ``alpha`` (even
    (min, max) would cover less)."""
    n = len(values)
    if n == 0 or not 0 < alpha < 1:
        return None
    k = 0
    while k + 1 <= (n + 1) // 2 and binom_cdf_half(k, n) <= alpha / 2:
        k += 1
    if k == 0:
        return None
    xs = sorted(float(v) for v in values)
    return xs[k - 1], xs[n - k]
