"""The one search loop: an Optuna study driven by ask / tell, shared by ``fitnas search``
(evaluates in a local child process) and the service scheduler (remote workers).

The driver never evaluates anything itself. :meth:`SearchDriver.ask` samples a spec,
costs it exactly, tells Optuna at once when the candidate is over a params / MACs /
memory budget (pre-screening) or when the measurement cache already holds its result,
and otherwise hands back an :class:`~search.evaluators.types.EvalTask`.
:meth:`SearchDriver.tell` records an :class:`~search.evaluators.types.EvalOutcome`.

Constraints (Optuna 5 ``Trial.set_constraint``, <= 0 feasible) are relative:
``value / budget - 1``, so that violations of different budgets are comparable when
samplers rank infeasible trials by their summed violation. Every constraint and cost
figure is also a numeric user attribute (optuna-dashboard shows and sorts those).
See docs/search.md for the choices and what Optuna's samplers do with them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Literal, Protocol, runtime_checkable

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from blocks.cost import CostReport, estimate_cost
from blocks.spec import ArchSpec
from search.evaluators.types import (
    EvalOutcome,
    EvalTask,
    LatencyBudget,
    MeasureSettings,
    QualitySettings,
)
from search.predictor import (
    RECENT_WINDOW,
    PredictorPolicy,
    PredictorState,
    PredictorStore,
    audit_draw,
    over_budget,
    spec_features,
    target_key,
    target_settings,
)
from search.space import BUILTIN_SPACES, DesignSpace, spec_summary

DIRECTIONS = ["maximize", "minimize"]
METRIC_NAMES = ["quality", "latency_ms"]  # with a ratio budget: ["quality", "latency_ratio"]
CONFIG_ATTR = "fitnas.config"
CONFIG_HASH_ATTR = "fitnas.config_hash"
MODE_ATTR = "fitnas.mode"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MIB = 1024 * 1024
# Reference networks: measured beside a local search (points on its plot) and, at every
# width multiplier the space allows, its first trials when the space can express them.
REFERENCE_PRESETS = ("mobilenet_v2@0.5", "mobilenet_v3_small@0.75", "mnasnet@0.5")

# Trial user attribute "status": what happened to the candidate.
STATUS_MEASURED = "measured"
STATUS_CACHED = "cached"
STATUS_OVER_BUDGET = "over_budget"
STATUS_PREDICTED = "predicted_over_budget"
STATUS_FAILED = "failed"
STATUS_INTERRUPTED = "interrupted"
STATUS_PENDING = "pending"
STATUS_PRUNED = "pruned"


class SearchError(RuntimeError):
    """A search that cannot start or go on; the message is one line for a person."""


# ---- configuration ------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budgets(_Model):
    """Hard constraints. Latency is absolute (ms) or relative to the reference network
    measured interleaved in the same process (``LatencyResult.ratio_to_reference``)."""

    max_latency_ms: float | None = Field(None, gt=0)
    max_latency_ratio: float | None = Field(None, gt=0)
    max_params: int | None = Field(None, ge=1)
    max_macs: int | None = Field(None, ge=1, description="multiply-accumulates per image")
    max_activation_bytes: int | None = Field(
        None, ge=1, description="peak activation working set at the measured batch and dtype")

    def cost_limits(self) -> dict[str, float]:
        limits = {"params": self.max_params, "macs": self.max_macs,
                  "activation_bytes": self.max_activation_bytes}
        return {k: float(v) for k, v in limits.items() if v is not None}

    def is_empty(self) -> bool:
        return all(v is None for v in self.model_dump().values())


SamplerName = Literal["tpe", "nsga2", "random"]
PrunerName = Literal["none", "successive_halving", "hyperband", "median"]


class SearchConfig(_Model):
    """Everything that defines a search. JSON-able; stored on the study as a user attr."""

    space: DesignSpace
    target: str = Field("cpu", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:@/-]+$")
    budgets: Budgets = Budgets()
    trials: int = Field(30, ge=1, le=100_000)
    measure: MeasureSettings = MeasureSettings()
    quality: QualitySettings = QualitySettings()
    sampler: SamplerName = "tpe"
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    population_size: int | None = Field(None, ge=2, le=1000, description="NSGA-II; "
                                        "default 20")
    timeout_s: float = Field(300.0, gt=0, le=24 * 3600, description="per evaluation")
    memory_mb: int = Field(4096, ge=64, le=1_048_576, description="per evaluation")
    seed_specs: list[ArchSpec] = Field(
        default_factory=list, max_length=100,
        description="networks enqueued as the first trials (each must be a point of the "
        "space); a string is a compact spec or preset:NAME[@WIDTH]")
    warm_start: bool = Field(True, description="enqueue the reference presets the space "
                             "can express (every width multiplier it allows) first")
    predictor: bool = Field(True, description="pre-screen candidates the target's latency "
                            "predictor confidently places over the latency budget")
    trainer_pool: str = Field(
        "trainers", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the service: the trainers that train a 'train' job's candidates (a "
        "worker token made with --role trainer --target POOL); not part of the study")

    @field_validator("seed_specs", mode="before")
    @classmethod
    def _seed_strings(cls, v: Any) -> Any:
        """Strings are compact specs or presets, never paths (a configuration may come
        from a client of the service)."""
        if not isinstance(v, list):
            return v
        out = []
        for item in v:
            if isinstance(item, str):
                text = item.strip()
                if text.startswith("{"):
                    out.append(json.loads(text))
                    continue
                from blocks.load import SpecLoadError, parse_spec

                if not (text.startswith("preset:") or text.startswith("net_")):
                    raise ValueError(f"seed spec {text[:60]!r}: give a compact spec "
                                     "(net_...), preset:NAME[@WIDTH] or the spec itself")
                try:
                    item = parse_spec(text)
                except SpecLoadError as exc:
                    raise ValueError(f"seed spec {text[:60]!r}: {exc}") from exc
            out.append(item)
        return out
    pruner: PrunerName = Field(
        "successive_halving", description="stops a multi-fidelity quality signal ('train') "
        "at a rung: successive halving (min resource = the first rung), hyperband (brackets "
        "of successive halving from the first rung to all the steps), median, or none")
    pruner_reduction_factor: int = Field(2, ge=2, le=10, description="successive halving "
                                         "and hyperband: the best 1/factor of a rung go on")

    @field_validator("space", mode="before")
    @classmethod
    def _builtin_space(cls, v: Any) -> Any:
        """A built-in space may be given by name ("default", "mobilenet_v2"); never a
        path (a configuration may come from a client of the service)."""
        if isinstance(v, str):
            if v not in BUILTIN_SPACES:
                raise ValueError(f"unknown built-in space {v!r}; known: "
                                 f"{', '.join(BUILTIN_SPACES)} (or give the space itself)")
            return DesignSpace.load(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if self.budgets.max_latency_ratio is not None and self.measure.reference is None:
            raise ValueError("a relative latency budget needs a reference network "
                             "(measure.reference)")
        from search.space import SpaceError

        for i, spec in enumerate(self.seed_specs):
            try:
                self.space.locate(spec)
            except SpaceError as exc:
                raise ValueError(f"seed spec {i + 1} ({spec.to_compact()[:80]}): {exc}"
                                 ) from None
        return self

    @property
    def latency_objective(self) -> str:
        """The latency figure Optuna, the Pareto set, the winner and the reports use: the
        budget's own measure (``latency_ratio`` for a ratio budget, else ``latency_ms``).
        Milliseconds swing with the machine's load between processes; the ratio to the
        reference timed interleaved does much less, and it is what the budget limits."""
        if self.budgets.max_latency_ratio is not None and self.budgets.max_latency_ms is None:
            return "latency_ratio"
        return "latency_ms"

    def metric_names(self) -> list[str]:
        """The objectives' names as optuna-dashboard shows them: the quality with its
        signal, and the latency figure the budget is written in."""
        return [f"quality ({self.quality.signal})", self.latency_objective]

    def latency_budgets(self) -> dict[str, float]:
        out = {}
        if self.budgets.max_latency_ratio is not None:
            out["latency_ratio"] = self.budgets.max_latency_ratio
        if self.budgets.max_latency_ms is not None:
            out["latency_ms"] = self.budgets.max_latency_ms
        return out

    def warm_start_specs(self, presets: Iterable[str] = REFERENCE_PRESETS
                         ) -> list[tuple[str, ArchSpec]]:
        """What the search enqueues first: the seed specs, then each reference preset at
        every width multiplier of the space, at the measured resolution, when the space
        can express it (deduplicated)."""
        from blocks.presets import preset
        from search.space import SpaceError

        out: list[tuple[str, ArchSpec]] = [(f"seed {i + 1}", s)
                                           for i, s in enumerate(self.seed_specs)]
        if self.warm_start:
            names = list(dict.fromkeys(p.partition("@")[0] for p in presets))
            resolution = self.measure.resolution or max(self.space.resolution)
            for name in names:
                for width in self.space.width_mult:
                    try:
                        spec = preset(name, width, num_classes=self.space.num_classes,
                                      resolution=resolution)
                        self.space.locate(spec)
                    except (SpaceError, ValueError, TypeError):
                        continue
                    out.append((f"{name}@{width:g}", spec))
        seen: set[str] = set()
        unique = []
        for label, spec in out:
            if spec.hash not in seen:
                seen.add(spec.hash)
                unique.append((label, spec))
        return unique

    def identity(self) -> dict[str, Any]:
        """What makes two searches the same study: everything but the trial count and the
        per-evaluation limits (so that a resumed search may ask for more trials)."""
        data = self.model_dump(mode="json")
        for key in ("trials", "timeout_s", "memory_mb", "trainer_pool"):
            data.pop(key, None)
        # fields added later count only when set otherwise: a study made before they
        # existed keeps its hash
        for key, default in (("seed_specs", []), ("warm_start", True), ("predictor", True)):
            if data.get(key) == default:
                data.pop(key, None)
        return data

    def config_hash(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def default_study_name(self) -> str:
        return f"fitnas-{self.space.name}-{self.config_hash()[:12]}"

    def cache_key(self, spec: ArchSpec) -> str:
        """The measurement settings' key; the quality settings are folded in when a
        quality signal is asked for (the cached outcome carries both)."""
        key = self.measure.key(spec.hash, self.target)
        if self.quality.signal == "none":
            return key
        q = json.dumps(self.quality.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(f"{key}|{q}".encode()).hexdigest()

    def eval_task(self, spec: ArchSpec) -> EvalTask:
        """The task for ``spec``. With a latency budget the task carries it, so the
        measurement stops once the decision is clear (docs/measurement.md); that is not
        part of the cache key nor of the study's identity."""
        b = self.budgets
        budget = None
        if b.max_latency_ms is not None or b.max_latency_ratio is not None:
            budget = LatencyBudget(ms=b.max_latency_ms, ratio=b.max_latency_ratio)
        return EvalTask(
            spec=spec.canonical_dict(),
            measure=self.measure,
            quality=None if self.quality.signal == "none" else self.quality,
            timeout_s=self.timeout_s,
            memory_mb=self.memory_mb,
            budget=budget,
        )


