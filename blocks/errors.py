"""The error a structurally invalid spec raises; its own module so that the block kinds,
the shape walk and the cost model can all raise it without importing one another."""

from __future__ import annotations

from typing import Any


class SpecError(ValueError):
    """A spec that validates field by field but cannot be built; ``field`` is a dotted path
    such as ``stages[3].block.groups``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def validation_message(errors: list[dict[str, Any]], count: int) -> str:
    """One line for a pydantic ``ValidationError`` (``exc.errors()``, ``exc.error_count()``):
    the first error's field path and reason, and how many more there are."""
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "spec"
    more = f" (and {count - 1} more)" if count > 1 else ""
    return f"{loc}: {first['msg']}{more}"
