"""``shuffle``: the ShuffleNet V1 unit (grouped 1x1, channel shuffle, depthwise kxk)."""

from __future__ import annotations

from typing import Any, Literal

from blocks.errors import SpecError
from blocks.fields import BlockSpec, Channels, Groups
from blocks.kinds.base import BlockKind, divides
from blocks.layers import ShuffleUnit
from blocks.recipe import NORM, Act, call


class ShuffleBlock(BlockSpec):
    """ShuffleNet V1 unit: grouped 1x1 -> act -> channel shuffle -> depthwise kxk ->
    grouped 1x1; stride 1 adds the input, stride 2 concatenates a 3x3 average-pooled
    input (the branch then produces ``out - in`` channels). ``first_groups`` overrides
    the groups of the first 1x1 (ShuffleNet does not group it in its first unit)."""

    kind: Literal["shuffle"] = "shuffle"
    mid_channels: Channels
    groups: Groups = 3
    first_groups: Groups | None = None


def check(b: ShuffleBlock, field: str, cin: int) -> None:
    cout = b.out_channels
    g1 = b.groups if b.first_groups is None else b.first_groups
    if b.stride not in (1, 2):
        raise SpecError(f"{field}.stride", "a ShuffleNet unit has stride 1 or 2")
    if b.stride == 1 and cin != cout:
        raise SpecError(
            f"{field}.out_channels",
            f"a stride-1 ShuffleNet unit adds its input, so out_channels must equal the "
            f"input width {cin} (got {cout})",
        )
    if b.stride == 2 and cout <= cin:
        raise SpecError(
            f"{field}.out_channels",
            f"a stride-2 ShuffleNet unit concatenates its input, so out_channels must exceed "
            f"the input width {cin} (got {cout})",
        )
    branch = cout - cin if b.stride == 2 else cout
    field_g1 = f"{field}.first_groups" if b.first_groups is not None else f"{field}.groups"
    divides(field_g1, g1, cin, "the input width")
    divides(field_g1, g1, b.mid_channels, "mid_channels")
    divides(f"{field}.groups", b.groups, b.mid_channels, "mid_channels")
    divides(f"{field}.groups", b.groups, branch, "the branch width (out - in)")


def recipe(b: ShuffleBlock, cin: int, cout: int):
    return call(ShuffleUnit, cin, cout, mid_channels=b.mid_channels, groups=b.groups,
                first_groups=b.first_groups, kernel=b.kernel, stride=b.stride,
                norm_layer=NORM, act_layer=Act(b.act))


def cost(g, b: ShuffleBlock, cin: int, cout: int, x: int) -> int:
    g1 = b.groups if b.first_groups is None else b.first_groups
    branch = cout - cin if b.stride > 1 else cout
    y = g.conv(x, b.mid_channels, 1, 1, g1)
    y = g.shuffle(y)
    y = g.conv(y, b.mid_channels, b.kernel, b.stride, b.mid_channels)
    y = g.conv(y, branch, 1, 1, b.groups)
    if b.stride > 1:
        p = g.pool(x, 3, b.stride)
        return g.merge((p, y), cout)
    return g.merge((x, y))


def canonical(b: ShuffleBlock, ins: tuple[int, ...]) -> dict[str, Any]:
    return {"first_groups": None} if b.first_groups == b.groups else {}


KIND = BlockKind(ShuffleBlock, "sh", recipe, cost, check, canonical)
