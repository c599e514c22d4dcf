"""The scheduler: drives every active job through ``search.study.SearchDriver`` (the one
search loop) with measurement done by remote workers.

All state lives in the database; a tick can run in any API replica:

1. reap leases that expired without a heartbeat (re-queue, or fail after max attempts).
   After a tick that failed (the database was away) and on a scheduler's first tick,
   every lease first gets a full lease from now: the workers' heartbeats were refused
   meanwhile, so an expiry says nothing about them (an outage spends no attempt);
2. for each active job, claim its scheduling lock (an atomic ``UPDATE fitnas_jobs SET
   lock_owner = me ... WHERE lock_expires_at < now``, portable to SQLite and PostgreSQL),
   so two replicas never drive the same job at once. The lock is short
   (``scheduler_lock_s``, 10 s) and renewed by a thread every third of it while the job
   is driven: a replica that dies holding it stalls the job for at most that long. Every
   write made under the lock re-checks it in its own transaction (``_renew``), so a
   replica that was paused past its lock changes nothing once another took over;
3. tell Optuna every task that finished (result stored by a worker, or failed for good),
   then mark it told (telling is idempotent, so a crash between the two is harmless);
4. fail RUNNING trials no task owns (asked by a replica that died before queueing them;
   they are "interrupted" and do not count, so the job asks again);
5. ask for new trials while the job's in-flight tasks are below its parallelism, bounded
   by the live workers of its target (at least one task stays queued so a new worker finds
   work at once). Pre-screened (over budget) and cached trials are told by the driver
   inside ``ask``; the rest become queued tasks, inserted only while the lock is still
   ours;
6. update progress and the best feasible trial; when N trials are finished and nothing
   is in flight, store the Pareto set and the recommended winner and complete the job.
   A cancelled job is finalized the same way with what it has.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from search.evaluators.types import EvalOutcome, Failure
from service import jobs, leases
from service.api.metrics import NullMetrics
from service.cache import DBMeasurementCache
from service.db import Database, utcnow
from service.leases import Reaped, live_workers, reap_expired
from service.models import Job, Task
from service.states import ACTIVE_JOB, FINISHED, IN_FLIGHT, JobStatus, TaskKind, TaskState
from service.studies import get_storage, is_feasible, load_study, summarize

if TYPE_CHECKING:  # for annotations only
    from optuna.trial import FrozenTrial

    from search.study import Proposal, SearchDriver
    from service.api.metrics import Metrics
    from service.settings import Settings

log = logging.getLogger("fitnas.scheduler")

MAX_CONSECUTIVE_ERRORS = 5


class LockLost(RuntimeError):
    """Another replica holds this job's scheduling lock now."""


class StorageUnavailable(RuntimeError):
    """The Optuna storage cannot be opened (counts as a transient error)."""


@dataclass
class JobTick:
    job_id: str
    told: int = 0
    asked: int = 0
    queued: int = 0
    cached: int = 0
    over_budget: int = 0
    stale_failed: int = 0
    finalized: bool = False
    status: str | None = None


@dataclass
class TickReport:
    reaped: list[Reaped] = field(default_factory=list)
    jobs: dict[str, JobTick] = field(default_factory=dict)
    skipped_locked: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


