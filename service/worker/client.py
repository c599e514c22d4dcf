"""The worker's side of the worker <-> API protocol: one HTTP client, the errors its
answers map to, and the backoff used while the API is away.

A 409 (``LeaseLost``) means the lease token is stale; 404 on a worker endpoint
(``UnknownWorker``) means register again; 401/403 (``Unauthorized``) is fatal; transient
answers and refused connections (``ApiUnavailable``) are retried by the caller."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx

from search.evaluators.types import EvalOutcome
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
