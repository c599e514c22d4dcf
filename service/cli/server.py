"""Server-side commands: ``fitnas serve``, ``fitnas db upgrade|current``,
``fitnas admin create-key|create-worker-token|revoke``.

Configuration comes from ``FITNAS_*`` environment variables (service/settings.py); the
options here override the few that matter on a command line. Web-stack imports happen
inside the commands.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from service.cli.common import fail

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
admin_app = typer.Typer(help="API keys and worker tokens.", no_args_is_help=True)

_DB_URL = typer.Option(
    None, "--database-url", envvar="FITNAS_DATABASE_URL", show_envvar=True,
    help="SQLAlchemy URL of the fitnas database [default: sqlite:///./fitnas.db]",
)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _settings(database_url: str | None = None):
    from pydantic import ValidationError

    from service.settings import get_settings

    if database_url:
        os.environ["FITNAS_DATABASE_URL"] = database_url
    get_settings.cache_clear()
    try:
        return get_settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        fail(f"FITNAS_{loc.upper()}: {msg}" if loc else msg)
    except ValueError as exc:  # a FITNAS_*_FILE that cannot be read
        fail(str(exc))


def _redact(url: str) -> str:
    from search.study import redact_url

    return redact_url(url)


def _schema_state(url: str) -> tuple[str | None, str]:
    import migrations

    try:
        return migrations.current_revision(url), migrations.head_revision()
    except Exception as exc:
        fail(f"cannot reach the database {_redact(url)}: {_first_line(exc)}")


def _upgrade(url: str) -> str:
    import migrations

    try:
        migrations.upgrade(url)
    except Exception as exc:
        fail(f"migration of {_redact(url)} failed: {_first_line(exc)}")
    return migrations.head_revision()


def _ensure_schema(url: str, migrate: bool | None) -> None:
    """Upgrade when asked (or, by default, when the database is a SQLite file: the
    embedded single-process setup); otherwise refuse to run on an old schema."""
    current, head = _schema_state(url)
    if current == head:
        return
    if migrate is None:
        migrate = url.startswith("sqlite")
    if migrate:
        _upgrade(url)
        typer.echo(f"database {_redact(url)} migrated to {head}", err=True)
        return
    fail(
        f"database {_redact(url)} is at revision {current or 'none'}, this version needs "
        f"{head}: run `fitnas db upgrade` first"
    )


def _open_db(url: str | None, migrate: bool | None = None):
    from service.db import Database, DatabaseConfigError

    settings = _settings(url)
    _ensure_schema(settings.database_url, migrate)
    try:
        return settings, Database.from_settings(settings)
    except DatabaseConfigError as exc:
        fail(str(exc))


# ---- serve ----------------------------------------------------------------------------------


def serve(
    host: str = typer.Option(None, help="bind address [default: FITNAS_HOST or 127.0.0.1]"),
    port: int = typer.Option(None, help="port [default: FITNAS_PORT or 8000]"),
    database_url: str = _DB_URL,
    workers: int = typer.Option(1, min=1, max=64, help="API processes (each runs a "
                                "scheduler; they share jobs through per-job locks)"),
    migrate: bool = typer.Option(
        None, "--migrate/--no-migrate",
        help="upgrade the database schema first [default: only for SQLite]",
    ),
    scheduler: bool = typer.Option(None, "--scheduler/--no-scheduler",
                                   help="run the scheduler in this process "
                                   "[default: FITNAS_SCHEDULER_ENABLED or on]"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
) -> None:
    """Run the API (and its scheduler) with uvicorn."""
    from service.db import DatabaseConfigError, make_engine

    if scheduler is not None:
        os.environ["FITNAS_SCHEDULER_ENABLED"] = "true" if scheduler else "false"
    settings = _settings(database_url)
    try:
        make_engine(settings.database_url).dispose()
    except DatabaseConfigError as exc:
        fail(str(exc))
    _ensure_schema(settings.database_url, migrate)

    import uvicorn

    host = host or settings.host
    port = port or settings.port
    typer.echo(
        f"fitnas API on http://{host}:{port} (database {_redact(settings.database_url)}, "
        f"optuna {_redact(settings.optuna_url)}, scheduler "
        f"{'on' if settings.scheduler_enabled else 'off'})",
        err=True,
    )
    try:
        uvicorn.run(
            "service.api.app:create_app", factory=True, host=host, port=port, workers=workers,
            log_level=log_level, proxy_headers=True,
        )
    except OSError as exc:
        fail(f"cannot serve on {host}:{port}: {exc.strerror or exc}")


# ---- db -------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(
    database_url: str = _DB_URL,
    readonly_role: str | None = typer.Option(
        None, "--readonly-role", envvar="FITNAS_READONLY_ROLE",
        help="PostgreSQL: also create (or update) this login role with SELECT on every "
             "table, for optuna-dashboard; its password from FITNAS_READONLY_PASSWORD or "
             "FITNAS_READONLY_PASSWORD_FILE"),
) -> None:
    """Create or upgrade the fitnas tables to this version's schema, and Optuna's."""
    settings = _settings(database_url)
    current, head = _schema_state(settings.database_url)
    if current == head:
        typer.echo(f"database {_redact(settings.database_url)} already at {head}")
    else:
        _upgrade(settings.database_url)
        typer.echo(f"database {_redact(settings.database_url)} upgraded from "
                   f"{current or 'empty'} to {head}")
    _optuna_schema(settings.optuna_url)
    if readonly_role:
        for url in dict.fromkeys([settings.database_url, settings.optuna_url]):
            _grant_readonly(url, readonly_role)
        typer.echo(f"read-only role {readonly_role!r} can read the fitnas and Optuna tables")


def _optuna_schema(url: str) -> None:
    """Optuna's tables, made here once, so that processes starting together (API
    replicas, the dashboard) never race to create them, and a read-only dashboard finds
    them."""
    from search.study import SearchError, make_storage

    try:
        storage = make_storage(url)
    except SearchError as exc:
        fail(str(exc))
    storage.engine.dispose()


def _readonly_password() -> str:
    from service.secrets import read_secret_file

    if os.environ.get("FITNAS_READONLY_PASSWORD"):
        return os.environ["FITNAS_READONLY_PASSWORD"]
    path = os.environ.get("FITNAS_READONLY_PASSWORD_FILE")
    if path:
        try:
            return read_secret_file("FITNAS_READONLY_PASSWORD_FILE", path)
        except ValueError as exc:
            fail(str(exc))
    fail("--readonly-role needs a password: FITNAS_READONLY_PASSWORD or "
         "FITNAS_READONLY_PASSWORD_FILE")


def _grant_readonly(url: str, role: str) -> None:
    """A login role that can read every table of the database's public schema, now and
    later (default privileges of the migrating user), and write none."""
    import re

    from sqlalchemy import create_engine

    if not url.startswith("postgresql"):
        fail(f"--readonly-role needs PostgreSQL (the database is {_redact(url)})")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", role):
        fail(f"--readonly-role {role!r}: lower-case letters, digits and _ only")
    password = _readonly_password()
    from psycopg import sql

    engine = create_engine(url)
    try:
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            r = sql.Identifier(role)
            cur.execute(sql.SQL(verb + " ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB "
                                "NOCREATEROLE PASSWORD {}").format(r, sql.Literal(password)))
            cur.execute("SELECT current_database()")
            db = cur.fetchone()[0]
            for stmt in ("GRANT CONNECT ON DATABASE {db} TO {r}",
                         "GRANT USAGE ON SCHEMA public TO {r}",
                         "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {r}",
                         "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES "
                         "TO {r}"):
                cur.execute(sql.SQL(stmt).format(db=sql.Identifier(db), r=r))
            raw.commit()
        finally:
            raw.close()
    except Exception as exc:
        fail(f"read-only role {role!r} on {_redact(url)}: {_first_line(exc)}")
    finally:
        engine.dispose()


@db_app.command("current")
def db_current(database_url: str = _DB_URL) -> None:
    """Show the database's schema revision and this version's."""
    settings = _settings(database_url)
    current, head = _schema_state(settings.database_url)
    state = "up to date" if current == head else "needs `fitnas db upgrade`"
    typer.echo(f"database {current or 'none'}, code {head}: {state}")


# ---- admin ----------------------------------------------------------------------------------


@admin_app.command("create-key")
def create_key(
    name: str = typer.Option("default", "--name", help="the user this key belongs to; keys "
                             "with the same name share jobs"),
    database_url: str = _DB_URL,
) -> None:
    """Make a user API key. Prints the key (once) on stdout."""
    from service.tokens import AuthError, create_api_key

    _, db = _open_db(database_url)
    try:
        token, row = create_api_key(db, name)
    except AuthError as exc:
        fail(str(exc))
    finally:
        db.dispose()
    typer.echo(f"API key {row.prefix}... for user {name!r}; it is shown only now", err=True)
    typer.echo(token)


@admin_app.command("create-worker-token")
def create_worker_token_cmd(
    target: str = typer.Option(..., "--target", help="the target (device class) this "
                               "token may serve; created if new"),
    name: str = typer.Option("", "--name", help="a label for the token"),
    role: str = typer.Option("latency", "--role", help="latency: measures candidates on "
                             "the target's device; trainer: trains candidates for the pool "
                             "named by --target (a job's trainer_pool, 'trainers' by default)"),
    write_to: Path | None = typer.Option(
        None, "--write-to", help="write the token to this file (mode 0600) instead of "
        "stdout, for a worker's FITNAS_WORKER_TOKEN_FILE; a file that already holds a "
        "token is kept (a bootstrap that runs on every start makes one token once)"),
    database_url: str = _DB_URL,
) -> None:
    """Make a worker token scoped to one target (or trainer pool) and role. Prints the
    token (once) on stdout."""
    from service.tokens import AuthError, create_worker_token

    if write_to is not None and write_to.is_file() and write_to.read_text().strip():
        typer.echo(f"{write_to} already holds a worker token; kept", err=True)
        return
    _, db = _open_db(database_url)
    try:
        token, row = create_worker_token(db, target, name, role)
    except AuthError as exc:
        fail(str(exc))
    finally:
        db.dispose()
    if write_to is not None:
        try:
            write_to.parent.mkdir(parents=True, exist_ok=True)
            tmp = write_to.with_name(write_to.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(token + "\n")
            os.replace(tmp, write_to)  # a worker waiting for it never reads half a token
        except OSError as exc:
            fail(f"cannot write {write_to}: {exc.strerror or exc}")
        typer.echo(f"{role} token {row.prefix}... for target {target!r} written to "
                   f"{write_to}", err=True)
        return
    typer.echo(f"{role} token {row.prefix}... for target {target!r}; it is shown only now",
               err=True)
    typer.echo(token)


@admin_app.command("revoke")
def revoke_cmd(
    token: str = typer.Argument(..., help="the key/token, or the prefix shown when it was made"),
    database_url: str = _DB_URL,
) -> None:
    """Revoke an API key or a worker token."""
    from service.tokens import revoke

    _, db = _open_db(database_url)
    try:
        n = revoke(db, token)
    finally:
        db.dispose()
    if n == 0:
        fail("no active key or token matches")
    typer.echo(f"revoked {n}")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(db_app, name="db")
    app.add_typer(admin_app, name="admin")
