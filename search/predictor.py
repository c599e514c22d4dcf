"""A latency predictor per target, learned from the target's own measurements.

Why: measuring a candidate costs seconds of a device; most of the candidates a sampler
proposes late in a search are plainly over the latency budget. A model of latency fitted
to what the target has already measured tells those apart before anything runs.

What it models. A CNN's latency on one device is, to first order, the sum of its layers'
times, and a layer's time is a per-call overhead plus a cost per multiply-accumulate and
per byte of activation it writes, with rates that differ by the kind of operation (a
depthwise convolution is memory bound, a dense 1x1 is compute bound, a channel shuffle or
an SE squeeze is mostly overhead). So the features are the cost model's exact per-row
figures (:func:`blocks.cost.estimate_cost`), summed per operation class: dense MACs,
depthwise MACs, activation bytes and row counts, per block kind, plus SE and hswish
counts. The model is a linear fit with non-negative coefficients (every feature can only
add time), weighted for relative error, one for the ratio to the reference and one for
milliseconds. It has few parameters, extrapolates sanely (a bigger network is never
predicted faster), fits in milliseconds and is stored as plain numbers (JSON) in the
database, not as a pickle. benchmarks/predictor.py compares it with gradient boosting and
with a MACs-only line.

Uncertainty: split-conformal intervals on the log of the ratio. Out-of-fold predictions
(K-fold) give residuals ``log(measured / predicted)``; the interval is ``predicted *
exp([lo_q, hi_q])`` at the configured coverage. The same out-of-fold predictions give the
held-out error (share within +-10%, median absolute relative error) reported by
``fitnas predictor show``.

Screening (:meth:`PredictorPolicy.verdict`): a candidate is ``predicted_over_budget`` when
the interval's lower end is over the budget, but only when the predictor has learned from
at least ``min_observations`` measurements and both its held-out error at the last refit
and its recent error on candidates measured after being predicted are under
``max_error``. A share (``audit_share``) of would-be-screened candidates is measured
anyway, at random, so the recent error keeps being checked.

State (:class:`PredictorStore`): two ``fitnas_``-prefixed tables in any SQLAlchemy
database (the local search: its storage file; the service: its own database, created by
the Alembic migration): the observations (features and measured figures per target and
spec) and one row per target with the fitted model and its bookkeeping. Nothing in here
imports the service.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from blocks.cost import estimate_cost
from blocks.shapes import resolve
from blocks.spec import (
    BottleneckBlock,
    ConvBlock,
    DepthwiseSeparableBlock,
    MBConvBlock,
    ShuffleBlock,
    mbconv_mid,
)

KINDS = ("stem", "conv", "factorized", "spatial_sep", "ds", "mbconv", "bottleneck", "shuffle",
         "head", "classifier")
FEATURE_NAMES: tuple[str, ...] = (
    "const", "dw.k3.macs", "dw.k5.macs", "dw.k7.macs", "dw.bytes", "grouped.macs",
    "dilated.macs", "se.n", "se.bytes", "hswish.bytes",
    *(f"{k}.{f}" for k in KINDS for f in ("macs", "bytes", "n")),
)
STATE_VERSION = 1
RECENT_WINDOW = 30

# ---- features --------------------------------------------------------------------------


def _grouped_macs(block: Any, macs: int, dw_macs: int, out_hw: tuple[int, int]) -> int:
    """MACs of a block's grouped (not depthwise) convolutions: slow per MAC on CPUs."""
    if isinstance(block, ConvBlock) and block.groups > 1 and not dw_macs:
        return macs
    if isinstance(block, BottleneckBlock) and block.groups > 1 and not dw_macs:
        mid, k = block.mid_channels, block.kernel
        return out_hw[0] * out_hw[1] * mid * (mid // block.groups) * k * k
    if isinstance(block, ShuffleBlock) and block.groups > 1:
        return macs - dw_macs
    return 0


def _dw_part(block: Any, cin: int, out_hw: tuple[int, int]) -> tuple[int, int]:
    """(MACs, output elements) of a block's depthwise convolution, per image (0, 0 when
    it has none). The rest of the block's MACs are dense / grouped."""
    hw = out_hw[0] * out_hw[1]
    k2 = block.kernel * block.kernel
    if isinstance(block, MBConvBlock):
        mid = mbconv_mid(block, cin)
        return hw * mid * k2, hw * mid
    if isinstance(block, DepthwiseSeparableBlock):
        return hw * cin * k2, hw * cin
    if isinstance(block, ShuffleBlock):
        return hw * block.mid_channels * k2, hw * block.mid_channels
    if isinstance(block, BottleneckBlock) and block.groups == block.mid_channels:
        return hw * block.mid_channels * k2, hw * block.mid_channels
    if isinstance(block, ConvBlock) and block.groups == cin == block.out_channels:
        return hw * cin * k2, hw * cin
    return 0, 0


def spec_features(spec, resolution: int | None = None, batch: int = 1,
                  dtype_bytes: int = 4) -> dict[str, float]:
    """The predictor's features of ``spec`` at ``resolution`` (default: its own), per
    image, in millions (MACs, bytes) or counts."""
    res = resolution or spec.resolution
    cost = estimate_cost(spec, resolution=res, batch=1, dtype_bytes=dtype_bytes)
    resolved = {rb.path: rb for rb in resolve(spec, res)}
    f = dict.fromkeys(FEATURE_NAMES, 0.0)
    f["const"] = 1.0
    for row in cost.blocks:
        kind = row.name if row.name in ("stem", "head", "classifier") else row.kind
        macs = float(row.macs)
        bytes_ = float(row.activation_bytes_total)
        rb = resolved.get(row.name)
        if rb is not None:
            block = rb.block
            dw_macs, dw_elems = _dw_part(block, rb.in_channels, rb.out_hw)
            grouped = _grouped_macs(block, row.macs, dw_macs, rb.out_hw)
            macs -= dw_macs + grouped
            if dw_macs:
                k = 3 if block.kernel <= 3 else 5 if block.kernel <= 5 else 7
                f[f"dw.k{k}.macs"] += dw_macs / 1e6
            f["dw.bytes"] += dw_elems * dtype_bytes / 1e6
            f["grouped.macs"] += grouped / 1e6
            if getattr(block, "dilation", 1) > 1:
                f["dilated.macs"] += row.macs / 1e6
            if getattr(block, "se", None) is not None:
                f["se.n"] += 1
                f["se.bytes"] += bytes_ / 1e6
            if getattr(block, "act", None) == "hswish":
                f["hswish.bytes"] += bytes_ / 1e6
        f[f"{kind}.macs"] += macs / 1e6
        f[f"{kind}.bytes"] += bytes_ / 1e6
        f[f"{kind}.n"] += 1
    return f


def feature_vector(features: dict[str, float], names: Sequence[str] = FEATURE_NAMES
                   ) -> list[float]:
    return [float(features.get(n, 0.0)) for n in names]


# ---- the model -------------------------------------------------------------------------


@dataclass
class Prediction:
    """A predicted figure and its interval at the predictor's coverage."""

    value: float
    lo: float
    hi: float

    def as_attrs(self, prefix: str) -> dict[str, float]:
        return {prefix: self.value, f"{prefix}_lo": self.lo, f"{prefix}_hi": self.hi}


def _fit_positive(X: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares on relative error: minimise sum(((Xw - y) / y)^2)."""
    import numpy as np
    from scipy.optimize import nnls

    A = np.asarray(X, dtype=float)
    b = np.asarray(y, dtype=float)
    w = 1.0 / b
    scale = A.max(axis=0)
    scale[scale <= 0] = 1.0
    coef, _ = nnls((A / scale) * w[:, None], b * w, maxiter=50 * A.shape[1])
    return list(coef / scale)


def _dot(coef: Sequence[float], x: Sequence[float]) -> float:
    return float(sum(c * v for c, v in zip(coef, x, strict=True)))


def _quantile(values: Sequence[float], q: float) -> float:
    """The conformal quantile: the ceil((n + 1) q)-th smallest (the largest when over)."""
    s = sorted(values)
    k = min(len(s), max(1, math.ceil((len(s) + 1) * q)))
    return s[k - 1]


def _folds(n: int, k: int, seed: int = 0) -> list[list[int]]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return [idx[i::k] for i in range(k)]


@dataclass
class FittedModel:
    """One fitted figure (ratio or ms): coefficients, conformal offsets, held-out error."""

    coef: list[float]
    log_lo: float
    log_hi: float
    within_10pct: float
    within_5pct: float
    median_abs_error: float

    def predict(self, x: Sequence[float]) -> Prediction:
        v = max(_dot(self.coef, x), 1e-9)
        return Prediction(v, v * math.exp(self.log_lo), v * math.exp(self.log_hi))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FittedModel:
        return cls(**d)


def fit_figure(X: list[list[float]], y: list[float], coverage: float = 0.9,
               folds: int = 5) -> FittedModel:
    """Fit one figure; its interval and held-out error come from K-fold out-of-fold
    predictions (every observation is predicted once by a model that did not see it)."""
    n = len(y)
    k = max(2, min(folds, n))
    oof = [0.0] * n
    for fold in _folds(n, k):
        held = set(fold)
        tr = [i for i in range(n) if i not in held]
        coef = _fit_positive([X[i] for i in tr], [y[i] for i in tr])
        for i in fold:
            oof[i] = max(_dot(coef, X[i]), 1e-9)
    logs = [math.log(y[i] / oof[i]) for i in range(n)]
    tail = (1.0 - coverage) / 2.0
    lo = -_quantile([-v for v in logs], 1.0 - tail)
    hi = _quantile(logs, 1.0 - tail)
    rel = [abs(oof[i] / y[i] - 1.0) for i in range(n)]
    return FittedModel(
        coef=_fit_positive(X, y), log_lo=lo, log_hi=hi,
        within_10pct=sum(r <= 0.10 for r in rel) / n,
        within_5pct=sum(r <= 0.05 for r in rel) / n,
        median_abs_error=sorted(rel)[n // 2],
    )


@dataclass
class PredictorState:
    """What is stored per target: the fitted models and the bookkeeping around them."""

    target_key: str
    target: str
    n: int = 0
    refit_at: float | None = None
    ratio: FittedModel | None = None
    ms: FittedModel | None = None
    coverage: float = 0.9
    settings: dict[str, Any] = field(default_factory=dict)  # what the target key hashes
    features: list[str] = field(default_factory=lambda: list(FEATURE_NAMES))
    # |predicted / measured - 1| of candidates predicted before they were measured
    recent: list[float] = field(default_factory=list)

    @property
    def heldout_error(self) -> float | None:
        """Median absolute relative error of the ratio, out of fold, at the last refit."""
        return self.ratio.median_abs_error if self.ratio is not None else None

    @property
    def recent_error(self) -> float | None:
        if not self.recent:
            return None
        s = sorted(self.recent)
        return s[len(s) // 2]

    def predict(self, features: dict[str, float]) -> dict[str, Prediction]:
        x = feature_vector(features, self.features)
        out = {}
        if self.ratio is not None:
            out["latency_ratio"] = self.ratio.predict(x)
        if self.ms is not None:
            out["latency_ms"] = self.ms.predict(x)
        return out

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k not in ("ratio", "ms")}
        d["version"] = STATE_VERSION
        d["ratio"] = self.ratio.to_dict() if self.ratio else None
        d["ms"] = self.ms.to_dict() if self.ms else None
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PredictorState | None:
        try:
            d = json.loads(text)
            if d.pop("version", None) != STATE_VERSION:
                return None  # written by another version: refit from the observations
            ratio, ms = d.pop("ratio"), d.pop("ms")
            st = cls(**d)
            st.ratio = FittedModel.from_dict(ratio) if ratio else None
            st.ms = FittedModel.from_dict(ms) if ms else None
            return st
        except (ValueError, TypeError, KeyError):
            return None


def fit_state(target_key: str, target: str, rows: Sequence[dict[str, Any]],
              coverage: float = 0.9, previous: PredictorState | None = None,
              now: float | None = None, settings: dict[str, Any] | None = None
              ) -> PredictorState:
    """Refit from observation rows (``features``, ``ratio`` (may be None), ``ms``)."""
    st = PredictorState(target_key=target_key, target=target, coverage=coverage,
                        settings=dict(settings or (previous.settings if previous else {})))
    if previous is not None:
        st.recent = previous.recent
    st.n = len(rows)
    st.refit_at = time.time() if now is None else now
    if len(rows) >= 3:
        X = [feature_vector(r["features"], st.features) for r in rows]
        st.ms = fit_figure(X, [float(r["ms"]) for r in rows], coverage)
        with_ratio = [i for i, r in enumerate(rows) if r.get("ratio")]
        if len(with_ratio) >= 3:
            st.ratio = fit_figure([X[i] for i in with_ratio],
                                  [float(rows[i]["ratio"]) for i in with_ratio], coverage)
    return st


def fit_macs_baseline(macs: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """``y = a * MACs + b`` by ordinary least squares: what a user would try first."""
    import numpy as np

    a, b = np.polyfit(np.asarray(macs, float), np.asarray(y, float), 1)
    return float(a), float(b)


# ---- policy ----------------------------------------------------------------------------


@dataclass
class PredictorPolicy:
    """When the predictor may tell a candidate infeasible without measuring it."""

    min_observations: int = 50
    max_error: float = 0.08  # median |predicted / measured - 1|, held out and recent
    min_recent: int = 5  # recent checks needed before the recent error counts
    audit_share: float = 0.2
    refit_every: int = 10  # refit after this many new observations (or 10% more)

    def enabled(self, st: PredictorState | None) -> tuple[bool, str]:
        """Whether screening is on for this state, and why not when it is off."""
        if st is None or (st.ratio is None and st.ms is None):
            return False, "not fitted yet"
        if st.n < self.min_observations:
            return False, f"learned from {st.n} < {self.min_observations} measurements"
        if st.heldout_error is not None and st.heldout_error > self.max_error:
            return False, f"held-out error {st.heldout_error:.3f} > {self.max_error}"
        recent = st.recent[-RECENT_WINDOW:]
        if len(recent) >= self.min_recent:
            err = sorted(recent)[len(recent) // 2]
            if err > self.max_error:
                return False, f"recent error {err:.3f} > {self.max_error}"
        return True, "on"

    def needs_refit(self, st: PredictorState | None, n_observations: int) -> bool:
        if n_observations < 3:
            return False
        if st is None or st.refit_at is None:
            return True
        grown = n_observations - st.n
        return grown >= min(self.refit_every, max(1, math.ceil(0.1 * max(st.n, 1))))


def over_budget(predictions: dict[str, Prediction], budgets: dict[str, float]) -> list[str]:
    """The budgets (``latency_ratio`` / ``latency_ms``) whose predicted interval lies
    wholly above them."""
    return [name for name, limit in budgets.items()
            if name in predictions and predictions[name].lo > limit]


def audit_draw(seed: int | None, trial_number: int, share: float) -> bool:
    """Seeded draw: is this screened candidate measured anyway?"""
    h = hashlib.sha256(f"{seed}|{trial_number}|audit".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < share


def target_settings(target: str, measure: Any) -> dict[str, Any]:
    """Everything that makes latency comparable, without the spec: the target name and
    the measurement settings that enter the cache key (device, runtime, threads, batch,
    resolution, dtype, layout, reference)."""
    return {"target": target, "device": measure.device, "runtime": measure.runtime,
            "batch": measure.batch, "resolution": measure.resolution,
            "dtype": measure.dtype, "channels_last": measure.channels_last,
            "threads": measure.threads, "reference": measure.reference}


def target_key(target: str, measure: Any) -> str:
    """One predictor per :func:`target_settings`: their hash."""
    parts = target_settings(target, measure)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ---- storage ---------------------------------------------------------------------------


class PredictorStore:
    """Observations and fitted state in tables ``fitnas_predictor_observations`` and
    ``fitnas_predictors`` of a SQLAlchemy database (URL or engine). Created here when
    absent (the local search); the service's migration creates the same tables."""

    OBS_TABLE = "fitnas_predictor_observations"
    STATE_TABLE = "fitnas_predictors"

    def __init__(self, url_or_engine: Any, create: bool = True):
        import sqlalchemy as sa

        self._sa = sa
        if isinstance(url_or_engine, str):
            kwargs: dict[str, Any] = ({"connect_args": {"timeout": 120}}
                                      if url_or_engine.startswith("sqlite") else
                                      {"pool_pre_ping": True})
            self.engine = sa.create_engine(url_or_engine, **kwargs)
            self._owned = True
        else:
            self.engine = url_or_engine
            self._owned = False
        meta = sa.MetaData()
        self.obs = sa.Table(
            self.OBS_TABLE, meta,
            sa.Column("target_key", sa.String(64), primary_key=True),
            sa.Column("spec_hash", sa.String(64), primary_key=True),
            sa.Column("target", sa.String(100), nullable=False, index=True),
            sa.Column("features", sa.Text, nullable=False),
            sa.Column("ratio", sa.Float, nullable=True),
            sa.Column("ms", sa.Float, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
        )
        self.state = sa.Table(
            self.STATE_TABLE, meta,
            sa.Column("target_key", sa.String(64), primary_key=True),
            sa.Column("target", sa.String(100), nullable=False, index=True),
            sa.Column("n", sa.Integer, nullable=False),
            sa.Column("state", sa.Text, nullable=False),
            sa.Column("refit_at", sa.Float, nullable=True),
        )
        if create:
            meta.create_all(self.engine, checkfirst=True)

    def _write(self, op) -> None:
        """Run a write transaction; on SQLite a writer that found the file locked past
        the busy timeout (another process writing) tries again, a few times."""
        sa = self._sa
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    op(conn)
                return
            except sa.exc.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.05 * 2**attempt)

    def add(self, key: str, target: str, spec_hash: str, features: dict[str, float],
            ratio: float | None, ms: float) -> None:
        """Record one measurement (the first one for a spec on a target stays)."""
        self._write(lambda conn: self._add(conn, key, target, spec_hash, features, ratio, ms))

    def _add(self, conn, key: str, target: str, spec_hash: str, features: dict[str, float],
             ratio: float | None, ms: float) -> None:
        sa = self._sa
        exists = conn.execute(sa.select(self.obs.c.spec_hash).where(
            self.obs.c.target_key == key, self.obs.c.spec_hash == spec_hash)).first()
        if exists:
            return
        try:
            with conn.begin_nested():
                conn.execute(sa.insert(self.obs).values(
                    target_key=key, spec_hash=spec_hash, target=target,
                    features=json.dumps(features), ratio=ratio, ms=ms,
                    created_at=time.time()))
        except sa.exc.IntegrityError:
            pass

    def count(self, key: str) -> int:
        sa = self._sa
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(self.obs)
                                    .where(self.obs.c.target_key == key)).scalar_one())

    def rows(self, key: str) -> list[dict[str, Any]]:
        sa = self._sa
        with self.engine.connect() as conn:
            res = conn.execute(sa.select(self.obs.c.features, self.obs.c.ratio, self.obs.c.ms)
                               .where(self.obs.c.target_key == key)
                               .order_by(self.obs.c.created_at, self.obs.c.spec_hash))
            return [{"features": json.loads(f), "ratio": r, "ms": m} for f, r, m in res]

    def load(self, key: str) -> PredictorState | None:
        sa = self._sa
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.state.c.state)
                               .where(self.state.c.target_key == key)).first()
        return PredictorState.from_json(row[0]) if row else None

    def states(self, target: str) -> list[PredictorState]:
        sa = self._sa
        with self.engine.connect() as conn:
            res = conn.execute(sa.select(self.state.c.state)
                               .where(self.state.c.target == target)
                               .order_by(self.state.c.refit_at.desc()))
            out = [PredictorState.from_json(r[0]) for r in res]
        return [s for s in out if s is not None]

    def save(self, st: PredictorState) -> None:
        values = {"target": st.target, "n": st.n, "state": st.to_json(),
                  "refit_at": st.refit_at}
        self._write(lambda conn: self._save(conn, st, values))

    def _save(self, conn, st: PredictorState, values: dict[str, Any]) -> None:
        sa = self._sa
        done = conn.execute(sa.update(self.state)
                            .where(self.state.c.target_key == st.target_key)
                            .values(**values)).rowcount
        if not done:
            try:
                with conn.begin_nested():
                    conn.execute(sa.insert(self.state).values(
                        target_key=st.target_key, **values))
            except sa.exc.IntegrityError:
                pass  # another process saved first; its state is as good

    def refit(self, key: str, target: str, policy: PredictorPolicy,
              coverage: float = 0.9, settings: dict[str, Any] | None = None
              ) -> PredictorState | None:
        """The current state, refitted first when enough new measurements arrived."""
        st = self.load(key)
        n = self.count(key)
        if policy.needs_refit(st, n):
            st = fit_state(key, target, self.rows(key), coverage, previous=st,
                           settings=settings)
            self.save(st)
        return st

    def close(self) -> None:
        if self._owned:
            self.engine.dispose()


def summarize_errors(pairs: Iterable[tuple[float, float]]) -> dict[str, float | int]:
    """Measured-vs-predicted figures of (predicted, measured) pairs."""
    rel = [abs(p / m - 1.0) for p, m in pairs if m > 0]
    if not rel:
        return {"n": 0}
    s = sorted(rel)
    return {"n": len(s), "median_abs_error": s[len(s) // 2],
            "within_10pct": sum(r <= 0.10 for r in s) / len(s)}


__all__ = [
    "FEATURE_NAMES",
    "FittedModel",
    "Prediction",
    "PredictorPolicy",
    "PredictorState",
    "PredictorStore",
    "audit_draw",
    "fit_figure",
    "fit_macs_baseline",
    "fit_state",
    "over_budget",
    "spec_features",
    "summarize_errors",
    "target_key",
    "target_settings",
]
