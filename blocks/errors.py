"""The error a structurally invalid spec raises; its own module so that the block kinds,
the shape walk and the cost model can all raise it without importing one another."""

from __future__ import annotations


class SpecError(ValueError):
    """A spec that validates field by field but cannot be built; ``field`` is a dotted path
    such as ``stages[3].block.groups``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
