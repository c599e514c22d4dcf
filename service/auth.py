"""Bearer-token authentication.

* API keys (``fnk_...``) identify a user (``owner``); they call everything under ``/v1``
  except the task protocol. A user sees only their own jobs.
* Worker tokens (``fnw_...``) are scoped to one target; they call only
  ``/v1/workers/register``, ``/v1/workers/{id}/heartbeat`` and ``/v1/tasks/...``. Using
  one for another target is 403.

Tokens are 256-bit random strings; only their SHA-256 is stored (a high-entropy secret
needs no slow hash), so a leaked database leaks no usable token.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db import Database, utcnow
from service.models import ApiKey, Target, WorkerToken

API_KEY_PREFIX = "fnk_"
WORKER_TOKEN_PREFIX = "fnw_"
TARGET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
# Writing last_used_at on every request would turn every read into a write; once a
# minute is plenty for "when was this key last used".
_TOUCH_EVERY = timedelta(seconds=60)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def new_id() -> str:
    return secrets.token_hex(8)


class AuthError(ValueError):
    """Bad input to an admin operation (one line for a person)."""


def validate_target_name(name: str) -> str:
    if not TARGET_NAME_RE.match(name or ""):
        raise AuthError(
            f"bad target name {name!r}: 1-64 characters, letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def create_api_key(db: Database, owner: str = "default") -> tuple[str, ApiKey]:
    """Make a user API key; returns (token, row). The token is shown once, never stored."""
    if not OWNER_RE.match(owner or ""):
        raise AuthError(
            f"bad key name {owner!r}: 1-100 characters, letters, digits, '.', '_', '@' or '-'"
        )
    token = new_token(API_KEY_PREFIX)

    def op(s: Session) -> ApiKey:
        row = ApiKey(id=new_id(), owner=owner, token_hash=hash_token(token), prefix=token[:10])
        s.add(row)
        return row

    return token, db.run(op)


def ensure_target(s: Session, name: str, description: str = "") -> Target:
    validate_target_name(name)
    row = s.get(Target, name)
    if row is None:
        row = Target(name=name, description=description)
        s.add(row)
        s.flush()
    return row


def create_worker_token(db: Database, target: str, name: str = "") -> tuple[str, WorkerToken]:
    """Make a worker token scoped to ``target`` (created if new); returns (token, row)."""
    validate_target_name(target)
    token = new_token(WORKER_TOKEN_PREFIX)

    def op(s: Session) -> WorkerToken:
        ensure_target(s, target)
        row = WorkerToken(
            id=new_id(), target=target, name=name, token_hash=hash_token(token),
            prefix=token[:10],
        )
        s.add(row)
        return row

    return token, db.run(op)


def revoke(db: Database, token_or_prefix: str) -> int:
    """Revoke API keys / worker tokens by full token or by the shown prefix."""
    now = utcnow()
    key = token_or_prefix.strip()

    def op(s: Session) -> int:
        n = 0
        for model in (ApiKey, WorkerToken):
            cond = (
                model.token_hash == hash_token(key)
                if len(key) > 20
                else model.prefix == key
            )
            n += s.execute(
                update(model).where(cond, model.revoked_at.is_(None)).values(revoked_at=now)
            ).rowcount
        return n

    return db.run(op)


# ---- request-time ------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    key_id: str
    owner: str


@dataclass(frozen=True)
class WorkerPrincipal:
    token_id: str
    target: str


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


def get_db(request: Request) -> Database:
    return request.app.state.db


def require_user(request: Request, db: Database = Depends(get_db)) -> User:
    token = _bearer(request)
    if token.startswith(WORKER_TOKEN_PREFIX):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "a worker token may only call /v1/workers/register, /v1/workers/{id}/heartbeat "
            "and /v1/tasks/*; use an API key (fitnas admin create-key)",
        )
    row = _lookup(db, ApiKey, token)
    return User(key_id=row.id, owner=row.owner)


def require_worker(request: Request, db: Database = Depends(get_db)) -> WorkerPrincipal:
    token = _bearer(request)
    if token.startswith(API_KEY_PREFIX):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "the task protocol needs a worker token (fitnas admin create-worker-token)",
        )
    row = _lookup(db, WorkerToken, token)
    return WorkerPrincipal(token_id=row.id, target=row.target)


def check_target(principal: WorkerPrincipal, target: str) -> None:
    if principal.target != target:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"this worker token is scoped to target {principal.target!r}, not {target!r}",
        )
