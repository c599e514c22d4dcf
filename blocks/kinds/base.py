"""What one block kind is: :class:`BlockKind`, the entry of the table in
:mod:`blocks.kinds`.

An entry gathers everything fitnas knows about a kind, so that adding one is one module
and one line in the table:

* ``spec``: the pydantic class of its fields (with a ``kind`` literal);
* ``prefix``: its compact-form prefix (``ir``), and ``keys``: compact token keys for the
  fields that only this kind has;
* ``check(block, field, cin)``: the structural rules, raising :class:`SpecError` naming
  the field;
* ``recipe(block, cin, cout)``: the constructor call (:mod:`blocks.recipe`) the builder
  instantiates and the PyTorch export writes out;
* ``cost(g, block, cin, cout, x)``: the same layers on the cost model's graph
  (:class:`blocks.cost.CostGraph`), returning the output tensor;
* ``canonical(block, ins)``: the fields that cannot change the built network, given the
  input width of each repeat of the stage, set to one canonical value (so one network
  has one hash).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blocks.errors import SpecError
from blocks.fields import BlockSpec


def divides(field: str, groups: int, channels: int, what: str) -> None:
    if channels % groups:
        raise SpecError(field, f"groups={groups} does not divide {what} ({channels} channels)")


def _no_check(block: Any, field: str, cin: int) -> None:
    return None


def _no_canonical(block: Any, ins: tuple[int, ...]) -> dict[str, Any]:
    return {}


def one_by_one_dilation(block: Any) -> dict[str, Any]:
    """Dilation does nothing to a 1x1 kernel."""
    return {"dilation": 1} if block.kernel == 1 and block.dilation != 1 else {}


def strides(block: Any, ins: tuple[int, ...]) -> list[int]:
    """The stride of each repeat: the stage's for the first, 1 for the others."""
    return [block.stride] + [1] * (len(ins) - 1)


def keeps_shape(block: Any, ins: tuple[int, ...]) -> list[bool]:
    """Per repeat: stride 1 and equal widths, where an identity shortcut fits."""
    return [s == 1 and cin == block.out_channels
            for s, cin in zip(strides(block, ins), ins, strict=True)]


def takes_shortcut(block: Any, cin: int, cout: int) -> bool:
    """For a block whose shortcut is skipped where it does not fit (``ds``, ``mbconv``):
    an identity where stride is 1 and widths match, a projection wherever one is asked."""
    return bool(block.residual and (block.projection or (block.stride == 1 and cin == cout)))


def canonical_projection(block: Any, ins: tuple[int, ...]) -> dict[str, Any]:
    """``projection`` does nothing without a residual, or when every repeat keeps its
    shape (the identity serves)."""
    if block.projection and (not block.residual or all(keeps_shape(block, ins))):
        return {"projection": False}
    return {}


def canonical_residual(block: Any, ins: tuple[int, ...], default: bool) -> dict[str, Any]:
    """The ``residual`` and ``projection`` of a block whose shortcut is skipped where it
    does not fit (``ds``, ``mbconv``): ``projection`` as above; ``residual`` at its default
    when no repeat can take a shortcut."""
    out = canonical_projection(block, ins)
    projection = out.get("projection", block.projection)
    if not projection and not any(keeps_shape(block, ins)):
        out["residual"] = default
    return out


@dataclass(frozen=True)
class BlockKind:
    spec: type[BlockSpec]
    prefix: str
    recipe: Callable[..., Any]
    cost: Callable[..., int]
    check: Callable[[Any, str, int], None] = _no_check
    canonical: Callable[[Any, tuple[int, ...]], dict[str, Any]] = _no_canonical
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.model_fields["kind"].default
