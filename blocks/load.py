"""Turn a user's SPEC argument into an :class:`ArchSpec`.

SPEC is one of: ``preset:NAME`` or ``preset:NAME@WIDTH``; a compact string
(``net_v1_...``); an inline JSON object; or, on the command line only, a path to a JSON
file.

Two entry points, so that no string that came over the wire is ever opened as a file:
:func:`parse_spec` never touches the file system (the API, the scheduler and every
evaluator use it), and :func:`load_spec` adds the file form for a person at a terminal.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from blocks.compact import CompactFormatError, from_compact
from blocks.errors import validation_message
from blocks.presets import PRESETS, preset
from blocks.spec import ArchSpec


class SpecLoadError(ValueError):
    """SPEC could not be read; the message is one line meant for a person."""


def _validation_message(exc: ValidationError) -> str:
    return validation_message(exc.errors(), exc.error_count())


def spec_from_dict(data: object) -> ArchSpec:
    try:
        return ArchSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecLoadError(f"invalid spec: {_validation_message(exc)}") from exc


SPEC_TEXT_FORMS = "preset:NAME[@WIDTH], a compact spec (net_v1_...) or inline JSON"


def is_spec_text(arg: str) -> bool:
    """Whether ``arg`` has one of the forms :func:`parse_spec` reads (never a path)."""
    arg = arg.strip()
    return arg.startswith(("preset:", "net", "{"))


def parse_spec(arg: str) -> ArchSpec:
    """A SPEC given as text: a preset, a compact string or inline JSON. Never opens a
    file: anything else is a :class:`SpecLoadError`, whatever the file system holds."""
    arg = arg.strip()
    if arg.startswith("preset:"):
        name, _, width = arg[len("preset:"):].partition("@")
        if name not in PRESETS:
            raise SpecLoadError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        try:
            w = float(width) if width else 1.0
        except ValueError:
            raise SpecLoadError(f"bad width {width!r} in {arg!r}: expected a number") from None
        try:
            return preset(name, w)
        except (ValueError, ValidationError) as exc:
            raise SpecLoadError(str(exc).splitlines()[0]) from exc
    if arg.startswith("net"):
        try:
            return from_compact(arg)
        except CompactFormatError as exc:
            raise SpecLoadError(str(exc).splitlines()[0]) from exc
    if arg.startswith("{"):
        try:
            return spec_from_dict(json.loads(arg))
        except json.JSONDecodeError as exc:
            raise SpecLoadError(f"inline JSON does not parse: {exc}") from exc
    raise SpecLoadError(f"a SPEC here is {SPEC_TEXT_FORMS}, never a path")


def load_spec(arg: str) -> ArchSpec:
    """A SPEC from a person at a terminal: :func:`parse_spec`'s forms, or a JSON file."""
    if is_spec_text(arg):
        return parse_spec(arg)
    path = Path(arg.strip())
    if not path.is_file():
        raise SpecLoadError(
            f"{arg!r} is not a preset (preset:NAME[@WIDTH]), a compact spec (net_v1_...), "
            "inline JSON or an existing JSON file"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecLoadError(f"{path}: not a readable JSON file ({exc})") from exc
    if isinstance(data, dict) and "spec" in data and "stages" not in data:
        data = data["spec"]  # an export bundle or a job result that wraps the spec
    return spec_from_dict(data)
