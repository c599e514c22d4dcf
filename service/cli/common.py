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


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
