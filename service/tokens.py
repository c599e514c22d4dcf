"""API keys and worker tokens: making, hashing and revoking them (the request-time checks
are ``service/api/deps.py``).

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

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.db import Database, new_id, utcnow
from service.models import ApiKey, Target, WorkerToken
from service.states import WorkerRole

API_KEY_PREFIX = "fnk_"
WORKER_TOKEN_PREFIX = "fnw_"
TARGET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


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


def create_worker_token(db: Database, target: str, name: str = "",
                        role: str = WorkerRole.LATENCY) -> tuple[str, WorkerToken]:
    """Make a worker token scoped to ``target`` (created if new) with a role: a latency
    worker of that target, or a trainer of the pool of that name. Returns (token, row)."""
    validate_target_name(target)
    try:
        role = WorkerRole(role)
    except ValueError:
        raise AuthError(f"bad role {role!r}: latency or trainer") from None
    token = new_token(WORKER_TOKEN_PREFIX)

    def op(s: Session) -> WorkerToken:
        ensure_target(s, target)
        row = WorkerToken(
            id=new_id(), target=target, name=name, role=role.value,
            token_hash=hash_token(token), prefix=token[:10],
        )
        s.add(row)
        return row

    return token, db.run(op)


def revoke(db: Database, token_or_prefix: str) -> int:
    """Revoke API keys / worker tokens by full token or by the shown prefix, as printed
    (``fnk_07qRWi...``: the dots may be pasted along)."""
    now = utcnow()
    key = token_or_prefix.strip().removesuffix("...").removesuffix("\u2026")

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