# ---- measurement cache ---------------------------------------------------------------------


@runtime_checkable
class MeasurementCache(Protocol):
    """Both caches (``SQLMeasurementCache`` here, ``service.cache.DBMeasurementCache`` for
    the service) keep what :func:`cacheable` allows, and the first outcome stored for a
    key wins: later puts for that key change nothing."""

    def get(self, key: str) -> EvalOutcome | None: ...

    def put(self, key: str, outcome: EvalOutcome) -> None: ...


def cacheable(outcome: EvalOutcome) -> bool:
    """The caching policy: successful measurements only. A failure (a timeout, running out
    of memory, a crash) may be the machine's fault at that moment: measure it again."""
    return outcome.ok


class SQLMeasurementCache:
    """Successful outcomes by key in table ``fitnas_local_measurements`` of any SQLAlchemy
    database (by default the study's own storage database); the policy of
    :class:`MeasurementCache`."""

    TABLE = "fitnas_local_measurements"

    def __init__(self, url: str):
        import sqlalchemy as sa

        self._sa = sa
        self.engine = sa.create_engine(url, **_engine_kwargs(url))
        if sqlite_path(url) is not None:
            tune_sqlite(self.engine)
        meta = sa.MetaData()
        self.table = sa.Table(
            self.TABLE, meta,
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("outcome", sa.Text, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
        )
        meta.create_all(self.engine, checkfirst=True)

    def get(self, key: str) -> EvalOutcome | None:
        sa = self._sa
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(self.table.c.outcome).where(self.table.c.key == key)
            ).first()
        if row is None:
            return None
        try:
            return EvalOutcome.model_validate_json(row[0])
        except ValueError:
            return None  # written by an incompatible version: measure again

    def put(self, key: str, outcome: EvalOutcome) -> None:
        if not cacheable(outcome):
            return
        sa = self._sa
        values = {"outcome": outcome.model_dump_json(), "created_at": time.time()}
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(self.table).values(key=key, **values))
        except sa.exc.IntegrityError:
            pass  # stored before (by us or another process): the first outcome wins

    def close(self) -> None:
        self.engine.dispose()


# ---- storage --------------------------------------------------------------------------------


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # Waiting on a lock beats failing with "database is locked".
        return {"connect_args": {"timeout": 120}}
    return {"pool_pre_ping": True}


