"""The device worker: leases measurement tasks from the API over HTTP, evaluates each one
isolated in a child process (timeout and memory ceiling), heartbeats the lease from a
background thread meanwhile and reports the outcome.

Protocol (all under ``/v1``, ``Authorization: Bearer <worker token>``): register, then
lease (long poll) -> heartbeat while evaluating -> result | fail | release. A 409 on a
heartbeat or a result means the lease was lost (expired and re-queued, or handed to
someone else): the worker drops the task. While the API is unreachable the worker retries
with capped exponential backoff and jitter. On SIGTERM/SIGINT it finishes the current
evaluation if it can within the grace period, otherwise releases the lease; then it exits
with status 0. A second signal skips the grace period.

Import-light on purpose: only ``httpx`` and pydantic types at import time; no web stack,
no database, no Optuna. Torch comes in with the evaluator when the first task runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from search.evaluators.types import EvalOutcome, EvalTask

log = logging.getLogger("fitnas.worker")

RUNTIMES = ("eager", "torchscript", "onnxruntime")
DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
TOKEN_ENV = "FITNAS_WORKER_TOKEN"
DATA_SOURCES_ENV = "FITNAS_DATA_SOURCES"
DATA_SOURCES_FILE_ENV = "FITNAS_DATA_SOURCES_FILE"
BUILTIN_DATA = ("digits",)
# Transient server answers: retried with backoff like a refused connection.
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class WorkerError(Exception):
    """A configuration or authorization problem; one line for a person, fatal."""


class ApiUnavailable(Exception):
    """The API could not be reached or answered with a transient error; retry later."""


class LeaseLost(Exception):
    """409: the lease token is stale; the task belongs to someone else now."""


class UnknownWorker(Exception):
    """404 on a worker endpoint: the API no longer knows this worker; register again."""


class Unauthorized(WorkerError):
    """401/403: the token is wrong, revoked or scoped to another target."""


class ProtocolError(Exception):
    """Any other unexpected answer (a 4xx the protocol does not define)."""


# --------------------------------------------------------------------------- backoff


class Backoff:
    """Capped exponential backoff with jitter.

    The n-th delay is drawn uniformly from ``[d * (1 - jitter), d]`` where
    ``d = min(cap, base * factor ** n)``: it never exceeds ``cap``, and the jitter keeps
    a fleet of workers from reconnecting in lock step after an outage.
    """

    def __init__(
        self,
        base: float = 0.5,
        factor: float = 2.0,
        cap: float = 30.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if base <= 0 or factor < 1 or cap < base or not 0 <= jitter <= 1:
            raise ValueError("need base > 0, factor >= 1, cap >= base, 0 <= jitter <= 1")
        self.base, self.factor, self.cap, self.jitter = base, factor, cap, jitter
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        """The un-jittered delay for the current attempt."""
        # exponent clamped so that huge attempt counts do not overflow
        return min(self.cap, self.base * self.factor ** min(self.attempt, 64))

    def next(self) -> float:
        d = self.ceiling()
        self.attempt += 1
        return d * (1.0 - self.jitter) + self._rng.random() * d * self.jitter

    def reset(self) -> None:
        self.attempt = 0


# --------------------------------------------------------------------------- HTTP client


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:200] or resp.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        d = body["detail"]
        return d if isinstance(d, str) else json.dumps(d)[:200]
    return json.dumps(body)[:200]


class ApiClient:
    """The worker's side of the worker <-> API protocol. One instance per thread."""

    def __init__(
        self,
        server: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.timeout_s = timeout_s
        self._http = httpx.Client(
            base_url=self.server,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "fitnas-worker"},
            timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def _post(
        self, path: str, body: dict[str, Any] | None = None, *, read_timeout: float | None = None
    ) -> httpx.Response:
        timeout = None
        if read_timeout is not None:
            timeout = httpx.Timeout(read_timeout, connect=min(5.0, self.timeout_s))
        try:
            if timeout is None:
                resp = self._http.post(path, json=body if body is not None else {})
            else:
                resp = self._http.post(
                    path, json=body if body is not None else {}, timeout=timeout
                )
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"{type(exc).__name__}: {exc}" if str(exc) else
                                 type(exc).__name__) from exc
        code = resp.status_code
        if code in (200, 201, 204):
            return resp
        if code in (401, 403):
            raise Unauthorized(f"{path}: HTTP {code}: {_detail(resp)}")
        if code == 409:
            raise LeaseLost(_detail(resp))
        if code == 404:
            if path.startswith("/v1/workers/") or path == "/v1/tasks/lease":
                # the API does not know this worker (its database was reset): register again
                raise UnknownWorker(_detail(resp))
            if path.startswith("/v1/tasks/"):
                # the task is gone (its job was deleted): nothing to hold on to
                raise LeaseLost(f"task gone: {_detail(resp)}")
        if code in _RETRY_STATUS:
            raise ApiUnavailable(f"HTTP {code}: {_detail(resp)}")
        raise ProtocolError(f"{path}: HTTP {code}: {_detail(resp)}")

    def register(
        self, target: str, name: str, device: str, runtimes: list[str], fingerprint: dict
    ) -> dict[str, Any]:
        return self._post(
            "/v1/workers/register",
            {
                "target": target,
                "name": name,
                "device": device,
                "runtimes": runtimes,
                "fingerprint": fingerprint,
            },
        ).json()

    def lease(self, worker_id: str, target: str, wait_s: float) -> dict[str, Any] | None:
        resp = self._post(
            "/v1/tasks/lease",
            {"worker_id": worker_id, "target": target, "wait_s": wait_s},
            read_timeout=wait_s + self.timeout_s,
        )
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    def heartbeat(self, task_id: str, lease_token: str) -> dict[str, Any]:
        return self._post(f"/v1/tasks/{task_id}/heartbeat", {"lease_token": lease_token}).json()

    def result(self, task_id: str, lease_token: str, outcome: EvalOutcome) -> dict[str, Any]:
        return self._post(
            f"/v1/tasks/{task_id}/result",
            {"lease_token": lease_token, "outcome": outcome.model_dump(mode="json")},
        ).json()

    def fail(self, task_id: str, lease_token: str, reason: str, message: str) -> None:
        self._post(
            f"/v1/tasks/{task_id}/fail",
            {"lease_token": lease_token, "reason": reason, "message": message[:2000]},
        )

    def release(self, task_id: str, lease_token: str) -> None:
        self._post(f"/v1/tasks/{task_id}/release", {"lease_token": lease_token})

    def worker_heartbeat(self, worker_id: str) -> None:
        self._post(f"/v1/workers/{worker_id}/heartbeat", {})