class ErrorLog:
    """Logs each distinct error once per ``interval_s`` (with its traceback the first
    time only), then how many times it recurred meanwhile: a failing database is a few
    lines a minute, not a traceback every tick."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 clock: Any = time.monotonic) -> None:
        self.log, self.interval_s, self._clock = logger, interval_s, clock
        self._seen: dict[str, tuple[float, int]] = {}
        self._traced: set[str] = set()

    def error(self, what: str, exc: BaseException) -> bool:
        """Log ``what: exc`` unless the same error was logged within the interval;
        returns whether it was logged."""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        key = f"{what}: {type(exc).__name__}: {text}"[:500]
        now = self._clock()
        last, repeats = self._seen.get(key, (None, 0))
        if last is not None and now - last < self.interval_s:
            self._seen[key] = (last, repeats + 1)
            return False
        self._seen[key] = (now, 0)
        more = f" (and {repeats} more time(s) in the last {self.interval_s:.0f} s)" \
            if repeats else ""
        trace = key not in self._traced
        self._traced.add(key)
        self.log.error("%s%s", key, more, exc_info=exc if trace else None)
        return True


class LockKeeper(threading.Thread):
    """Renews one job's scheduling lock every ``every_s`` while it is driven. A renewal
    that matches nothing (the lock was taken over) stops it; the drive's own conditional
    writes then fail with :class:`LockLost`."""

    def __init__(self, db: Database, job_id: str, owner: str, lock_s: float) -> None:
        super().__init__(name=f"lock-{job_id}", daemon=True)
        self.db, self.job_id, self.owner, self.lock_s = db, job_id, owner, lock_s
        self.renewals = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.lock_s / 3):
            def op(s: Session) -> int:
                expires = utcnow() + timedelta(seconds=self.lock_s)
                return s.execute(
                    update(Job).where(Job.id == self.job_id, Job.lock_owner == self.owner)
                    .values(lock_expires_at=expires)
                ).rowcount

            try:
                if self.db.run(op) != 1:
                    return
                self.renewals += 1
            except Exception as exc:  # the next renewal retries; the lock may expire
                log.warning("could not renew the lock of job %s: %s", self.job_id, exc)

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join(5.0)


def inflight_cap(parallelism: int, live_workers: int) -> int:
    """Tasks a job keeps queued or leased: one more than its live workers (so that a
    worker finds its next task queued while its last result is being told), never more
    than the job's parallelism, and one while no worker is live (it waits for the first)."""
    return max(1, min(parallelism, live_workers + 1))