def sqlite_path(url: str) -> str | None:
    """The file of a ``sqlite:///path`` URL (None for other databases / in-memory)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?")[0]
    if not path or path == ":memory:":
        return None
    return path


_SCHEMA_RACE_TRIES = 5


def _lost_schema_race(exc: BaseException) -> bool:
    """Two processes opening a new storage at once (a search and its dashboard, two API
    replicas) both run Optuna's schema set-up; the one that loses sees a table that
    "already exists" or a duplicate version stamp. Opening again then just works."""
    text = str(exc).lower()
    return "already exists" in text or ("unique" in text and "alembic_version" in text) \
        or "duplicate key" in text


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage for any SQLAlchemy URL. SQLite files get their folder
    created and write-ahead logging, so a dashboard reading the file does not block the
    search writing it."""
    path = sqlite_path(url)
    if path is not None:
        import sqlite3

        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        con = sqlite3.connect(path, timeout=120)
        try:
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
    for attempt in range(_SCHEMA_RACE_TRIES):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
            break
        except Exception as exc:
            if attempt + 1 < _SCHEMA_RACE_TRIES and _lost_schema_race(exc):
                time.sleep(0.2 * (attempt + 1))  # the other process finishes its set-up
                continue
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SearchError(f"cannot open storage {redact_url(url)}: {msg}") from exc
    if path is not None:
        tune_sqlite(storage.engine)
    return storage


def tune_sqlite(engine: Any) -> None:
    """WAL with synchronous=NORMAL: a commit no longer waits for an fsync (a search makes
    thousands of small ones: one per parameter and attribute). The database cannot be
    corrupted by a crash; at worst the last commits before a power cut are lost."""
    import sqlalchemy as sa

    def _pragmas(dbapi_con: Any, _record: Any) -> None:
        cur = dbapi_con.cursor()
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    sa.event.listen(engine, "connect", _pragmas)
    engine.dispose()  # connections opened before the listener reconnect with it


def redact_url(url: str) -> str:
    """The URL without a password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def write_trial_attrs(study: optuna.Study, trial: optuna.trial.Trial,
                      user_attrs: dict[str, Any],
                      constraints: dict[str, float] | None = None) -> None:
    """Set a trial's user attributes and constraints in one transaction.

    ``Trial.set_user_attr`` / ``set_constraint`` commit once each (and look the trial up
    once each): 30-100 commits per candidate, 3-30 ms apiece on a loaded database. On an
    RDB storage this writes the same rows (what optuna-dashboard and
    ``Trial.user_attrs`` / ``constraints`` read) in one transaction: the trial is checked
    once, then one multi-row upsert per table (SQLite, PostgreSQL) or one row at a time in
    the same session (other databases). Should Optuna's internals change, or for other
    storages, it falls back to one call per attribute."""
    constraints = constraints or {}
    for name, value in constraints.items():
        if math.isnan(float(value)):
            raise ValueError(f"constraint {name!r} is NaN")
    backend = getattr(study._storage, "_backend", study._storage)
    done = False
    if isinstance(backend, optuna.storages.RDBStorage):
        try:
            _write_rdb_attrs(backend, trial._trial_id, user_attrs, constraints)
            done = True
        except (ImportError, AttributeError):
            done = False
    if done:
        from optuna.trial._trial import _CONSTRAINTS_KEY

        cached = trial._cached_frozen_trial
        cached.user_attrs.update(user_attrs)
        cached.system_attrs.update(_system_constraint_attrs(constraints, _CONSTRAINTS_KEY))
        return
    for key, value in user_attrs.items():
        trial.set_user_attr(key, value)
    for name, value in constraints.items():
        trial.set_constraint(name, value)
    if constraints:
        trial.storage.set_trial_system_attr(trial._trial_id, "constraints",
                                            [float(v) for v in constraints.values()])


def named_constraints(t: FrozenTrial) -> dict[str, float]:
    """A trial's constraints by budget name. Optuna also reads the legacy ``constraints``
    list written for optuna-dashboard, as ``"0"``, ``"1"``...: the same values again,
    left out here."""
    return {k: v for k, v in t.constraints.items() if not k.isdigit()}


def _system_constraint_attrs(constraints: dict[str, float], key: str) -> dict[str, Any]:
    """Optuna 5 keeps one ``constraints:<name>`` system attribute per constraint;
    optuna-dashboard 0.21 reads one legacy ``constraints`` list (its plots tell feasible
    from infeasible trials by it): write both, the list in the same order."""
    out: dict[str, Any] = {f"{key}:{k}": float(v) for k, v in constraints.items()}
    if constraints:
        out["constraints"] = [float(v) for v in constraints.values()]
    return out


def _write_rdb_attrs(backend: optuna.storages.RDBStorage, trial_id: int,
                     user_attrs: dict[str, Any], constraints: dict[str, float]) -> None:
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial._trial import _CONSTRAINTS_KEY

    system = _system_constraint_attrs(constraints, _CONSTRAINTS_KEY)
    dialect = backend.engine.name
    with _create_scoped_session(backend.scoped_session, True) as session:
        row = models.TrialModel.find_or_raise_by_id(trial_id, session)
        backend.check_trial_is_updatable(trial_id, row.state)
        for model, attrs in ((models.TrialUserAttributeModel, user_attrs),
                             (models.TrialSystemAttributeModel, system)):
            _upsert_attrs(backend, session, dialect, model, trial_id, attrs)


def _upsert_attrs(backend: Any, session: Any, dialect: str, model: Any, trial_id: int,
                  attrs: dict[str, Any]) -> None:
    if not attrs:
        return
    values = [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
              for k, v in attrs.items()]
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        stmt = insert(model).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[model.trial_id, model.key],
            set_={"value_json": stmt.excluded.value_json})
        session.execute(stmt)
    else:
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(session, model, trial_id, key, value)


def write_finished_trial_system_attrs(backend: optuna.storages.RDBStorage, trial_id: int,
                                      attrs: dict[str, Any]) -> None:
    """System attributes on a finished trial, in one transaction: for what a reviewer
    adds once a search is over (artifact records of the Pareto members), which Optuna's
    public API refuses for finished trials. Nothing a sampler reads is written here."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session, True) as session:
        models.TrialModel.find_or_raise_by_id(trial_id, session)
        _upsert_attrs(backend, session, backend.engine.name, models.TrialSystemAttributeModel,
                      trial_id, attrs)