# --------------------------------------------------------------------------- lease keeper


class LeaseKeeper(threading.Thread):
    """Heartbeats one task's lease every ``interval_s`` until stopped. A 409 sets
    ``lost``; an unreachable API is retried sooner (the lease may still be alive).

    Reports on the same lease go through :meth:`exclusive`, so that a heartbeat never
    races the final report (a heartbeat answered after the result was accepted would
    read as a lost lease)."""

    def __init__(
        self,
        api: ApiClient,
        task_id: str,
        lease_token: str,
        interval_s: float,
        lost: threading.Event | None = None,
    ) -> None:
        super().__init__(name=f"lease-{task_id}", daemon=True)
        self.api, self.task_id, self.lease_token = api, task_id, lease_token
        self.interval_s = max(0.05, float(interval_s))
        self.lost = lost or threading.Event()
        self.beats = 0
        self.errors = 0
        self.last_ok = time.monotonic()
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def exclusive(self):
        """Hold off heartbeats while the caller reports on this lease."""
        with self._lock:
            yield

    def finish(self) -> None:
        """The lease is over (reported, released or lost): no more heartbeats."""
        self._stop_event.set()

    def run(self) -> None:
        backoff = Backoff(base=min(0.5, self.interval_s / 4), cap=max(0.05, self.interval_s / 2))
        delay = self.interval_s
        while not self._stop_event.wait(delay):
            try:
                with self._lock:
                    if self._stop_event.is_set():
                        return
                    self.api.heartbeat(self.task_id, self.lease_token)
            except LeaseLost as exc:
                log.warning("task %s: lease lost (%s); dropping it", self.task_id, exc)
                self.lost.set()
                return
            except Unauthorized as exc:
                log.error("task %s: heartbeat refused (%s); dropping it", self.task_id, exc)
                self.lost.set()
                return
            except (ApiUnavailable, ProtocolError, ValueError) as exc:
                self.errors += 1
                delay = backoff.next()
                log.warning(
                    "task %s: heartbeat failed (%s); %.0f s since the last good one; "
                    "retrying in %.1f s", self.task_id, exc,
                    time.monotonic() - self.last_ok, delay,
                )
                continue
            self.beats += 1
            self.last_ok = time.monotonic()
            log.debug("task %s: lease extended (heartbeat %d)", self.task_id, self.beats)
            backoff.reset()
            delay = self.interval_s

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)


# --------------------------------------------------------------------------- configuration