class Scheduler:
    def __init__(self, db: Database, settings: Settings,
                 metrics: Metrics | NullMetrics | None = None, owner: str | None = None) -> None:
        self.db = db
        self.settings = settings
        self.metrics = metrics if metrics is not None else NullMetrics()
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.optuna_url = settings.optuna_url
        self._drivers: dict[str, SearchDriver] = {}
        self._errors: dict[str, int] = {}
        self.error_log = ErrorLog(log)
        self._heard = False  # False until a tick got through (and after one that did not)
        # One thread of this process drives a job at a time: the database lock admits its
        # owner again, so two threads of one scheduler (the loop, and a tick called by
        # hand) would otherwise both drive it and tell its trials twice.
        self._driving: dict[str, threading.Lock] = {}
        self._driving_guard = threading.Lock()
        # Called (from the scheduler's thread) after a tick queued tasks: the API wakes
        # this process's waiting long polls (service/api/doorbell.py).
        self.on_queued: Callable[[], None] | None = None

    # ---- the tick ---------------------------------------------------------------------

    def tick(self) -> TickReport:
        """One pass over every job. A tick that fails (the database is away) is counted
        in ``fitnas_scheduler_errors_total``, logged through :class:`ErrorLog`, and
        raised to the caller."""
        self.metrics.scheduler_ticks.inc()
        try:
            return self._tick()
        except Exception as exc:
            self._heard = False
            self.metrics.scheduler_errors.inc()
            self.error_log.error("scheduler tick failed", exc)
            raise

    def _tick(self) -> TickReport:
        report = TickReport()
        if not self._heard:
            extended = leases.extend_live_leases(self.db, self.settings.lease_timeout_s)
            if extended:
                log.info("gave %d lease(s) a fresh lease: their heartbeats may have been "
                         "refused while the database was unreachable", extended)
            self._heard = True
        report.reaped = reap_expired(self.db, self.settings.max_attempts)
        for r in report.reaped:
            self.metrics.lease_expiries.labels(
                r.target, "requeued" if r.requeued else "failed"
            ).inc()
            log.info(
                "lease of task %s (job %s) expired: %s", r.task_id, r.job_id,
                "re-queued" if r.requeued else "attempts exhausted, trial fails",
            )
        for job_id in self._candidates():
            with self._driving_guard:
                here = self._driving.setdefault(job_id, threading.Lock())
            if not here.acquire(blocking=False):  # another thread of ours drives it now
                report.skipped_locked.append(job_id)
                continue
            try:
                self._drive_locked(job_id, report)
            finally:
                here.release()
        return report

    def _drive_locked(self, job_id: str, report: TickReport) -> None:
        if not self._claim(job_id):
            report.skipped_locked.append(job_id)
            return
        keeper = LockKeeper(self.db, job_id, self.owner, self.settings.scheduler_lock_s)
        keeper.start()
        try:
            report.jobs[job_id] = tick = self._drive(job_id)
            self._errors.pop(job_id, None)
        except LockLost:
            report.skipped_locked.append(job_id)
        except Exception as exc:  # one job's trouble must not stop the others
            self._job_error(job_id, exc)
            report.errors[job_id] = f"{type(exc).__name__}: {exc}"
        else:
            if tick.queued and self.on_queued is not None:
                with contextlib.suppress(Exception):
                    self.on_queued()
        finally:
            keeper.stop()
            self._release(job_id)

    def run_until_idle(self, max_ticks: int = 1000) -> TickReport:
        """Tick until no job changes (tests and tools)."""
        last = TickReport()
        for _ in range(max_ticks):
            last = self.tick()
            busy = any(
                j.told or j.asked or j.stale_failed or j.finalized for j in last.jobs.values()
            )
            if not busy and not last.reaped:
                break
        return last

    # ---- locking ------------------------------------------------------------------------

    def _candidates(self) -> list[str]:
        def read(s: Session) -> list[str]:
            return list(
                s.execute(
                    select(Job.id)
                    .where(
                        or_(
                            Job.status.in_(ACTIVE_JOB),
                            (Job.status == JobStatus.CANCELLED) & Job.finalized_at.is_(None),
                        )
                    )
                    .order_by(Job.created_at)
                ).scalars()
            )

        return self.db.run(read, write=False)

    def _claim(self, job_id: str) -> bool:
        now = utcnow()
        expires = now + timedelta(seconds=self.settings.scheduler_lock_s)

        def op(s: Session) -> bool:
            return (
                s.execute(
                    update(Job)
                    .where(
                        Job.id == job_id,
                        or_(
                            Job.lock_expires_at.is_(None),
                            Job.lock_expires_at < now,
                            Job.lock_owner == self.owner,
                        ),
                    )
                    .values(lock_owner=self.owner, lock_expires_at=expires)
                ).rowcount
                == 1
            )

        return self.db.run(op)

    def _release(self, job_id: str) -> None:
        def op(s: Session) -> None:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lock_owner == self.owner)
                .values(lock_owner=None, lock_expires_at=None)
            )

        try:
            self.db.run(op)
        except Exception as exc:  # the lock expires by itself
            log.warning("could not release the lock of job %s: %s", job_id, exc)

    def _renew(self, s: Session, job_id: str, *, running: bool = False) -> None:
        """Extend our lock (in the caller's transaction); LockLost if it is not ours any
        more, or, with ``running``, if the job stopped running (cancelled meanwhile)."""
        expires = utcnow() + timedelta(seconds=self.settings.scheduler_lock_s)
        cond = [Job.id == job_id, Job.lock_owner == self.owner]
        if running:
            cond.append(Job.status == JobStatus.RUNNING)
        rc = s.execute(update(Job).where(*cond).values(lock_expires_at=expires)).rowcount
        if rc != 1:
            raise LockLost(job_id)

    def _job_error(self, job_id: str, exc: Exception) -> None:
        from search.study import SearchError

        self.metrics.scheduler_errors.inc()
        n = self._errors.get(job_id, 0) + 1
        self._errors[job_id] = n
        # a database or storage outage is the server's trouble, never the job's
        infra = isinstance(exc, DBAPIError | StorageUnavailable)
        fatal = isinstance(exc, SearchError) or (not infra and n >= MAX_CONSECUTIVE_ERRORS)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if fatal or isinstance(exc, SearchError):
            log.error("job %s: %s (%d in a row)%s", job_id, msg, n,
                      "; failing the job" if fatal else "")
        else:
            self.error_log.error(f"job {job_id}", exc)
        now = utcnow()

        def op(s: Session) -> None:
            jobs.record_error(s, job_id, msg[:4000], now, fatal=fatal)

        try:
            self.db.run(op)
        except Exception as again:  # the DB itself is failing; next tick retries
            self.error_log.error(f"could not record the error of job {job_id}", again)
        if fatal:
            self._drivers.pop(job_id, None)

    # ---- driving one job ------------------------------------------------------------------

    def _driver(self, job: Job) -> SearchDriver:
        from search.study import SearchConfig, SearchDriver

        driver = self._drivers.get(job.id)
        if driver is None:
            from search.study import SearchError

            config = SearchConfig.model_validate(job.config)
            cache = DBMeasurementCache(self.db, target=job.target, job_id=job.id)
            try:
                storage = get_storage(self.optuna_url)
            except SearchError as exc:
                # the storage is unreachable: a server problem, not the job's; retried
                raise StorageUnavailable(str(exc)) from exc
            from search.predictor import PredictorStore

            driver = SearchDriver.open(
                storage, job.study_name, config, cache, mode="service", owner=self.owner,
                predictor=PredictorStore(self.db.engine, create=False),
            )
            self._drivers[job.id] = driver
        return driver

    def _count(self, how: str, target: str, n: int = 1) -> None:
        if n:
            self.metrics.trials_completed.labels(target, how).inc(n)

    def _drive(self, job_id: str) -> JobTick:
        tick = JobTick(job_id)
        job = self.db.run(lambda s: s.get(Job, job_id), write=False)
        if job is None:
            return tick
        if (
            job.status == JobStatus.CANCELLED
            and job.started_at is None
            and load_study(self.optuna_url, job.study_name) is None
        ):
            # cancelled before its study was ever opened: nothing to tell
            self._mark_cancelled_told(job_id)
            self._finalize(job, None, tick)
            return tick
        driver = self._driver(job)
        if job.status == JobStatus.QUEUED:
            now = utcnow()

            def start(s: Session) -> None:
                self._renew(s, job_id)
                jobs.start(s, job_id, now)

            self.db.run(start)
            job.status = JobStatus.RUNNING

        tick.told = self._tell_finished(job, driver)

        from optuna.trial import TrialState

        trials = driver.trials()
        running = {t.number for t in trials if t.state == TrialState.RUNNING}
        owned = self._owned_trials(job_id)
        if job.status == JobStatus.CANCELLED:
            stale = sorted(running)
            message = "the job was cancelled"
        else:
            stale = sorted(running - owned)
            message = "no task owned this trial (the scheduler that asked it stopped)"
        if stale:
            failed = driver.fail_stale(stale, reason="interrupted", message=message)
            tick.stale_failed = len(failed)
            self._count("interrupted", job.target, len(failed))
        if job.status == JobStatus.CANCELLED:
            self._mark_cancelled_told(job_id)
            self._finalize(job, driver, tick)
            return tick
        if tick.stale_failed:
            trials = driver.trials()

        self._fill(job, driver, tick, trials)
        if tick.asked:
            trials = driver.trials()
        self._update_progress(job, driver, tick, trials)
        return tick

    def _owned_trials(self, job_id: str) -> set[int]:
        def read(s: Session) -> set[int]:
            return set(
                s.execute(
                    select(Task.trial_number).where(
                        Task.job_id == job_id, Task.told_at.is_(None)
                    )
                ).scalars()
            )

        return self.db.run(read, write=False)

    def _tell_finished(self, job: Job, driver: SearchDriver) -> int:
        def read(s: Session) -> list[Task]:
            return list(
                s.execute(
                    select(Task)
                    .where(
                        Task.job_id == job.id,
                        Task.told_at.is_(None),
                        Task.state.in_(FINISHED),
                    )
                    .order_by(Task.finished_at, Task.trial_number)
                ).scalars()
            )

        rows = self.db.run(read, write=False)
        if not rows:
            return 0
        told_ids = []
        for row in rows:
            outcome = _outcome_of(row)
            if row.state == TaskState.DONE:
                self.metrics.measurement_seconds.labels(row.target).observe(outcome.seconds)
            if row.kind == TaskKind.LATENCY and driver.worth_training(outcome):
                self._queue_training(job, driver, row)
                continue
            if row.kind == TaskKind.QUALITY:
                outcome = driver.combine_outcomes(self._latency_outcome(row), outcome)
            driver.tell(row.trial_number, outcome)
            told_ids.append(row.id)
            self._count("measured" if outcome.ok else "failed", job.target)
        now = utcnow()

        if told_ids:
            self.db.run(lambda s: leases.mark_told(s, told_ids, now))
        return len(rows)

    def _queue_training(self, job: Job, driver: SearchDriver, row: Task) -> None:
        """A latency within every budget of a job that trains: its training task for the
        job's trainer pool, and the latency task marked told, in one transaction (the
        trial stays RUNNING and owned; it is told once, when the training is done)."""
        from search.evaluators.types import EvalTask

        _, training = driver.split_task(EvalTask.model_validate(
            {**row.task, "quality": driver.config.quality.model_dump(mode="json")}))
        now = utcnow()

        def op(s: Session) -> None:
            self._renew(s, job.id, running=True)
            leases.enqueue(s, job_id=job.id, trial_number=row.trial_number,
                           target=driver.config.trainer_pool, task=training,
                           cache_key=row.cache_key, now=now, kind=TaskKind.QUALITY)
            leases.mark_told(s, [row.id], now)

        self.db.run(op)
        if self.on_queued is not None:
            with contextlib.suppress(Exception):
                self.on_queued()

    def _latency_outcome(self, row: Task) -> EvalOutcome:
        """The latency outcome of a training task's trial."""
        def read(s: Session) -> Task | None:
            return s.execute(select(Task).where(
                Task.job_id == row.job_id, Task.trial_number == row.trial_number,
                Task.kind == TaskKind.LATENCY)).scalar_one_or_none()

        latency = self.db.run(read, write=False)
        if latency is None:
            return EvalOutcome(ok=False, failure=Failure(
                reason="runtime_error", message="the latency task of this trial is missing"))
        return _outcome_of(latency)

    def report_rung(self, job_id: str, trial_number: int, step: int, value: float) -> bool:
        """A trainer's rung (the progress endpoint): recorded with the trial, and the
        job's pruner asked; True to go on. Any replica answers: the rungs and the pruner's
        marks live in the study."""
        job = self.db.run(lambda s: s.get(Job, job_id), write=False)
        if job is None or job.status != JobStatus.RUNNING:
            return False
        with self._driving_guard:
            lock = self._driving.setdefault(f"rungs:{job_id}", threading.Lock())
        with lock:
            return self._driver(job).report_rung(trial_number, step, value)

    def _mark_cancelled_told(self, job_id: str) -> None:
        now = utcnow()
        self.db.run(lambda s: leases.mark_cancelled_told(s, job_id, now))

    def _fill(self, job: Job, driver: SearchDriver, tick: JobTick,
              trials: list[FrozenTrial]) -> None:
        from optuna.trial import TrialState

        from search.study import SearchError

        finished = sum(1 for t in trials if driver.counts_as_finished(t))
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        total = finished + running
        if total >= job.trials:
            return

        def read(s: Session) -> tuple[int, int]:
            inflight = s.execute(
                select(Task.id).where(Task.job_id == job.id, Task.state.in_(IN_FLIGHT))
            ).all()
            live = live_workers(s, self.settings.worker_timeout_s, job.target).get(job.target, 0)
            return len(inflight), live

        inflight, live = self.db.run(read, write=False)
        cap = inflight_cap(job.parallelism, live)
        asks = 0
        sampling_errors = 0
        max_asks = self.settings.scheduler_max_asks_per_tick
        while total < job.trials and inflight < cap and asks < max_asks:
            asks += 1
            try:
                proposal = driver.ask()
            except SearchError as exc:
                # the driver failed that trial with the reason; a space that keeps doing
                # this is broken
                total += 1
                tick.asked += 1
                sampling_errors += 1
                self._count("failed", job.target)
                log.warning("job %s: %s", job.id, exc)
                if sampling_errors >= 3:
                    raise
                continue
            total += 1
            tick.asked += 1
            if proposal.task is None:
                if proposal.reason == "cached":
                    tick.cached += 1
                else:
                    tick.over_budget += 1
                self._count(proposal.reason or "over_budget", job.target)
                continue
            self._enqueue(job, proposal)
            inflight += 1
            tick.queued += 1

    def _enqueue(self, job: Job, proposal: Proposal) -> None:
        now = utcnow()
        # a signal that trains: the target's workers measure the latency only; the
        # training is queued for the trainers once the latency met every budget
        task, _training = self._driver(job).split_task(proposal.task)

        def op(s: Session) -> None:
            # only while the lock is ours and the job still runs: a job cancelled during
            # this tick gets no new task (the next tick finalizes it)
            self._renew(s, job.id, running=True)
            leases.enqueue(s, job_id=job.id, trial_number=proposal.trial_number,
                           target=job.target, task=task,
                           cache_key=proposal.cache_key, now=now)

        self.db.run(op)

    def _progress(self, job: Job, driver: SearchDriver, trials: list[FrozenTrial]
                  ) -> tuple[dict[str, int], FrozenTrial | None, int]:
        """(progress figures, best feasible trial or None, tasks in flight)."""
        from optuna.trial import TrialState

        from service.leases import task_counts

        counts: dict[str, int] = {}
        finished = 0
        for t in trials:
            status = t.user_attrs.get("status", t.state.name.lower())
            if t.state == TrialState.RUNNING:
                status = "running"
            counts[status] = counts.get(status, 0) + 1
            if driver.counts_as_finished(t):
                finished += 1
        feasible = [t for t in trials if is_feasible(t)]
        best = (
            min(feasible, key=lambda t: (-t.values[0], t.values[1], t.number))
            if feasible
            else None
        )
        tasks = self.db.run(lambda s: task_counts(s, job_id=job.id), write=False)
        inflight = sum(tasks.get(state, 0) for state in IN_FLIGHT)
        progress = {
            "trials": job.trials,
            "finished": finished,
            "running": counts.get("running", 0),
            "measured": counts.get("measured", 0),
            "cached": counts.get("cached", 0),
            "over_budget": counts.get("over_budget", 0),
            "failed": counts.get("failed", 0),
            "interrupted": counts.get("interrupted", 0),
            "feasible": len(feasible),
            "tasks_queued": tasks.get(TaskState.QUEUED, 0),
            "tasks_leased": tasks.get(TaskState.LEASED, 0),
        }
        return progress, best, inflight

    def _update_progress(self, job: Job, driver: SearchDriver, tick: JobTick,
                         trials: list[FrozenTrial]) -> None:
        progress, best, inflight = self._progress(job, driver, trials)
        finished = progress["finished"]
        best_view = summarize(best) if best is not None else None
        done = finished >= job.trials and progress["running"] == 0 and inflight == 0
        if done:
            self._finalize(job, driver, tick, progress=progress)
            return
        if progress == job.progress and (best_view or {}).get("number") == (
            (job.best or {}).get("number")
        ):
            return
        now = utcnow()

        def write(s: Session) -> None:
            self._renew(s, job.id)
            s.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(progress=progress, best=best_view, updated_at=now)
            )

        self.db.run(write)

    def _finalize(self, job: Job, driver: SearchDriver | None, tick: JobTick,
                  progress: dict[str, int] | None = None) -> None:
        pareto: list[dict[str, Any]] = []
        winner = None
        best = None
        if driver is not None:
            pareto = [summarize(t) for t in driver.pareto()]
            rec = driver.recommend()
            winner = summarize(rec) if rec is not None else None
            if progress is None:
                progress, b, _ = self._progress(job, driver, driver.trials())
            else:
                b = driver.best_feasible()
            best = summarize(b) if b is not None else None
        now = utcnow()
        results: dict[str, Any] = {"pareto": pareto, "winner": winner}
        if best is not None:
            results["best"] = best
        if progress is not None:
            results["progress"] = progress

        def write(s: Session) -> JobStatus:
            self._renew(s, job.id)
            return jobs.finalize(s, job, now, **results)

        status = self.db.run(write)
        self._drivers.pop(job.id, None)
        tick.finalized = True
        tick.status = status
        if driver is not None and status == JobStatus.COMPLETED:
            self._review(job, driver)
        log.info("job %s %s: %d Pareto trials, winner %s", job.id, status, len(pareto),
                 winner["number"] if winner else None)


    def _review(self, job: Job, driver: SearchDriver) -> None:
        """Notes and artifacts for optuna-dashboard (search/review.py), once the job is
        completed. A failure here never changes the job: it is logged."""
        from search.review import write_review

        folder = Path(self.settings.artifact_dir) if self.settings.artifact_dir else None
        try:
            out = write_review(driver, None, folder)
        except Exception as exc:
            log.warning("job %s: dashboard notes and artifacts not written: %s", job.id,
                        (str(exc).strip().splitlines() or [repr(exc)])[0])
            return
        log.info("job %s: %d dashboard notes, artifacts for %d Pareto trials", job.id,
                 out["notes"], len([k for k in out["artifacts"] if k != "study"]))