class _DeferredParams:
    """Stands in for a trial's storage while the space samples it: parameter writes (one
    commit each in Optuna) are kept, then written in one transaction by
    :func:`write_trial_params`. The sampler reads the other trials as before; the trial
    itself reads its parameters from its own cached copy."""

    def __init__(self, storage: Any):
        self._storage = storage
        self.params: list[tuple[str, float, Any]] = []

    def set_trial_param(self, trial_id: int, name: str, value: float, distribution: Any
                        ) -> None:
        self.params.append((name, value, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


class _TrialsSnapshot:
    """Stands in for the study's storage while one trial is asked and sampled: the
    study's trials are read once and that list is answered to every later read of the
    same question (TPE with ``group`` and ``constant_liar`` re-reads every trial for each
    group of parameters: 15-25 queries per trial). Nothing else is cached, and after
    :meth:`close` every read goes to the storage again (a trial keeps the storage object
    it was made with)."""

    def __init__(self, storage: Any):
        self._storage = storage
        self._trials: dict[tuple, list[FrozenTrial]] = {}
        self._open = True

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Any = None) -> list[FrozenTrial]:
        if not self._open:
            return self._storage.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        key = (study_id, None if states is None else tuple(states))
        if key not in self._trials:
            self._trials[key] = self._storage.get_all_trials(study_id, deepcopy=False,
                                                             states=states)
        trials = self._trials[key]
        return copy.deepcopy(trials) if deepcopy else list(trials)

    def close(self) -> None:
        self._open = False
        self._trials.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


@contextlib.contextmanager
def trials_snapshot(study: optuna.Study) -> Iterator[None]:
    """Within: the study reads its trials once (:class:`_TrialsSnapshot`)."""
    real = study._storage
    snapshot = _TrialsSnapshot(real)
    study._storage = snapshot
    try:
        yield
    finally:
        study._storage = real
        snapshot.close()


def sample_deferred(space: DesignSpace, study: optuna.Study, trial: optuna.trial.Trial
                    ) -> ArchSpec:
    """``space.sample(trial)`` with the parameters written in one transaction."""
    real = trial.storage
    deferred = _DeferredParams(real)
    trial.storage = deferred
    try:
        spec = space.sample(trial)
    finally:
        trial.storage = real
        write_trial_params(study, trial, deferred.params)
    return spec


def write_trial_params(study: optuna.Study, trial: optuna.trial.Trial,
                       params: list[tuple[str, float, Any]]) -> None:
    """Write sampled parameters (internal representation) in one transaction, checking
    each against the distribution the study already has for it, as Optuna does."""
    if not params:
        return
    backend = getattr(study._storage, "_backend", study._storage)
    if isinstance(backend, optuna.storages.RDBStorage):
        try:
            from optuna import distributions
            from optuna.storages._rdb import models
            from optuna.storages._rdb.storage import _create_scoped_session
        except ImportError:
            pass
        else:
            with _create_scoped_session(backend.scoped_session, True) as session:
                row = models.TrialModel.find_or_raise_by_id(trial._trial_id, session)
                backend.check_trial_is_updatable(trial._trial_id, row.state)
                given = {name: dist for name, _, dist in params}
                seen = (session.query(models.TrialParamModel.param_name,
                                      models.TrialParamModel.distribution_json)
                        .join(models.TrialModel)
                        .filter(models.TrialModel.study_id == row.study_id)
                        .filter(models.TrialParamModel.param_name.in_(list(given)))
                        .distinct())
                for name, dist_json in seen:
                    distributions.check_distribution_compatibility(
                        distributions.json_to_distribution(dist_json), given[name])
                session.add_all([models.TrialParamModel(
                    trial_id=trial._trial_id, param_name=name, param_value=value,
                    distribution_json=distributions.distribution_to_json(dist))
                    for name, value, dist in params])
            return
    for name, value, dist in params:
        trial.storage.set_trial_param(trial._trial_id, name, value, dist)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}


def config_differences(stored: Any, config: SearchConfig, limit: int = 3) -> str:
    """Which options differ between a study's stored configuration and ``config``, as
    ``measure.threads: 1 -> 2``; empty when the stored one cannot be read."""
    if not isinstance(stored, dict):
        return ""
    try:
        old = SearchConfig.model_validate(stored).identity()
    except ValueError:  # written by another version: compare what it says
        old = {k: v for k, v in stored.items()
               if k not in ("trials", "timeout_s", "memory_mb")}
    a, b = _flatten(old), _flatten(config.identity())
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = [f"{k}: {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}" for k in keys[:limit]]
    more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(shown) + more


