"""Prometheus metrics.

Two kinds:

* counters and histograms kept by this process (trials completed, lease expiries,
  measurement seconds, results accepted): Prometheus sums them over API replicas;
* gauges read from the database at scrape time (queue depth and leased tasks per target,
  live workers per target, jobs per status), so every replica reports the same truth.

Each app gets its own registry (tests build many apps in one process).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from service.db import Database, utcnow
from service.models import Job, Task, Worker
from service.states import IN_FLIGHT, TaskState

log = logging.getLogger("fitnas.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The *_created series double the output and no dashboard here uses them.
disable_created_metrics()


class _DBCollector:
    def __init__(self, db: Database, worker_timeout_s: float) -> None:
        self.db = db
        self.worker_timeout_s = worker_timeout_s

    def collect(self):
        queue = GaugeMetricFamily(
            "fitnas_queue_depth", "Measurement tasks waiting for a worker", labels=["target"]
        )
        leased = GaugeMetricFamily(
            "fitnas_tasks_leased", "Measurement tasks held by a worker", labels=["target"]
        )
        workers = GaugeMetricFamily(
            "fitnas_workers_live", "Workers with a recent heartbeat", labels=["target"]
        )
        jobs = GaugeMetricFamily("fitnas_jobs", "Jobs by status", labels=["status"])
        up = GaugeMetricFamily("fitnas_database_up", "1 when the database answered the scrape")
        try:
            since = utcnow() - timedelta(seconds=self.worker_timeout_s)

            def read(s):
                tasks = s.execute(
                    select(Task.target, Task.state, func.count())
                    .where(Task.state.in_(IN_FLIGHT))
                    .group_by(Task.target, Task.state)
                ).all()
                live = s.execute(
                    select(Worker.target, func.count())
                    .where(Worker.last_heartbeat_at >= since)
                    .group_by(Worker.target)
                ).all()
                by_status = s.execute(select(Job.status, func.count()).group_by(Job.status)).all()
                return tasks, live, by_status

            tasks, live, by_status = self.db.run(read, write=False)
        except Exception as exc:  # a scrape must not fail because the DB is down
            log.warning("metrics: database unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        for target, state, n in tasks:
            (queue if state == TaskState.QUEUED else leased).add_metric([target], n)
        for target, n in live:
            workers.add_metric([target], n)
        for status, n in by_status:
            jobs.add_metric([status], n)
        up.add_metric([], 1)
        yield from (queue, leased, workers, jobs, up)


class Metrics:
    def __init__(self, db: Database | None = None, worker_timeout_s: float = 45.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.trials_completed = Counter(
            "fitnas_trials_completed",
            "Trials finished, by how (measured, cached, over_budget, failed, interrupted)",
            ["target", "how"],
            registry=r,
        )
        self.lease_expiries = Counter(
            "fitnas_lease_expiries",
            "Leases that expired without a heartbeat",
            ["target", "outcome"],
            registry=r,
        )
        self.results = Counter(
            "fitnas_task_results", "Task reports received", ["target", "kind"], registry=r
        )
        self.measurement_seconds = Histogram(
            "fitnas_measurement_seconds",
            "Seconds a worker spent on one evaluation (as reported)",
            ["target"],
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.scheduler_ticks = Counter(
            "fitnas_scheduler_ticks", "Scheduler ticks run by this process", registry=r
        )
        self.scheduler_errors = Counter(
            "fitnas_scheduler_errors", "Errors while driving a job", registry=r
        )
        if db is not None:
            r.register(_DBCollector(db, worker_timeout_s))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Inert:
    """A counter or histogram that records nothing."""

    def labels(self, *_values: str) -> _Inert:
        return self

    def inc(self, _amount: float = 1) -> None:
        pass

    def observe(self, _value: float) -> None:
        pass


class NullMetrics:
    """The metrics interface of :class:`Metrics`, counting nothing: a scheduler or an app
    built without a registry uses it, so callers never check for ``None``."""

    def __init__(self) -> None:
        inert = _Inert()
        self.trials_completed = self.lease_expiries = self.results = inert
        self.measurement_seconds = self.scheduler_ticks = self.scheduler_errors = inert

    def render(self) -> bytes:
        return b""