def _outcome_of(row: Task) -> EvalOutcome:
    if row.state == TaskState.DONE and row.outcome is not None:
        try:
            return EvalOutcome.model_validate(row.outcome)
        except ValueError as exc:
            return EvalOutcome(
                ok=False,
                failure=Failure(reason="runtime_error",
                                message=f"the worker's outcome does not parse: {exc}"[:2000]),
            )
    err = row.last_error or {}
    reason = err.get("reason", "crashed")
    from service.leases import FAILURE_REASONS

    if reason not in FAILURE_REASONS:
        reason = "crashed"
    return EvalOutcome(
        ok=False,
        failure=Failure(reason=reason, message=str(err.get("message", "task failed"))[:2000]),
    )


class SchedulerLoop:
    """Runs :meth:`Scheduler.tick` in a worker thread every ``interval_s`` (sooner when
    woken, e.g. by a result) inside the API's asyncio loop."""

    def __init__(self, scheduler: Scheduler, interval_s: float) -> None:
        self.scheduler = scheduler
        self.interval_s = interval_s
        self._event = None
        self._loop = None
        self._task = None
        self._stopping = False

    def wake(self) -> None:
        """Thread-safe: run the next tick now."""
        loop, event = self._loop, self._event
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set)

    async def start(self) -> None:
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="fitnas-scheduler")

    async def _run(self) -> None:
        import asyncio

        while not self._stopping:
            started = time.monotonic()
            # cleared before the tick: a wake that comes during the tick (a result
            # arrives) makes the next tick start at once instead of being lost
            self._event.clear()
            # a failed tick is counted and logged (rate-limited) by Scheduler.tick
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.scheduler.tick)
            wait = max(0.05, self.interval_s - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout=wait)

    async def stop(self) -> None:
        import asyncio

        self._stopping = True
        if self._task is not None:
            self.wake()
            try:
                await asyncio.wait_for(self._task, timeout=30)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
