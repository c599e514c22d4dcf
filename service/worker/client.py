"""The worker's side of the worker <-> API protocol: one HTTP client, the errors its
answers map to, and the backoff used while the API is away.

A 409 (``LeaseLost``) means the lease token is stale; 404 on a worker endpoint
(``UnknownWorker``) means register again; 401/403 (``Unauthorized``) is fatal; transient
answers and refused connections (``ApiUnavailable``) are retried by the caller."""

from __future__ import annotations

import json
import random
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from search.evaluators.types import EvalOutcome
from service.protocol import (
    LEASE_PATH,
    REGISTER_PATH,
    FailIn,
    FailOut,
    HeartbeatOut,
    LeaseOut,
    LeaseRequest,
    LeaseTokenIn,
    ProgressIn,
    ProgressOut,
    ReleaseOut,
    ResultIn,
    ResultOut,
    WorkerRegister,
    WorkerRegistered,
    task_path,
    worker_heartbeat_path,
)
from service.worker.config import WorkerError

# Transient server answers: retried with backoff like a refused connection.
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


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
    """The worker's side of the worker <-> API protocol. One instance per thread.

    Bodies are built and answers read with the models of ``service/protocol.py``, the
    same ones the API validates with. ``http`` lets a caller bring its own httpx client
    (the tests pass the app's TestClient); by default the client makes one."""

    def __init__(
        self,
        server: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {token}", "User-Agent": "fitnas-worker"}
        self._own_http = http is None
        self._http = http or httpx.Client(
            base_url=self.server,
            timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
            transport=transport,
        )

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def send(
        self, path: str, body: BaseModel | None = None, *, read_timeout: float | None = None
    ) -> httpx.Response:
        """One protocol request; the answer as it came (no status handling). Only an
        unreachable API raises (:class:`ApiUnavailable`)."""
        payload = body.model_dump(mode="json") if body is not None else {}
        extra: dict[str, Any] = {}
        if read_timeout is not None and self._own_http:  # a given client keeps its own
            extra["timeout"] = httpx.Timeout(read_timeout, connect=min(5.0, self.timeout_s))
        try:
            return self._http.post(path, json=payload, headers=self._headers, **extra)
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"{type(exc).__name__}: {exc}" if str(exc) else
                                 type(exc).__name__) from exc

    def _post(
        self, path: str, body: BaseModel | None = None, *, read_timeout: float | None = None
    ) -> httpx.Response:
        resp = self.send(path, body, read_timeout=read_timeout)
        code = resp.status_code
        if code in (200, 201, 204):
            return resp
        if code in (401, 403):
            raise Unauthorized(f"{path}: HTTP {code}: {_detail(resp)}")
        if code == 409:
            raise LeaseLost(_detail(resp))
        if code == 404:
            if path.startswith("/v1/workers/") or path == LEASE_PATH:
                # the API does not know this worker (its database was reset): register again
                raise UnknownWorker(_detail(resp))
            if path.startswith("/v1/tasks/"):
                # the task is gone (its job was deleted): nothing to hold on to
                raise LeaseLost(f"task gone: {_detail(resp)}")
        if code in _RETRY_STATUS:
            raise ApiUnavailable(f"HTTP {code}: {_detail(resp)}")
        raise ProtocolError(f"{path}: HTTP {code}: {_detail(resp)}")

    def register(
        self, target: str, name: str, device: str, runtimes: list[str], fingerprint: dict,
        role: str = "latency",
    ) -> WorkerRegistered:
        body = _body(REGISTER_PATH, WorkerRegister, target=target, name=name, device=device,
                     runtimes=runtimes, fingerprint=fingerprint, role=role)
        return _answer(REGISTER_PATH, WorkerRegistered, self._post(REGISTER_PATH, body))

    def lease(self, worker_id: str, target: str, wait_s: float) -> LeaseOut | None:
        body = _body(LEASE_PATH, LeaseRequest, worker_id=worker_id, target=target,
                     wait_s=wait_s)
        resp = self._post(LEASE_PATH, body, read_timeout=wait_s + self.timeout_s)
        if resp.status_code == 204 or not resp.content:
            return None
        return _answer(LEASE_PATH, LeaseOut, resp)

    def heartbeat(self, task_id: str, lease_token: str) -> HeartbeatOut:
        path = task_path(task_id, "heartbeat")
        body = _body(path, LeaseTokenIn, lease_token=lease_token)
        return _answer(path, HeartbeatOut, self._post(path, body))

    def result(self, task_id: str, lease_token: str, outcome: EvalOutcome) -> ResultOut:
        path = task_path(task_id, "result")
        body = _body(path, ResultIn, lease_token=lease_token, outcome=outcome)
        return _answer(path, ResultOut, self._post(path, body))

    def progress(self, task_id: str, lease_token: str, step: int, value: float
                 ) -> ProgressOut:
        """A training rung: extends the lease; ``go_on`` False means pruned."""
        path = task_path(task_id, "progress")
        body = _body(path, ProgressIn, lease_token=lease_token, step=step, value=value)
        return _answer(path, ProgressOut, self._post(path, body))

    def fail(self, task_id: str, lease_token: str, reason: str, message: str) -> FailOut:
        path = task_path(task_id, "fail")
        body = _body(path, FailIn, lease_token=lease_token, reason=reason,
                     message=message[:2000])
        return _answer(path, FailOut, self._post(path, body))

    def release(self, task_id: str, lease_token: str) -> ReleaseOut:
        path = task_path(task_id, "release")
        body = _body(path, LeaseTokenIn, lease_token=lease_token)
        return _answer(path, ReleaseOut, self._post(path, body))

    def worker_heartbeat(self, worker_id: str) -> None:
        self._post(worker_heartbeat_path(worker_id))


M = TypeVar("M", bound=BaseModel)


def _body(path: str, model: type[M], **fields: Any) -> M:
    """A request body; one that does not validate here would not validate at the API
    either, so it is a :class:`ProtocolError` (one line), not a traceback."""
    try:
        return model(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ProtocolError(f"{path}: invalid request: {loc}: {err['msg']}") from exc


def _answer(path: str, model: type[M], resp: httpx.Response) -> M:
    try:
        return model.model_validate(resp.json())
    except ValueError as exc:  # not JSON, or not the protocol's answer
        raise ProtocolError(f"{path}: unexpected answer: {str(exc).splitlines()[0]}") from exc
