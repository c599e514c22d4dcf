"""Optuna storage for the service, and JSON views of trials.

One RDB storage object per process and URL (engine creation and Optuna's schema check
are not free); Optuna's own caching layer only caches finished trials, which never
change, so several API replicas may share the storage safely.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any

from service.db import json_safe

_LOCK = threading.Lock()
_STORAGES: dict[str, Any] = {}

# user attributes copied to the top level of a trial view (the rest stay in user_attrs)
SUMMARY_ATTRS = (
    "status",
    "spec_hash",
    "spec_compact",
    "summary",
    "params",
    "macs",
    "activation_bytes",
    "quality",
    "latency_ms",
    "latency_p90_ms",
    "latency_cv",
    "latency_ratio",
    "contended",
    "fail_reason",
    "fail_message",
    "over_budget",
)


def get_storage(url: str):
    """A shared ``optuna.storages.RDBStorage`` for ``url`` (WAL on SQLite files)."""
    with _LOCK:
        storage = _STORAGES.get(url)
        if storage is None:
            from search.study import make_storage

            storage = make_storage(url)
            if url.startswith("sqlite"):
                _sqlite_synchronous_normal(storage.engine)
            _STORAGES[url] = storage
        return storage


def _sqlite_synchronous_normal(engine) -> None:
    """WAL with synchronous=NORMAL (as for the fitnas database): a commit no longer
    waits for an fsync, which halves the cost of Optuna's many small commits per trial.
    Still consistent and safe against process crashes; an OS crash or power loss may
    roll back the last commits."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.execute("PRAGMA synchronous = NORMAL")

    engine.dispose()  # connections made before the listener reconnect with it


def forget_storage(url: str) -> None:
    with _LOCK:
        storage = _STORAGES.pop(url, None)
    if storage is not None:
        with contextlib.suppress(Exception):  # best effort on shutdown
            storage.engine.dispose()


def load_study(url: str, study_name: str):
    """The job's study, or None when the scheduler has not opened it yet."""
    import optuna

    storage = get_storage(url)
    try:
        storage.get_study_id_from_name(study_name)
    except KeyError:
        return None
    return optuna.load_study(study_name=study_name, storage=storage)


def is_feasible(t) -> bool:
    from optuna.trial import TrialState

    return (
        t.state == TrialState.COMPLETE
        and t.values is not None
        and all(v <= 0 for v in (t.constraints or {}).values())
    )


def named_constraints(t) -> dict[str, float]:
    from search.study import named_constraints as by_name

    return by_name(t)


def trial_view(t, *, include_spec: bool = False, include_attrs: bool = True) -> dict[str, Any]:
    """A JSON-able summary of an Optuna FrozenTrial made by the search driver."""
    attrs = dict(t.user_attrs)
    view: dict[str, Any] = {
        "number": t.number,
        "state": t.state.name,
        "values": (
            {"quality": t.values[0], attrs.get("latency_objective", "latency_ms"): t.values[1]}
            if t.values is not None and len(t.values) == 2
            else None
        ),
        "feasible": is_feasible(t),
        "constraints": named_constraints(t),
        "params_sampled": dict(t.params),
        "datetime_start": t.datetime_start,
        "datetime_complete": t.datetime_complete,
    }
    for key in SUMMARY_ATTRS:
        if key in attrs:
            view[key] = attrs[key]
    spec = attrs.pop("spec", None)
    if include_spec and spec is not None:
        view["spec"] = json.loads(spec) if isinstance(spec, str) else spec
    if include_attrs:
        view["user_attrs"] = attrs
    return json_safe(view)


def summarize(t) -> dict[str, Any]:
    """The stored form of a trial in ``best``/``pareto``/``winner``."""
    return trial_view(t, include_spec=True, include_attrs=False)