def make_sampler(config: SearchConfig, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler. A seeded sampler is seeded with ``seed + offset`` (offset =
    trials already in the study) so that a resumed search does not replay the random
    stream of its first run and propose the same candidates again."""
    seed = None if config.seed is None else (config.seed + offset) % (2**31 - 1)
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=config.population_size or 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            group=True,  # conditional parameters (per-kind knobs) are grouped
            constant_liar=True,  # parallel workers: avoid proposing near running trials
            n_startup_trials=max(4, min(10, config.trials // 3)),
        )


# ---- the driver -----------------------------------------------------------------------------


class Proposal(BaseModel):
    """What :meth:`SearchDriver.ask` returns. ``task`` is None when the trial is already
    told (``reason``: ``over_budget`` or ``cached``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    trial_number: int
    spec: ArchSpec
    cost: CostReport
    cache_key: str
    task: EvalTask | None = None
    told: bool = False
    reason: str | None = None


def process_owner() -> str:
    """host:pid:process-start-time, to tell a live local search from a dead one."""
    try:
        import psutil

        started = int(psutil.Process().create_time())
    except Exception:
        started = 0
    return f"{socket.gethostname()}:{os.getpid()}:{started}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process that owns a trial still runs. Owners on other hosts count as
    alive: this machine cannot see them."""
    if not owner:
        return False
    try:
        host, pid_s, started_s = owner.rsplit(":", 2)
        pid, started = int(pid_s), int(started_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True
    try:
        import psutil

        proc = psutil.Process(pid)
        return started == 0 or abs(int(proc.create_time()) - started) <= 1
    except Exception:
        return False


class SearchDriver:
    """ask / tell over one Optuna study; no evaluation happens here."""

    def __init__(self, study: optuna.Study, config: SearchConfig,
                 cache: MeasurementCache | None = None, owner: str | None = None,
                 predictor: PredictorStore | None = None,
                 policy: PredictorPolicy | None = None):
        self.study = study
        self.config = config
        self.cache = cache
        self.owner = owner
        self.predictor = predictor
        self.policy = policy or PredictorPolicy()
        self.predictor_key = target_key(config.target, config.measure)

    # ---- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, storage: str | optuna.storages.BaseStorage, study_name: str,
             config: SearchConfig, cache: MeasurementCache | None = None, *,
             mode: str = "local", owner: str | None = None,
             predictor: PredictorStore | None = None,
             policy: PredictorPolicy | None = None) -> SearchDriver:
        """Create the study, or load it when it exists with the same configuration
        (the trial count may differ). ``mode`` is recorded on the study ("local" for
        ``fitnas search``, "service" for jobs) and must match when loading. A new study
        gets its warm start enqueued (:meth:`SearchConfig.warm_start_specs`)."""
        if isinstance(storage, str):
            storage = make_storage(storage)
        existing = 0
        try:
            sid = storage.get_study_id_from_name(study_name)
        except KeyError:
            sid = None
        if sid is not None:
            existing = len(storage.get_all_trials(sid, deepcopy=False))
        sampler = make_sampler(config, offset=existing)
        try:
            study = optuna.create_study(
                storage=storage, study_name=study_name, directions=DIRECTIONS,
                sampler=sampler, load_if_exists=True)
        except ValueError as exc:
            raise SearchError(f"study {study_name!r}: {exc}") from exc
        attrs = study.user_attrs
        if CONFIG_HASH_ATTR in attrs:
            if [d.name.lower() for d in study.directions] != DIRECTIONS:
                raise SearchError(f"study {study_name!r} exists with other objectives")
            if attrs[CONFIG_HASH_ATTR] != config.config_hash():
                diff = config_differences(attrs.get(CONFIG_ATTR), config)
                raise SearchError(
                    f"study {study_name!r} exists with a different configuration"
                    f"{' (' + diff + ')' if diff else ''}; give another --study name (or "
                    "the same options as before)")
            if attrs.get(MODE_ATTR, mode) != mode:
                raise SearchError(
                    f"study {study_name!r} belongs to a {attrs.get(MODE_ATTR)} search, "
                    f"not a {mode} one")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                names = study.metric_names
            if names is not None and names[1:] == config.metric_names()[1:] \
                    and names != config.metric_names():
                with warnings.catch_warnings():  # an older label for the same objectives
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names(config.metric_names())
            elif names is not None and names != config.metric_names():
                raise SearchError(
                    f"study {study_name!r} optimizes {names[1]}, this version "
                    f"{config.latency_objective}; give another --study name")
        elif len(study.trials) > 0:
            raise SearchError(f"study {study_name!r} exists and was not made by fitnas")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(config.metric_names())
            study.set_user_attr(CONFIG_HASH_ATTR, config.config_hash())
            study.set_user_attr(MODE_ATTR, mode)
            for label, spec in config.warm_start_specs():
                study.enqueue_trial(config.space.locate(spec),
                                    user_attrs={"warm_start": label})
        # the latest full configuration (the trial count may have changed on resume)
        study.set_user_attr(CONFIG_ATTR, config.model_dump(mode="json"))
        study.set_user_attr("fitnas.target", config.target)
        for key, value in config.budgets.model_dump().items():
            if value is not None:
                study.set_user_attr(f"fitnas.budget.{key}", value)
        return cls(study, config, cache, owner=owner, predictor=predictor, policy=policy)

    # ---- ask ------------------------------------------------------------------------------

    def cost(self, spec: ArchSpec) -> CostReport:
        m = self.config.measure
        return estimate_cost(spec, resolution=m.resolution, batch=m.batch,
                             dtype_bytes=DTYPE_BYTES[m.dtype])

    def cost_constraints(self, cost: CostReport) -> dict[str, float]:
        """Relative violations of the params / MACs / memory budgets (<= 0 feasible)."""
        figures = {"params": cost.params, "macs": cost.macs // max(1, cost.batch),
                   "activation_bytes": cost.activation_bytes}
        return {k: figures[k] / limit - 1.0
                for k, limit in self.config.budgets.cost_limits().items()}

    def ask(self) -> Proposal:
        error: Exception | None = None
        with trials_snapshot(self.study):  # the sampler reads the trials once
            trial = self.study.ask()
            try:
                spec = sample_deferred(self.config.space, self.study, trial)
                cost = self.cost(spec)
            except Exception as exc:
                error = exc
        number = trial.number
        if error is not None:
            # The space's repairs make this unreachable (tests/test_space.py); if a
            # custom space still gets here, fail the trial with a reason and say so.
            self._fail(trial, "invalid_spec", f"sampling failed: {error}")
            raise SearchError(f"the design space produced an invalid spec: {error}"
                              ) from error
        key = self.config.cache_key(spec)
        attrs: dict[str, Any] = {
            "spec": spec.canonical_json(),
            "spec_hash": spec.hash,
            "spec_compact": spec.to_compact(),
            "summary": spec_summary(spec),
            "cache_key": key,
            "target": self.config.target,
            "resolution": spec.resolution if self.config.measure.resolution is None
            else self.config.measure.resolution,
            "params": cost.params,
            "macs": cost.macs // max(1, cost.batch),
            "activation_bytes": cost.activation_bytes,
            "activation_mb": round(cost.activation_bytes / MIB, 4),
            "status": STATUS_PENDING,
        }
        if self.owner:
            attrs["owner"] = self.owner
        constraints = self.cost_constraints(cost)
        for name, value in constraints.items():
            attrs[f"constraint_{name}"] = value
        over = [name for name, value in constraints.items() if value > 0]
        if over:
            # Pre-screened: never measured. Told PRUNED with its constraints: TPE ranks it
            # with the infeasible trials by violation; dashboards show it as Pruned, not
            # as a point on the objective plots (docs/search.md, "Pre-screening").
            attrs.update(status=STATUS_OVER_BUDGET, over_budget=",".join(over), feasible=0)
            write_trial_attrs(self.study, trial, attrs, constraints)
            self.study.tell(number, state=TrialState.PRUNED)
            return Proposal(trial_number=number, spec=spec, cost=cost, cache_key=key,
                            told=True, reason=STATUS_OVER_BUDGET)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None and hit.ok:
                self._record(trial, hit, status=STATUS_CACHED, attrs=attrs)
                return Proposal(trial_number=number, spec=spec, cost=cost, cache_key=key,
                                told=True, reason=STATUS_CACHED)
        screened = self._screen(trial, spec, attrs, constraints)
        if screened:
            return Proposal(trial_number=number, spec=spec, cost=cost, cache_key=key,
                            told=True, reason=STATUS_PREDICTED)
        write_trial_attrs(self.study, trial, attrs)
        return Proposal(trial_number=number, spec=spec, cost=cost, cache_key=key,
                        task=self.config.eval_task(spec))

    # ---- the latency predictor ------------------------------------------------------------

    def features(self, spec: ArchSpec) -> dict[str, float]:
        m = self.config.measure
        return spec_features(spec, m.resolution, m.batch, DTYPE_BYTES[m.dtype])

    def predictor_state(self) -> PredictorState | None:
        """The target's predictor, refitted first when enough measurements arrived."""
        if self.predictor is None:
            return None
        return self.predictor.refit(self.predictor_key, self.config.target, self.policy,
                                    settings=target_settings(self.config.target,
                                                             self.config.measure))

    def _screen(self, trial: optuna.trial.Trial, spec: ArchSpec, attrs: dict[str, Any],
                constraints: dict[str, float]) -> bool:
        """Predict the candidate's latency (figures and intervals go into ``attrs``); tell
        it ``predicted_over_budget`` when the interval lies over a latency budget and the
        predictor is trusted, unless the audit draw says measure it anyway. Enqueued
        (warm-start) trials are always measured."""
        budgets = self.config.latency_budgets()
        if not self.config.predictor or self.predictor is None or not budgets:
            return False
        try:
            st = self.predictor_state()
        except Exception as exc:  # the predictor never stops a search: measure instead
            warnings.warn(f"latency predictor unavailable ({exc})", stacklevel=2)
            return False
        on, why = self.policy.enabled(st)
        if st is None or (st.ratio is None and st.ms is None):
            return False
        preds = st.predict(self.features(spec))
        for name, p in preds.items():
            attrs.update(p.as_attrs(f"predicted_{name}"))
        attrs["predictor_n"] = st.n
        over = over_budget(preds, budgets)
        if not over or "warm_start" in trial.user_attrs:
            return False
        if not on:
            attrs["predictor_off"] = why
            return False
        if audit_draw(self.config.seed, trial.number, self.policy.audit_share):
            attrs["predictor_audit"] = 1
            return False
        cons = dict(constraints)
        for name in budgets:
            if name in preds:
                cons[name] = preds[name].value / budgets[name] - 1.0
                attrs[f"constraint_{name}"] = cons[name]
        attrs.update(status=STATUS_PREDICTED, over_budget=",".join(over), feasible=0)
        write_trial_attrs(self.study, trial, attrs, cons)
        self.study.tell(trial.number, state=TrialState.PRUNED)
        return True

    def _learn(self, trial: optuna.trial.Trial, attrs: dict[str, Any], ms: float,
               ratio: float | None) -> None:
        """Feed a measurement to the target's predictor; when the candidate had been
        predicted first, record the measured-vs-predicted error (the recent error)."""
        if self.predictor is None:
            return
        ua = trial.user_attrs
        obj = self.config.latency_objective
        measured = ratio if obj == "latency_ratio" else ms
        predicted = ua.get(f"predicted_{obj}")
        try:
            if isinstance(predicted, int | float) and measured:
                err = predicted / measured - 1.0
                attrs["predictor_error"] = err
                st = self.predictor.load(self.predictor_key)
                if st is not None:
                    st.recent = [*st.recent, abs(err)][-RECENT_WINDOW:]
                    self.predictor.save(st)
            spec = ArchSpec.model_validate_json(ua["spec"])
            self.predictor.add(self.predictor_key, self.config.target, spec.hash,
                               self.features(spec), ratio, ms)
        except Exception as exc:  # the predictor never stops a search
            warnings.warn(f"latency predictor: cannot record a measurement ({exc})",
                          stacklevel=2)

    # ---- tell -----------------------------------------------------------------------------

    def _frozen(self, trial_number: int) -> FrozenTrial:
        storage = self.study._storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, trial_number)
        return storage.get_trial(trial_id)

    def _trial(self, frozen: FrozenTrial) -> optuna.trial.Trial:
        return optuna.trial.Trial(self.study, frozen._trial_id)

    def tell(self, trial_number: int, outcome: EvalOutcome) -> None:
        """Record an outcome. Idempotent: a trial already finished is left alone."""
        frozen = self._frozen(trial_number)
        if frozen.state.is_finished():
            return
        if outcome.ok and outcome.quality is not None:
            self._store_rungs(frozen, outcome.quality.details.get("rungs") or [])
            if outcome.quality.pruned:
                self._tell_pruned(self._trial(frozen), outcome)
                return
        self._record(self._trial(frozen), outcome, status=STATUS_MEASURED)

    def _record(self, trial: optuna.trial.Trial, outcome: EvalOutcome, status: str,
                attrs: dict[str, Any] | None = None) -> None:
        """Tell an outcome. ``attrs`` (not yet written, from :meth:`ask`) are written in
        the same transaction as the outcome's own."""
        number = trial.number
        pending = dict(attrs or {})

        def fail(reason: str, message: str, seconds: float | None = None) -> None:
            self._fail(trial, reason, message, seconds=seconds, attrs=pending)

        if not outcome.ok:
            failure = outcome.failure
            fail(failure.reason if failure else "runtime_error",
                 failure.message if failure else "evaluation failed without a reason",
                 seconds=outcome.seconds)
            return
        lat = outcome.latency
        if lat is None:
            fail("runtime_error", "the outcome has no latency measurement")
            return
        budgets = self.config.budgets
        stored = {**trial.user_attrs, **pending}
        constraints = {name: float(stored[f"constraint_{name}"])
                       for name in budgets.cost_limits() if f"constraint_{name}" in stored}
        ratio = lat.ratio_to_reference.median if lat.ratio_to_reference else None
        try:
            constraints.update(self.latency_violations(lat))
        except ValueError as exc:
            fail("runtime_error", str(exc))
            return
        quality_skipped = False
        if self.config.quality.signal == "none" or outcome.quality is None:
            quality = 0.0
            if self.config.quality.signal != "none":
                if not (self.needs_training() and any(v > 0 for v in constraints.values())):
                    fail("runtime_error", "the outcome has no quality value")
                    return
                quality_skipped = True  # over a budget: never trained
        else:
            quality = float(outcome.quality.value)
        if not math.isfinite(quality):
            fail("runtime_error", f"quality is not finite ({quality})")
            return
        max_cv = self.config.measure.max_cv
        spread = max(lat.latency_ms.cv, lat.ratio_to_reference.cv if lat.ratio_to_reference
                     else 0.0)
        new: dict[str, Any] = {
            "status": status,
            "quality": quality,
            "latency_ms": lat.latency_ms.median,
            "latency_p90_ms": lat.latency_ms.p90,
            "latency_iqr_ms": lat.latency_ms.iqr,
            "latency_cv": lat.latency_ms.cv,
            "latency_n": lat.latency_ms.n,
            "contended": int(bool(lat.contended)),
            "remeasured": int(bool(lat.remeasured)),
            # still wider than max_cv after the remeasurements: a figure to treat with care
            "wide": int(spread > max_cv),
            "runtime": lat.runtime,
            "device": lat.device,
            "eval_seconds": outcome.seconds,
        }
        if ratio is not None:
            new["latency_ratio"] = ratio
            new["latency_ratio_cv"] = lat.ratio_to_reference.cv
            new["reference"] = lat.reference
            if lat.reference_latency_ms is not None:
                new["reference_latency_ms"] = lat.reference_latency_ms.median
        if outcome.quality is not None:
            new["quality_signal"] = outcome.quality.signal
            new["quality_seconds"] = outcome.quality.seconds
        if quality_skipped:
            new["quality_skipped"] = 1
        if lat.notes:
            new["latency_notes"] = "; ".join(lat.notes)[:2000]
        if lat.stopping is not None:
            # budget-aware measurement: how many rounds it took and why it stopped
            new["latency_rounds"] = lat.stopping.rounds
            new["latency_stop"] = lat.stopping.reason
        if outcome.evaluator is not None:
            new["evaluator"] = outcome.evaluator.mode
            new["evaluator_fresh"] = int(outcome.evaluator.fresh)
        for name, value in constraints.items():
            new[f"constraint_{name}"] = value
        new["feasible"] = int(all(v <= 0 for v in constraints.values()))
        new["latency_objective"] = self.config.latency_objective
        pending.update(new)
        objective = ratio if self.config.latency_objective == "latency_ratio" else None
        objective = lat.latency_ms.median if objective is None else objective
        if status == STATUS_MEASURED:
            self._learn(trial, pending, lat.latency_ms.median, ratio)
        write_trial_attrs(self.study, trial, pending, constraints)
        if status == STATUS_MEASURED and self.cache is not None:
            key = stored.get("cache_key")
            if key:
                self.cache.put(key, outcome)
        if new["feasible"]:
            self.study.tell(number, [quality, objective])
        else:
            # Measured over a latency budget: PRUNED with its constraints and figures as
            # attributes. TPE ranks it with the infeasible trials by violation exactly as a
            # COMPLETE one; optuna-dashboard, which picks "best trials" from every COMPLETE
            # trial without a look at constraints, never tags it best (docs/search.md).
            self.study.tell(number, state=TrialState.PRUNED)

    # ---- latency first, then training ------------------------------------------------------
    #
    # A signal that trains ('train') is the expensive part of a candidate and runs
    # elsewhere (a trainer, not the device): the candidate's latency is measured first,
    # and only a candidate within every latency budget is trained. One path for the
    # service (two tasks, two workers) and for ``fitnas search`` (both in its process).

    def needs_training(self) -> bool:
        return self.config.quality.signal == "train"

    def split_task(self, task: EvalTask) -> tuple[EvalTask, EvalTask | None]:
        """(the latency part, the training part); the second is None when the signal does
        not train (then the first is the task itself: proxies run beside the
        measurement)."""
        if not self.needs_training() or task.quality is None:
            return task, None
        return (task.model_copy(update={"quality": None}),
                task.model_copy(update={"measure": None, "budget": None}))

    def latency_violations(self, lat: Any) -> dict[str, float]:
        """The latency constraints of a measurement (``value / budget - 1``; > 0 is over).
        Raises ValueError for a ratio budget without a ratio."""
        budgets = self.config.budgets
        out: dict[str, float] = {}
        if budgets.max_latency_ms is not None:
            out["latency_ms"] = lat.latency_ms.median / budgets.max_latency_ms - 1.0
        if budgets.max_latency_ratio is not None:
            if lat.ratio_to_reference is None:
                raise ValueError("a relative latency budget, but no ratio to the reference "
                                 "came back")
            out["latency_ratio"] = (lat.ratio_to_reference.median
                                    / budgets.max_latency_ratio - 1.0)
        return out

    def worth_training(self, latency: EvalOutcome) -> bool:
        """A latency outcome whose candidate goes on to training: measured, within every
        latency budget. Anything else is told as it is (failed, or over a budget: PRUNED
        with ``quality_skipped``) and never trained."""
        if not self.needs_training() or not latency.ok or latency.latency is None:
            return False
        try:
            return all(v <= 0 for v in self.latency_violations(latency.latency).values())
        except ValueError:
            return False

    @staticmethod
    def combine_outcomes(latency: EvalOutcome, quality: EvalOutcome) -> EvalOutcome:
        """One trial's outcome from its latency task's and its training task's."""
        seconds = latency.seconds + quality.seconds
        if not latency.ok:
            return latency
        if not quality.ok:
            return EvalOutcome(ok=False, latency=latency.latency, quality=quality.quality,
                               failure=quality.failure, seconds=seconds,
                               evaluator=latency.evaluator)
        return EvalOutcome(ok=True, latency=latency.latency, quality=quality.quality,
                           seconds=seconds, evaluator=latency.evaluator)

    # ---- multi-fidelity: rung values and pruning ------------------------------------------
    #
    # Optuna's Trial.report / should_prune refuse multi-objective studies, and its TPE
    # sampler cannot rank a PRUNED trial that has intermediate values in a multi-objective
    # study (it asks for the single direction). So the rung values are a user attribute,
    # ``rungs`` ([[step, value], ...], shown by dashboards), and the pruner is asked with a
    # single-objective view of the study (quality, maximized) whose trials carry those
    # values as their intermediate values. The pruners only read trials and intermediate
    # values (successive halving also writes its rung marks as system attributes).

    def make_pruner(self) -> optuna.pruners.BasePruner | None:
        """The configured pruner, or None (no pruning, or a single-fidelity signal)."""
        if self.config.pruner == "none" or self.config.quality.signal != "train":
            return None
        if self.config.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
        if self.config.pruner == "hyperband":
            from search.pruners import QualityHyperband

            return QualityHyperband(
                min_resource=self.config.quality.rung_steps()[0],
                max_resource=self.config.quality.steps,
                reduction_factor=self.config.pruner_reduction_factor,
                study_name=self.study.study_name)
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=self.config.quality.rung_steps()[0],
            reduction_factor=self.config.pruner_reduction_factor,
            min_early_stopping_rate=0)

    def report_rung(self, trial_number: int, step: int, value: float) -> bool:
        """Record ``value`` (the quality at ``step``) with the trial and ask the pruner:
        True when the evaluation should go on, False to stop it (pruned). This is the
        callback the runner's ``on_progress`` calls."""
        frozen = self._frozen(trial_number)
        if frozen.state.is_finished():
            return False
        self._store_rungs(frozen, [[int(step), float(value)]])
        if getattr(self, "_pruner", None) is None:
            self._pruner = self.make_pruner()
        if self._pruner is None:
            return True
        trial = _with_rungs(self._frozen(trial_number))
        return not self._pruner.prune(_QualityView(self.study), trial)

    def _store_rungs(self, frozen: FrozenTrial, rungs: list) -> None:
        """The rungs as the ``rungs`` user attribute (what the pruners read, through
        :class:`_QualityView`) and as Optuna intermediate values (what optuna-dashboard
        plots). Intermediate values are safe in this multi-objective study because a trial
        the pruner stops is told with a ``pruned`` constraint (:meth:`_tell_pruned`): TPE
        ranks it with the infeasible trials and never reads its intermediate values."""
        known = {int(s): float(v) for s, v in frozen.user_attrs.get("rungs", [])}
        merged = {**known, **{int(s): float(v) for s, v in rungs}}
        if merged != known:
            storage = self.study._storage
            storage.set_trial_user_attr(
                frozen._trial_id, "rungs", [[s, merged[s]] for s in sorted(merged)])
            for step in sorted(set(merged) - set(known)):
                if math.isfinite(merged[step]):
                    storage.set_trial_intermediate_value(frozen._trial_id, step,
                                                         merged[step])

    def _tell_pruned(self, trial: optuna.trial.Trial, outcome: EvalOutcome) -> None:
        """A candidate the pruner stopped: PRUNED, with its last rung's value and its
        latency as user attributes (not a point of the Pareto front, not cached)."""
        quality = outcome.quality
        attrs: dict[str, Any] = {
            "status": STATUS_PRUNED,
            "quality": float(quality.value),
            "quality_signal": quality.signal,
            "quality_seconds": quality.seconds,
            "pruned_at_step": int(quality.details.get("steps", 0)),
            "planned_steps": int(quality.details.get("planned_steps", 0)),
            "eval_seconds": outcome.seconds,
            "feasible": 0,
        }
        lat = outcome.latency
        constraints = self._stored_cost_constraints(trial)
        if lat is not None:
            attrs["latency_ms"] = lat.latency_ms.median
            if lat.ratio_to_reference is not None:
                attrs["latency_ratio"] = lat.ratio_to_reference.median
            with contextlib.suppress(ValueError):
                constraints.update(self.latency_violations(lat))
        # stopped by the pruner: infeasible for TPE, which then ranks it by violation and
        # never reads the intermediate values (it cannot in a multi-objective study)
        constraints["pruned"] = 1.0
        for name, value in constraints.items():
            attrs[f"constraint_{name}"] = value
        write_trial_attrs(self.study, trial, attrs, constraints)
        self.study.tell(trial.number, state=TrialState.PRUNED)

    def _stored_cost_constraints(self, trial: optuna.trial.Trial) -> dict[str, float]:
        attrs = trial.user_attrs
        out = {}
        for name in self.config.budgets.cost_limits():
            value = attrs.get(f"constraint_{name}")
            if value is not None:
                out[name] = float(value)
        return out

    def _fail(self, trial: optuna.trial.Trial, reason: str, message: str,
              seconds: float | None = None, status: str = STATUS_FAILED,
              attrs: dict[str, Any] | None = None) -> None:
        out = dict(attrs or {})
        out.update(status=status, fail_reason=reason, fail_message=message[:2000], feasible=0)
        if seconds is not None:
            out["eval_seconds"] = seconds
        write_trial_attrs(self.study, trial, out)
        self.study.tell(trial.number, state=TrialState.FAIL)

    def fail_stale(self, trial_numbers: Iterable[int], reason: str = "interrupted",
                   message: str = "the search stopped before this trial finished") -> list[int]:
        """Tell FAIL for those of ``trial_numbers`` still RUNNING; returns the ones told."""
        told = []
        for number in trial_numbers:
            frozen = self._frozen(number)
            if frozen.state != TrialState.RUNNING:
                continue
            status = STATUS_INTERRUPTED if reason == "interrupted" else STATUS_FAILED
            self._fail(self._trial(frozen), reason, message, status=status)
            told.append(number)
        return told

    def stale_local_trials(self) -> list[int]:
        """RUNNING trials whose local owner process is gone (or that have no owner)."""
        return [t.number for t in self.trials(TrialState.RUNNING)
                if not owner_alive(t.user_attrs.get("owner"))]

    # ---- reading --------------------------------------------------------------------------

    def trials(self, *states: TrialState) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states or None)

    @staticmethod
    def counts_as_finished(t: FrozenTrial) -> bool:
        """Finished trials count toward ``trials``, except those failed by an interruption
        (the resumed search does them again)."""
        if not t.state.is_finished():
            return False
        return not (t.state == TrialState.FAIL
                    and t.user_attrs.get("status") == STATUS_INTERRUPTED)

    def n_finished(self) -> int:
        return sum(1 for t in self.trials() if self.counts_as_finished(t))

    def n_running(self) -> int:
        return len(self.trials(TrialState.RUNNING))

    @staticmethod
    def is_feasible(t: FrozenTrial) -> bool:
        return (t.state == TrialState.COMPLETE and t.values is not None
                and all(v <= 0 for v in t.constraints.values()))

    def measured(self) -> list[FrozenTrial]:
        """Trials with a measurement (measured or from the cache), feasible (COMPLETE) or
        over a latency budget (PRUNED, figures in the user attributes)."""
        return [t for t in self.trials(TrialState.COMPLETE, TrialState.PRUNED)
                if t.user_attrs.get("status") in (STATUS_MEASURED, STATUS_CACHED)
                and isinstance(t.user_attrs.get("quality"), int | float)]

    def feasible(self) -> list[FrozenTrial]:
        return [t for t in self.trials(TrialState.COMPLETE) if self.is_feasible(t)]

    def best_feasible(self) -> FrozenTrial | None:
        """The feasible trial of highest quality (ties: lower latency, then earlier)."""
        feasible = self.feasible()
        if not feasible:
            return None
        return min(feasible, key=lambda t: (-t.values[0], t.values[1], t.number))

    def pareto(self) -> list[FrozenTrial]:
        """Feasible, non-dominated trials (max quality, min latency), one per spec,
        sorted by latency."""
        by_hash: dict[str, FrozenTrial] = {}
        for t in sorted(self.feasible(), key=lambda t: t.number):
            by_hash.setdefault(t.user_attrs.get("spec_hash", str(t.number)), t)
        cands = sorted(by_hash.values(), key=lambda t: (t.values[1], -t.values[0], t.number))
        front: list[FrozenTrial] = []
        best_q = -math.inf
        for t in cands:
            if t.values[0] > best_q:
                front.append(t)
                best_q = t.values[0]
        return front

    def recommend(self) -> FrozenTrial | None:
        """The recommended architecture: on the feasible Pareto front, the highest quality
        (every member already meets every budget); ties go to the faster."""
        front = self.pareto()
        if not front:
            return None
        return min(front, key=lambda t: (-t.values[0], t.values[1], t.number))

    def spec_of(self, t: FrozenTrial) -> ArchSpec:
        return ArchSpec.model_validate_json(t.user_attrs["spec"])


