"""Request-time dependencies of the API, as ``Annotated`` aliases that routes declare as
parameter types (``db: DatabaseDep``, ``user: CurrentUser``): the database, the settings,
the metrics, the scheduler wake-up, and the bearer-token checks (an API key for a user, a
worker token scoped to one target for a worker).

Tokens are 256-bit random strings; only their SHA-256 is stored (``service/tokens.py``),
so a lookup is one indexed equality on the hash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.api.metrics import Metrics, NullMetrics
from service.db import Database, utcnow
from service.models import ApiKey, WorkerToken
from service.settings import Settings
from service.states import WorkerRole
from service.tokens import API_KEY_PREFIX, WORKER_TOKEN_PREFIX, hash_token

# Writing last_used_at on every request would turn every read into a write; once a
# minute is plenty for "when was this key last used".
_TOUCH_EVERY = timedelta(seconds=60)

@dataclass(frozen=True)
class User:
    key_id: str
    owner: str


@dataclass(frozen=True)
class WorkerPrincipal:
    token_id: str
    target: str
    role: str = WorkerRole.LATENCY


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer <API key or worker token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token.strip()


def _lookup(db: Database, model, token: str):
    th = hash_token(token)
    now = utcnow()

    def read(s: Session):
        return s.execute(select(model).where(model.token_hash == th)).scalar_one_or_none()

    row = db.run(read, write=False)
    if row is None or row.revoked_at is not None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid or revoked token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if row.last_used_at is None or now - row.last_used_at > _TOUCH_EVERY:

        def touch(s: Session) -> None:
            s.execute(update(model).where(model.id == row.id).values(last_used_at=now))

        db.run(touch)
    return row


# Declares the scheme in the OpenAPI document (so that /docs has "Authorize" and "Try it
# out" sends the token); the checks themselves, with their one-line messages, are ours.
bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="bearer",
    description="an API key (fnk_..., `fitnas admin create-key`) for the job routes; a "
    "worker token (fnw_..., `fitnas admin create-worker-token --target T`) for the task "
    "protocol")
Credentials = HTTPAuthorizationCredentials | None
DeclaredBearer = Annotated[Credentials, Security(bearer_scheme)]


# Documented on every authenticated route (OpenAPI ``responses``).
AUTH_RESPONSES: dict[int | str, dict] = {
    401: {"description": "Missing, invalid or revoked bearer token"},
    403: {"description": "The token may not call this route (a worker token on a job "
          "route, an API key on the task protocol, or another target's worker token)"},
}
BODY_RESPONSES: dict[int | str, dict] = {
    413: {"description": "Request body over this route's size limit (refused before it "
          "is read)"},
    422: {"description": "Invalid request: the field and the reason (strict JSON: no "
          "NaN/Infinity, NUL or lone surrogates)"},
}


def get_db(request: Request) -> Database:
    return request.app.state.db


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics | NullMetrics:
    return getattr(request.app.state, "metrics", None) or NullMetrics()


def get_wake(request: Request) -> Callable[[], None]:
    """Run the next scheduler tick now (a no-op where this process runs no scheduler)."""
    loop = getattr(request.app.state, "scheduler_loop", None)
    return loop.wake if loop is not None else _no_wake


def _no_wake() -> None:
    pass


DatabaseDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
MetricsDep = Annotated[Metrics | NullMetrics, Depends(get_metrics)]
WakeScheduler = Annotated[Callable[[], None], Depends(get_wake)]


def require_user(request: Request, db: DatabaseDep,
                 _declared: DeclaredBearer) -> User:
    token = _bearer(request)
    if token.startswith(WORKER_TOKEN_PREFIX):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "a worker token may only call /v1/workers/register, /v1/workers/{id}/heartbeat "
            "and /v1/tasks/*; use an API key (fitnas admin create-key)",
        )
    row = _lookup(db, ApiKey, token)
    return User(key_id=row.id, owner=row.owner)


def require_worker(request: Request, db: DatabaseDep,
                   _declared: DeclaredBearer) -> WorkerPrincipal:
    token = _bearer(request)
    if token.startswith(API_KEY_PREFIX):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "the task protocol needs a worker token (fitnas admin create-worker-token)",
        )
    row = _lookup(db, WorkerToken, token)
    return WorkerPrincipal(token_id=row.id, target=row.target, role=row.role)


def check_target(principal: WorkerPrincipal, target: str) -> None:
    if principal.target != target:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"this worker token is scoped to target {principal.target!r}, not {target!r}",
        )


def check_role(principal: WorkerPrincipal, role: str) -> None:
    """403 unless the token's role is ``role``, naming the ``--role`` to run with."""
    if principal.role != role:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"this worker token is for the {principal.role!r} role, not {role!r}: run "
            f"fitnas worker --role {principal.role}",
        )


CurrentUser = Annotated[User, Depends(require_user)]
CurrentWorker = Annotated[WorkerPrincipal, Depends(require_worker)]