def _parse_data_sources(text: str, where: str, base: Path) -> dict[str, str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkerError(f"{where}: data sources are not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise WorkerError(f'{where}: data sources must be a JSON object {{"name": "path"}}')
    out: dict[str, str] = {}
    for name, value in data.items():
        if name in BUILTIN_DATA:
            raise WorkerError(f"{where}: {name!r} is built in and cannot be redefined")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise WorkerError(f"{where}: bad data source name {name!r} (letters, digits, _.-)")
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = base / p
        if not p.exists():
            raise WorkerError(f"{where}: data source {name!r}: {p} does not exist")
        if not (p.is_dir() or p.suffix == ".npz"):
            raise WorkerError(
                f"{where}: data source {name!r}: {p} is neither a directory nor a .npz file"
            )
        out[name] = str(p)
    return out


def _data_sources_file(path: str | os.PathLike) -> dict[str, str]:
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as exc:
        raise WorkerError(f"cannot read data sources file {p}: {exc.strerror or exc}") from exc
    return _parse_data_sources(text, str(p), p.resolve().parent)


def load_data_sources(path: str | os.PathLike | None = None,
                      environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's own data sources for the ``train`` signal: names mapped to ImageFolder
    directories or ``.npz`` files. Never taken from a task: a job only names a data set.

    ``path`` (``--data-sources FILE``, a JSON object ``{"name": "path"}``) wins outright.
    Otherwise the environment: ``FITNAS_DATA_SOURCES_FILE`` (such a file) and
    ``FITNAS_DATA_SOURCES`` (inline JSON, or a file path), the latter winning on equal
    names. Relative paths in a file are relative to that file. Every path must exist."""
    if path is not None:
        return _data_sources_file(path)
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    file_value = (env.get(DATA_SOURCES_FILE_ENV) or "").strip()
    if file_value:
        out.update(_data_sources_file(file_value))
    raw = (env.get(DATA_SOURCES_ENV) or "").strip()
    if raw.startswith("{"):
        out.update(_parse_data_sources(raw, DATA_SOURCES_ENV, Path.cwd()))
    elif raw:
        out.update(_data_sources_file(raw))
    return out


def available_runtimes() -> list[str]:
    """Runtimes this installation can measure with: eager and TorchScript always, ONNX
    Runtime when ``onnxruntime`` and ``onnx`` are importable."""
    have = ["eager", "torchscript"]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        have.append("onnxruntime")
    return have


def _device_kind(device: str) -> str:
    return device.split(":", 1)[0]


def adapt_task(task: EvalTask, device: str, runtimes: list[str]) -> EvalTask | str:
    """Fit ``task`` to this worker: measurement on this worker's exact device (``cuda``
    becomes ``cuda:1`` on a worker started with ``--device cuda:1``). Returns the task,
    or a one-line reason when this worker cannot run it."""
    m = task.measure
    if m is None:
        return task
    if _device_kind(m.device) != _device_kind(device):
        return f"task measures on {m.device!r} but this worker measures on {device!r}"
    if m.runtime not in runtimes:
        return f"task needs runtime {m.runtime!r}; this worker offers {', '.join(runtimes)}"
    if m.device != device:
        task = task.model_copy(update={"measure": m.model_copy(update={"device": device})})
    return task


@dataclass
class WorkerConfig:
    server: str
    target: str
    token: str
    device: str = "cpu"
    runtimes: list[str] = field(default_factory=available_runtimes)
    name: str = ""
    data_sources: dict[str, str] = field(default_factory=dict)
    poll_wait_s: float = 10.0  # long-poll window of one lease request (API caps it at 30)
    grace_s: float = 30.0  # on SIGTERM: how long to let the current evaluation finish
    max_tasks: int | None = None  # exit after this many tasks (None: run until stopped)
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    request_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        self.server = self.server.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", self.server):
            raise WorkerError(f"--server must be an http(s):// URL, got {self.server!r}")
        if not self.target.strip():
            raise WorkerError("--target must not be empty")
        if not self.token:
            raise WorkerError(f"a worker token is required: --token or {TOKEN_ENV}")
        if not DEVICE_RE.match(self.device):
            raise WorkerError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        bad = [r for r in self.runtimes if r not in RUNTIMES]
        if bad:
            raise WorkerError(f"unknown runtime {bad[0]!r}; known: {', '.join(RUNTIMES)}")
        if not self.runtimes:
            raise WorkerError("at least one runtime is needed")
        self.runtimes = list(dict.fromkeys(self.runtimes))
        if not 0 <= self.poll_wait_s <= 30:
            raise WorkerError("--poll-wait must be between 0 and 30 seconds")
        if self.grace_s < 0:
            raise WorkerError("--grace must not be negative")
        if not self.name:
            self.name = f"{socket.gethostname()}-{self.device}-{os.getpid()}"


def check_environment(config: WorkerConfig) -> None:
    """Fail fast, with one line, when this machine cannot do what the config promises."""
    if "onnxruntime" in config.runtimes and "onnxruntime" not in available_runtimes():
        raise WorkerError("runtime 'onnxruntime' needs the onnx and onnxruntime packages")
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise WorkerError(f"--device {config.device}: no CUDA device is available here")
        index = int(config.device.split(":")[1]) if ":" in config.device else 0
        if index >= torch.cuda.device_count():
            raise WorkerError(
                f"--device {config.device}: only {torch.cuda.device_count()} CUDA device(s)"
            )


# --------------------------------------------------------------------------- the worker

Evaluator = Callable[..., EvalOutcome]


def _default_evaluator() -> Evaluator:
    from search.evaluators.runner import evaluate

    return evaluate


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


class _Evaluation(threading.Thread):
    def __init__(self, evaluate: Evaluator, task: EvalTask, data_sources: dict[str, str]):
        super().__init__(name="evaluation", daemon=True)
        self._evaluate, self.task, self.data_sources = evaluate, task, data_sources
        self.outcome: EvalOutcome | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
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
        name = signal.Signals(signum).name
        if self._stop.is_set():
            log.warning("%s again: releasing the current task now", name)
        else:
            log.info("%s: stopping (grace period %.0f s for the current evaluation)",
                     name, self.config.grace_s)
        self.stop()

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, self._on_signal)
        return old

    # -- main loop

    def run(self) -> int:
        old = self._install_signals()
        try:
            if self._evaluate is None:
                self._evaluate = _default_evaluator()
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
            for sig, handler in old.items():
                signal.signal(sig, handler)
            log.info(
                "worker %s exiting: %d leased, %d reported, %d failed, %d released, %d lost",
                self.worker_id, self.stats.leased, self.stats.reported, self.stats.failed,
                self.stats.released, self.stats.lost,
            )
            self.api.close()
            self._hb_api.close()

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
        fp = self._fingerprint_once()
        while not self._stop.is_set():
            try:
                info = self.api.register(
                    self.config.target, self.config.name, self.config.device,
                    self.config.runtimes, fp,
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
            self.worker_id = str(info["worker_id"])
            self.heartbeat_interval_s = float(info.get("heartbeat_interval_s", 10.0))
            self.lease_timeout_s = float(info.get("lease_timeout_s", 60.0))
            self.stats.registrations += 1
            self._last_idle_beat = time.monotonic()
            log.info(
                "registered as %s (target %s, device %s, runtimes %s); heartbeat every "
                "%.1f s", self.worker_id, self.config.target, self.config.device,
                ",".join(self.config.runtimes), self.heartbeat_interval_s,
            )
            return True
        return False

    def _poll(self) -> dict[str, Any] | None:
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
        if lease is None:
            return None
        if self._stop.is_set():
            # leased while we were told to stop: hand it straight back
            self._release(str(lease["task_id"]), str(lease["lease_token"]))
            return None
        return lease

    def _handle(self, lease: dict[str, Any]) -> None:
        task_id, token = str(lease["task_id"]), str(lease["lease_token"])
        self.stats.leased += 1
        try:
            task = EvalTask.model_validate(lease["task"])
        except (ValidationError, KeyError, TypeError) as exc:
            self._fail(task_id, token, "invalid_spec", f"task does not validate: {exc}")
            return
        fitted = adapt_task(task, self.config.device, self.config.runtimes)
        if isinstance(fitted, str):
            self._fail(task_id, token, "unsupported", fitted)
            return
        task = fitted
        log.info("task %s (attempt %s): evaluating", task_id, lease.get("attempt", "?"))

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
        ev = _Evaluation(self._evaluate, task, self.config.data_sources)
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
        if lost.is_set():
            self.stats.lost += 1
            log.warning("task %s: lease lost during the evaluation; result dropped", task_id)
            return
        if ev.error is not None or ev.outcome is None:
            exc = ev.error
            msg = f"{type(exc).__name__}: {exc}" if exc else "the evaluator returned nothing"
            log.error("task %s: evaluator error: %s", task_id, msg)
            keeper.stop()
            self._fail(task_id, token, "crashed", f"worker-side error: {msg}")
            return
        self._submit(task_id, token, ev.outcome, keeper, lost, deadline)

    def _abort(self, ev: _Evaluation, before: set[int]) -> None:
        n = _kill_new_children(before)
        ev.join(10.0)
        if n:
            log.info("stopped %d evaluation process(es)", n)

    def _submit(
        self, task_id: str, token: str, outcome: EvalOutcome, keeper: LeaseKeeper,
        lost: threading.Event, deadline: float | None,
    ) -> None:
        """Report the outcome, retrying while the API is unreachable (the lease keeper
        keeps the lease alive meanwhile). Gives up only when the lease is lost or, while
        stopping, when the grace period is over (the lease then expires and the task is
        re-queued: nothing is told twice)."""
        backoff = self._backoff()
        while True:
            if lost.is_set():
                self.stats.lost += 1
                log.warning("task %s: lease lost before the result got through", task_id)
                return
            try:
                with keeper.exclusive():
                    if lost.is_set():
                        continue
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
            if answer.get("duplicate"):
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


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO; keep the worker's own log readable
    logging.getLogger("httpx").setLevel(logging.WARNING)