def _with_rungs(t: FrozenTrial) -> FrozenTrial:
    """A copy of ``t`` whose intermediate values are its recorded rungs."""
    rungs = t.user_attrs.get("rungs")
    if not rungs:
        return t
    copy = FrozenTrial(
        number=t.number, state=t.state, value=None, values=t.values,
        datetime_start=t.datetime_start, datetime_complete=t.datetime_complete,
        params=t.params, distributions=t.distributions, user_attrs=t.user_attrs,
        system_attrs=t.system_attrs, intermediate_values={int(s): float(v) for s, v in rungs},
        trial_id=t._trial_id)
    return copy


class _QualityView:
    """The study as a single-objective one (quality, maximized) for Optuna's pruners."""

    direction = optuna.study.StudyDirection.MAXIMIZE

    def __init__(self, study: optuna.Study):
        self._study = study
        self._storage = study._storage
        self._study_id = study._study_id

    def get_trials(self, deepcopy: bool = True,
                   states: Iterable[TrialState] | None = None) -> list[FrozenTrial]:
        trials = self._study.get_trials(deepcopy=False,
                                        states=tuple(states) if states else None)
        return [_with_rungs(t) for t in trials]


__all__ = [
    "DIRECTIONS",
    "METRIC_NAMES",
    "REFERENCE_PRESETS",
    "Budgets",
    "MeasurementCache",
    "Proposal",
    "SQLMeasurementCache",
    "SearchConfig",
    "SearchDriver",
    "SearchError",
    "make_sampler",
    "make_storage",
    "named_constraints",
    "owner_alive",
    "process_owner",
    "redact_url",
    "write_trial_attrs",
]
