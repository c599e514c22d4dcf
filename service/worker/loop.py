"""The device worker: leases measurement tasks from the API over HTTP, evaluates each one
isolated in a warm child process held for its lifetime (timeout and memory ceiling; see
search/evaluators/warm.py), heartbeats the lease from a
background thread meanwhile and reports the outcome.

Protocol (all under ``/v1``, ``Authorization: Bearer <worker token>``): register, then
lease (long poll) -> heartbeat while evaluating -> result | fail | release. A 409 on a
heartbeat during the evaluation, or on a result, means the lease was lost (handed to
someone else, the task finished or was cancelled): the worker drops the task. While the
API is unreachable the worker retries with capped exponential backoff and jitter, and
keeps a finished result until the API answers it (an expired lease's result is still
accepted, see service/leases.py). On SIGTERM/SIGINT it finishes the current
evaluation if it can within the grace period, otherwise releases the lease; then it exits
with status 0. A second signal skips the grace period.

Import-light on purpose: only ``httpx`` and pydantic types at import time; no web stack,
no database, no Optuna. Torch comes in with the evaluator when the first task runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from search.evaluators.types import EvalOutcome, EvalTask
from service import signals as stop_signals
from service.protocol import LeaseOut
from service.worker.client import (
    ApiClient,
    ApiUnavailable,
    Backoff,
    LeaseLost,
    ProtocolError,
    UnknownWorker,
)
from service.worker.config import WorkerConfig, WorkerError, adapt_task
from service.worker.keeper import LeaseKeeper

log = logging.getLogger("fitnas.worker")

Evaluator = Callable[..., EvalOutcome]


def _default_evaluator() -> Evaluator:
    """A warm evaluation child for the worker's lifetime (as ``fitnas search`` uses):
    the interpreter, torch and the runtimes are paid once, not per candidate; the child
    is still replaced after a failure and recycled every few tasks."""
    from search.evaluators.warm import WarmEvaluator

    return WarmEvaluator()


def _default_fingerprint(device: str) -> dict[str, Any]:
    from search.evaluators.fingerprint import device_fingerprint

    return device_fingerprint(device)


def _child_pids() -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def _kill_new_children(before: set[int]) -> int:
    """Kill the processes this worker started since ``before`` was taken (the
    evaluation's child and anything it spawned). Returns how many were signalled."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    victims = [p for p in children if p.pid not in before]
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(victims, timeout=5)
    return len(victims)


def _refuses(role: str, kind: str, task: EvalTask) -> str | None:
    """Why this worker must not run a task handed to it (None: it may). A latency worker
    never trains; a trainer never measures latency."""
    trains = task.quality is not None and task.quality.signal == "train"
    if role == "trainer":
        if kind != "quality" or task.measure is not None:
            return "a trainer never measures latency: this task belongs to a latency worker"
        return None
    if kind == "quality" or trains:
        return ("a latency worker never trains: this task belongs to a trainer "
                "(fitnas worker --role trainer)")
    return None


class _Evaluation(threading.Thread):
    def __init__(self, evaluate: Evaluator, task: EvalTask, data_sources: dict[str, str],
                 on_progress: Callable[[int, float], bool] | None = None):
        super().__init__(name="evaluation", daemon=True)
        self._evaluate, self.task, self.data_sources = evaluate, task, data_sources
        self.on_progress = on_progress
        self.outcome: EvalOutcome | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            if self.on_progress is not None:
                # a training task: a one-shot child whose rungs go to the API's pruner
                from search.evaluators.runner import evaluate

                self.outcome = evaluate(self.task, isolated=True,
                                        data_sources=self.data_sources or None,
                                        on_progress=self.on_progress)
                return
            self.outcome = self._evaluate(
                self.task, isolated=True, data_sources=self.data_sources or None
            )
        except BaseException as exc:  # reported to the API as a worker-side failure
            self.error = exc
        finally:
            self.done.set()


@dataclass
class WorkerStats:
    leased: int = 0
    reported: int = 0
    duplicates: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0
    api_errors: int = 0
    registrations: int = 0


class Worker:
    """Runs the lease -> evaluate -> report loop until stopped (signal, ``stop()`` or
    ``max_tasks``). ``run()`` returns the process exit status."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        evaluate: Evaluator | None = None,
        fingerprint: Callable[[str], dict[str, Any]] | None = None,
        transport: httpx.BaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._evaluate = evaluate
        self._owned_evaluator: Any = None  # the warm evaluator this worker made and closes
        self._fingerprint = fingerprint or _default_fingerprint
        self._transport = transport
        self._rng = rng or random.Random()
        self.api = self._client()
        self._hb_api = self._client()  # used only by the lease keeper thread
        self.worker_id: str | None = None
        self.heartbeat_interval_s = 10.0
        self.lease_timeout_s = 60.0
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._stop_now = threading.Event()
        self._last_idle_beat = 0.0
        self._fp: dict[str, Any] | None = None
        self._poll_backoff = self._backoff()

    def _client(self) -> ApiClient:
        return ApiClient(
            self.config.server,
            self.config.token,
            timeout_s=self.config.request_timeout_s,
            transport=self._transport,
        )

    def _backoff(self) -> Backoff:
        return Backoff(
            base=self.config.backoff_base_s,
            cap=max(self.config.backoff_cap_s, self.config.backoff_base_s),
            rng=self._rng,
        )

    # -- stopping

    def stop(self, now: bool = False) -> None:
        """Ask the worker to stop: finish the current evaluation within the grace period
        (``now=True``: release it at once)."""
        if now or self._stop.is_set():
            self._stop_now.set()
        self._stop.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        """Only sets events: a handler that wrote to the log itself could interrupt a
        log write of the main thread (a reentrant write fails). The two changes of state
        are logged from a short thread; further signals change nothing and say nothing."""
        name = signal.Signals(signum).name
        if self._stop_now.is_set():
            return
        if self._stop.is_set():
            msg: tuple = ("%s again: releasing the current task now", name)
        else:
            msg = ("%s: stopping (grace period %.0f s for the current evaluation)",
                   name, self.config.grace_s)
        self.stop()
        threading.Thread(target=log.warning, args=msg, name="signal-log", daemon=True).start()

    # -- main loop

    def run(self) -> int:
        with stop_signals.listen(self._on_signal):
            return self._run()

    def _run(self) -> int:
        try:
            if self._evaluate is None and not self._stop.is_set():
                self._evaluate = self._owned_evaluator = _default_evaluator()
            if not self._register_until_ok():
                return 0
            while not self._stop.is_set():
                if self.config.max_tasks is not None and self.stats.leased >= self.config.max_tasks:
                    log.info("done: %d task(s) handled", self.stats.leased)
                    break
                lease = self._poll()
                if lease is not None:
                    self._handle(lease)
            return 0
        finally:
            log.info(
                "worker %s exiting: %d leased, %d reported, %d failed, %d released, %d lost",
                self.worker_id, self.stats.leased, self.stats.reported, self.stats.failed,
                self.stats.released, self.stats.lost,
            )
            self.api.close()
            self._hb_api.close()
            if self._owned_evaluator is not None:
                self._owned_evaluator.close()
                self._evaluate = self._owned_evaluator = None

    def _alive(self) -> None:
        """The API answered: touch the health file (a container healthcheck reads its
        age; a worker stuck without its API turns unhealthy)."""
        if self.config.health_file:
            try:
                with open(self.config.health_file, "a"):
                    os.utime(self.config.health_file)
            except OSError as exc:
                log.debug("health file %s: %s", self.config.health_file, exc)

    def _fingerprint_once(self) -> dict[str, Any]:
        if self._fp is None:
            try:
                self._fp = self._fingerprint(self.config.device)
            except Exception as exc:  # a fingerprint must not keep a worker from working
                log.warning("device fingerprint failed: %s", exc)
                self._fp = {"error": str(exc)}
        return self._fp

    def _register_until_ok(self) -> bool:
        backoff = self._backoff()
        if self._stop.is_set():
            return False
        fp = self._fingerprint_once()
        while not self._stop.is_set():
            try:
                info = self.api.register(
                    self.config.target, self.config.name, self.config.device,
                    self.config.runtimes, fp, role=self.config.role,
                )
            except ApiUnavailable as exc:
                self.stats.api_errors += 1
                delay = backoff.next()
                log.warning("API at %s unavailable (%s); retrying in %.1f s",
                            self.config.server, exc, delay)
                self._stop.wait(delay)
                continue
            except ProtocolError as exc:
                raise WorkerError(f"registration refused: {exc}") from exc
            self.worker_id = info.worker_id
            self.heartbeat_interval_s = info.heartbeat_interval_s
            self.lease_timeout_s = info.lease_timeout_s
            self.stats.registrations += 1
            self._last_idle_beat = time.monotonic()
            self._alive()
            log.info(
                "registered as %s (role %s, target %s, device %s, runtimes %s); heartbeat "
                "every %.1f s", self.worker_id, self.config.role, self.config.target,
                self.config.device,
                ",".join(self.config.runtimes), self.heartbeat_interval_s,
            )
            return True
        return False

    def _poll(self) -> LeaseOut | None:
        assert self.worker_id is not None
        backoff = self._poll_backoff
        try:
            lease = self.api.lease(self.worker_id, self.config.target, self.config.poll_wait_s)
            if lease is None and (
                time.monotonic() - self._last_idle_beat >= self.heartbeat_interval_s
            ):
                self.api.worker_heartbeat(self.worker_id)
                self._last_idle_beat = time.monotonic()
        except UnknownWorker:
            log.warning("the API no longer knows worker %s; registering again", self.worker_id)
            self._register_until_ok()
            return None
        except (ApiUnavailable, ProtocolError) as exc:
            self.stats.api_errors += 1
            delay = backoff.next()
            log.warning("lease request failed (%s); retrying in %.1f s", exc, delay)
            self._stop.wait(delay)
            return None
        if backoff.attempt:
            log.info("API reachable again")
        backoff.reset()
        self._alive()
        if lease is None:
            return None
        if self._stop.is_set():
            # leased while we were told to stop: hand it straight back
            self._release(lease.task_id, lease.lease_token)
            return None
        return lease

    def _handle(self, lease: LeaseOut) -> None:
        task_id, token = lease.task_id, lease.lease_token
        self.stats.leased += 1
        try:
            task = EvalTask.model_validate(lease.task)
        except (ValidationError, KeyError, TypeError) as exc:
            self._fail(task_id, token, "invalid_spec", f"task does not validate: {exc}")
            return
        refused = _refuses(self.config.role, lease.kind, task)
        if refused:
            self._fail(task_id, token, "unsupported", refused)
            return
        fitted = adapt_task(task, self.config.device, self.config.runtimes)
        if isinstance(fitted, str):
            self._fail(task_id, token, "unsupported", fitted)
            return
        task = fitted
        log.info("task %s (attempt %s): evaluating", task_id, lease.attempt)

        lost = threading.Event()
        keeper = LeaseKeeper(self._hb_api, task_id, token, self.heartbeat_interval_s, lost)
        keeper.start()
        try:
            self._evaluate_and_report(task_id, token, task, keeper, lost)
        finally:
            keeper.stop()
            self._last_idle_beat = time.monotonic()

    def _evaluate_and_report(
        self, task_id: str, token: str, task: EvalTask, keeper: LeaseKeeper,
        lost: threading.Event,
    ) -> None:
        before = _child_pids()
        assert self._evaluate is not None
        on_progress = None
        if self.config.role == "trainer":
            def on_progress(step: int, value: float) -> bool:
                try:
                    return self._hb_api.progress(task_id, token, step, value).go_on
                except LeaseLost:
                    lost.set()
                    return False
                except (ApiUnavailable, ProtocolError) as exc:
                    # the pruner could not be asked: go on (the lease keeper keeps it)
                    log.warning("task %s: progress not reported (%s)", task_id, exc)
                    return True
        ev = _Evaluation(self._evaluate, task, self.config.data_sources, on_progress)
        t0 = time.monotonic()
        ev.start()
        deadline: float | None = None
        while not ev.done.wait(0.1):
            if lost.is_set():
                self.stats.lost += 1
                self._abort(ev, before)
                log.warning("task %s: dropped after the lease was lost", task_id)
                return
            if self._stop.is_set():
                if deadline is None:
                    deadline = time.monotonic() + self.config.grace_s
                    log.info("task %s: waiting up to %.0f s for the evaluation to finish",
                             task_id, self.config.grace_s)
                if self._stop_now.is_set() or time.monotonic() >= deadline:
                    keeper.stop()
                    self._abort(ev, before)
                    log.info("task %s: evaluation did not finish in time; releasing it",
                             task_id)
                    self._release(task_id, token)
                    return
        log.info("task %s: evaluated in %.1f s", task_id, time.monotonic() - t0)
        if ev.error is not None or ev.outcome is None:
            exc = ev.error
            msg = f"{type(exc).__name__}: {exc}" if exc else "the evaluator returned nothing"
            log.error("task %s: evaluator error: %s", task_id, msg)
            keeper.stop()
            self._fail(task_id, token, "crashed", f"worker-side error: {msg}")
            return
        self._submit(task_id, token, ev.outcome, keeper, deadline)

    def _abort(self, ev: _Evaluation, before: set[int]) -> None:
        abort = getattr(self._evaluate, "abort", None)
        if abort is not None:  # the warm child existed before this task began
            abort()
        n = _kill_new_children(before)
        ev.join(10.0)
        if n:
            log.info("stopped %d evaluation process(es)", n)

    def _submit(
        self, task_id: str, token: str, outcome: EvalOutcome, keeper: LeaseKeeper,
        deadline: float | None,
    ) -> None:
        """Report the outcome, retrying while the API is unreachable (the lease keeper
        keeps the lease alive meanwhile). A finished result is kept until the API has
        answered it, even when a heartbeat was refused meanwhile: the API accepts the
        result of an expired lease while the task is unfinished, so an outage longer than
        the lease measures nothing twice. Gives up only on the API's 409 or, while
        stopping, when the grace period is over (the lease then expires and the task is
        re-queued: nothing is told twice)."""
        backoff = self._backoff()
        while True:
            try:
                with keeper.exclusive():
                    try:
                        answer = self.api.result(task_id, token, outcome)
                    except (LeaseLost, ProtocolError):
                        keeper.finish()
                        raise
                    keeper.finish()
            except LeaseLost as exc:
                self.stats.lost += 1
                log.warning("task %s: result refused, lease lost (%s)", task_id, exc)
                return
            except ApiUnavailable as exc:
                self.stats.api_errors += 1
                delay = backoff.next()
                if self._stop.is_set():
                    if deadline is None:
                        deadline = time.monotonic() + self.config.grace_s
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stop_now.is_set():
                        log.error("task %s: API unreachable (%s); stopping without reporting;"
                                  " the task will be re-queued when its lease expires",
                                  task_id, exc)
                        return
                    delay = min(delay, left)
                log.warning("task %s: reporting failed (%s); retrying in %.1f s",
                            task_id, exc, delay)
                self._stop_now.wait(delay)
                continue
            except ProtocolError as exc:
                # The API refuses this outcome (it does not validate there): do not lose
                # the task silently, report it as a failed attempt instead.
                log.error("task %s: result refused (%s)", task_id, exc)
                self._fail(task_id, token, "runtime_error", f"result refused: {exc}")
                return
            if answer.duplicate:
                self.stats.duplicates += 1
                log.info("task %s: already reported (duplicate ignored by the API)", task_id)
            else:
                self.stats.reported += 1
                state = "ok" if outcome.ok else f"failed ({outcome.failure.reason})" \
                    if outcome.failure else "failed"
                log.info("task %s: reported, %s", task_id, state)
            return

    def _call_with_retry(self, what: str, fn: Callable[[], Any], attempts: int = 4) -> bool:
        backoff = self._backoff()
        for i in range(attempts):
            try:
                fn()
                return True
            except LeaseLost as exc:
                log.warning("%s: lease already lost (%s)", what, exc)
                return False
            except ProtocolError as exc:
                log.error("%s: refused (%s)", what, exc)
                return False
            except ApiUnavailable as exc:
                self.stats.api_errors += 1
                if i == attempts - 1:
                    log.error("%s: API unreachable (%s); giving up, the lease will expire",
                              what, exc)
                    return False
                time.sleep(min(backoff.next(), 2.0))
        return False

    def _release(self, task_id: str, token: str) -> None:
        if self._call_with_retry(f"release {task_id}", lambda: self.api.release(task_id, token)):
            self.stats.released += 1
            log.info("task %s: released", task_id)

    def _fail(self, task_id: str, token: str, reason: str, message: str) -> None:
        log.warning("task %s: failing it (%s: %s)", task_id, reason, message)
        if self._call_with_retry(
            f"fail {task_id}", lambda: self.api.fail(task_id, token, reason, message)
        ):
            self.stats.failed += 1
