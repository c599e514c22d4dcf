"""Turn a user's SPEC argument into an :class:`ArchSpec`.

SPEC is one of: ``preset:NAME`` or ``preset:NAME@WIDTH``; a compact string
(``net_v1_...``); a path to a JSON file; or an inline JSON object.
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


def load_spec(arg: str) -> ArchSpec:
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
    path = Path(arg)
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
