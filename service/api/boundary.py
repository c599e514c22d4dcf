"""The API's hard boundary for request bodies, in front of every route.

A pure ASGI middleware, so that it runs before FastAPI reads anything:

* **Size.** A body larger than its route's limit is answered 413 before it is read: at
  once from ``Content-Length``, or, for a chunked body, as soon as the bytes received
  pass the limit. Nothing larger than the limit is ever held in memory.
* **Strict JSON.** JSON bodies are parsed once here, off the event loop (a worker
  thread), with the rules the database and every client can live with: no ``NaN``,
  ``Infinity`` or number that overflows a double, no NUL character and no lone
  surrogate in any string or key, and a bounded nesting depth. A violation is a 422
  naming where it is; the body is never echoed back.

Why here and not in pydantic: Python's ``json`` accepts ``NaN`` and ``1e309`` (as
``inf``), and such a value then fails late and as the wrong status (a 500 when FastAPI
renders the 422, a 503 when PostgreSQL refuses it). Checking the bytes once, at the
door, gives every route, the worker routes included, the same rules.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KIB = 1024
MAX_DEPTH = 32
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class StrictJSONError(ValueError):
    """The body is not strict JSON; ``where`` is a JSON-pointer-like path."""

    def __init__(self, reason: str, where: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.where = where


def _reject_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"number {text[:40]} overflows a double")
    return value


def _bad_string(s: str) -> str | None:
    if "\x00" in s:
        return "NUL character in a string"
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return "lone surrogate in a string"
    return None


def check_value(value: Any, path: str = "", depth: int = 0) -> None:
    """Walk a parsed JSON value; raise StrictJSONError at the first string or nesting
    that the rules above refuse."""
    if depth > MAX_DEPTH:
        raise StrictJSONError(f"nested deeper than {MAX_DEPTH} levels", path)
    if isinstance(value, str):
        reason = _bad_string(value)
        if reason:
            raise StrictJSONError(reason, path)
    elif isinstance(value, dict):
        for key, item in value.items():
            reason = _bad_string(key)
            if reason:
                raise StrictJSONError(reason + " (a key)", path)
            check_value(item, f"{path}/{key[:64]}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_value(item, f"{path}/{i}", depth + 1)


def parse_strict(body: bytes) -> Any:
    """Parse ``body`` as strict JSON (see the module docstring)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"body is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except StrictJSONError:
        raise
    except RecursionError:
        raise StrictJSONError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise StrictJSONError(f"invalid JSON: {str(exc)[:120]}") from None
    check_value(value)
    return value


class BodyLimits:
    """The largest body each route accepts: the first (method, path pattern) that
    matches gives the limit, the default applies elsewhere."""

    def __init__(self, default: int, routes: Iterable[tuple[str, str, int]] = ()):
        self.default = default
        self.routes = [(m, re.compile(pattern), limit) for m, pattern, limit in routes]

    @classmethod
    def from_settings(cls, settings: Any) -> BodyLimits:
        return cls(settings.max_body_bytes, [
            ("POST", r"/v1/jobs/?", settings.max_job_body_bytes),
            ("POST", r"/v1/tasks/[^/]+/(result|fail)/?", settings.max_result_body_bytes),
        ])

    def limit_for(self, method: str, path: str) -> int:
        for m, pattern, limit in self.routes:
            if m == method and pattern.fullmatch(path):
                return limit
        return self.default


async def _json_reply(send: Send, status: int, detail: Any, headers=()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: body size limit (413) and strict JSON (422) for every route."""

    def __init__(self, app: ASGIApp, limits: BodyLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
                "\x00" in scope["path"] or b"%00" in scope.get("query_string", b"").lower()):
            await _json_reply(send, 422, [{"type": "strict_json", "loc": ["path"],
                                           "msg": "NUL character in the URL"}])
            return
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limits.limit_for(scope["method"], scope["path"])
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _json_reply(send, 400, "invalid Content-Length")
                return
            if size > limit:
                await _too_large(send, limit)
                return
        chunks: list[bytes] = []
        received = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                await _too_large(send, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if body and (ctype == b"application/json" or ctype.endswith(b"+json")):
            try:
                await anyio.to_thread.run_sync(parse_strict, body)
            except StrictJSONError as exc:
                loc = ["body", *[p for p in exc.where.split("/") if p]]
                await _json_reply(send, 422, [{"type": "strict_json", "loc": loc,
                                               "msg": exc.reason}])
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---- 422 replies that name the field and never echo the whole input -------------------

MAX_ERRORS = 10
MAX_ECHO = 120


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + f"... ({len(text)} chars)"


def validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's errors, made safe to send: the field path, the reason and the error type,
    with at most :data:`MAX_ECHO` characters of the offending input as a string (a NaN
    or a 50 MB string never reaches the JSON encoder), and at most :data:`MAX_ERRORS`."""
    out = []
    for err in errors[:MAX_ERRORS]:
        item = {"type": err.get("type", "value_error"),
                "loc": [p if isinstance(p, int) else _short(str(p)) for p in err.get("loc", ())],
                "msg": _short(str(err.get("msg", "")))}
        if "input" in err and not isinstance(err["input"], dict | list):
            item["input"] = _short(err["input"])
        out.append(item)
    if len(errors) > MAX_ERRORS:
        out.append({"type": "more", "loc": [], "msg": f"{len(errors) - MAX_ERRORS} more"})
    return out


async def _too_large(send: Send, limit: int) -> None:
    await _json_reply(send, 413, f"request body over the limit of {limit} bytes")
