"""Helpers shared by the command-line modules: one clear line on bad input, never a
traceback."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer


class CLIError(Exception):
    """Raised by commands for user-facing failures; printed as one line, exit code 2."""


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_spec_or_fail(arg: str):
    from blocks.load import SpecLoadError, load_spec

    try:
        return load_spec(arg)
    except SpecLoadError as exc:
        fail(str(exc))


def spec_text_or_fail(arg: str) -> str:
    """A SPEC argument as text that any process may read without a file system: a file
    the person named is read here, on their machine, and sent on as inline JSON."""
    from blocks.load import is_spec_text

    spec = load_spec_or_fail(arg)
    if is_spec_text(arg):
        return arg.strip()
    return json.dumps(spec.canonical_dict(), separators=(",", ":"))


def check_storage_or_fail(url: str, *, must_exist: bool = False,
                          make_folder: bool = False) -> None:
    """One clear line, before any work, for a storage URL that cannot work: not a URL, an
    unknown dialect (``postgres://`` for ``postgresql+psycopg://``), a SQLite file in a
    folder that does not exist (made only when ``make_folder``: the default output
    folder, never a path a person may have mistyped), or a server that does not answer."""
    import os

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    from search.study import redact_url, sqlite_path

    shown = redact_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        fail(f"--storage {shown!r} is not a database URL (sqlite:///PATH or "
             "postgresql+psycopg://USER@HOST:PORT/DB)")
    if parsed.drivername in ("postgres", "postgres+psycopg"):
        fail(f"--storage {shown}: the dialect is 'postgresql', not 'postgres' (e.g. "
             "postgresql+psycopg://USER@HOST:PORT/DB)")
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        fail(f"--storage {shown}: unknown database dialect {parsed.drivername!r} (sqlite or "
             "postgresql+psycopg)")
    path = sqlite_path(url)
    if path is not None:
        if must_exist and not os.path.isfile(path):
            fail(f"no search database at {path} (run fitnas search first, or give --storage)")
        folder = os.path.dirname(os.path.abspath(path))
        if not make_folder and not os.path.isdir(folder):
            fail(f"--storage {shown}: the folder {folder} does not exist")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            fail(f"--storage {shown}: cannot create the folder {folder} "
                 f"({exc.strerror or exc})")
        if not os.access(folder, os.W_OK):
            fail(f"--storage {shown}: the folder {folder} is not writable")
        return
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 10},
                               pool_pre_ping=False)
        with engine.connect() as con:
            con.execute(text("SELECT 1"))
        engine.dispose()
    except (SQLAlchemyError, ImportError) as exc:
        orig = getattr(exc, "orig", None) or exc
        first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(exc).__name__
        fail(f"cannot connect to the storage {shown}: {first}")


def load_config_defaults(ctx: typer.Context, _param: Any, value: str | None) -> str | None:
    """``--config FILE.yaml``: every option of the command from a YAML (or JSON) mapping,
    keyed by the option's name (``max-latency-ratio`` or ``max_latency_ratio``). Options
    given on the command line override the file. An unknown key, a file that does not
    parse, or a value of the wrong type is one error line."""
    if not value:
        return value
    from pathlib import Path

    import yaml

    path = Path(value)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        fail(f"--config {value}: {exc.strerror or exc}")
    except yaml.YAMLError as exc:
        fail(f"--config {value}: not YAML ({str(exc).splitlines()[0]})")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(f"--config {value}: expected a mapping of option names to values")
    params = {p.name: p for p in ctx.command.params if p.name and p.name != _param.name}
    by_key: dict[str, str] = {}  # option flag (max-latency-ratio) or name -> param name
    for name, p in params.items():
        by_key[name] = name
        for opt in getattr(p, "opts", ()):
            if opt.startswith("--"):
                by_key[opt[2:].replace("-", "_")] = name
    defaults: dict[str, Any] = {}
    for key, item in data.items():
        name = by_key.get(str(key).replace("-", "_"))
        if name is None:
            known = ", ".join(sorted(opt[2:] for p in params.values()
                                     for opt in getattr(p, "opts", ()) if opt.startswith("--")))
            fail(f"--config {value}: unknown option {key!r}; known: {known}")
        if isinstance(item, list) and not params[name].multiple:
            item = ",".join(str(x) for x in item)
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
