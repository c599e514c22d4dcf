"""``bottleneck``: the ResNet / ResNeXt bottleneck, optionally with squeeze-and-excitation
on its residual branch (SE-ResNeXt)."""

from __future__ import annotations

from typing import Any, Literal

from blocks.fields import BlockSpec, Channels, Dilation, Groups, SESpec, canonical_se
from blocks.kinds.base import BlockKind, divides, one_by_one_dilation
from blocks.layers import Bottleneck
from blocks.recipe import NORM, Act, call, se_call


class BottleneckBlock(BlockSpec):
    """ResNet/ResNeXt bottleneck: 1x1 -> kxk (grouped, strided) -> 1x1, norm after each,
    act after the first two and after the residual sum; projection shortcut (1x1 conv +
    norm) when stride or width changes. ``se`` acts on the branch's output (``out``
    channels; SE-ResNeXt: ratio 1/16) before the sum."""

    added_fields = ("se",)

    kind: Literal["bottleneck"] = "bottleneck"
    mid_channels: Channels
    groups: Groups = 1
    dilation: Dilation = 1
    se: SESpec | None = None


def check(b: BottleneckBlock, field: str, cin: int) -> None:
    divides(f"{field}.groups", b.groups, b.mid_channels, "mid_channels")


def recipe(b: BottleneckBlock, cin: int, cout: int):
    return call(Bottleneck, cin, cout, mid_channels=b.mid_channels, kernel=b.kernel,
                stride=b.stride, groups=b.groups, dilation=b.dilation, norm_layer=NORM,
                act_layer=Act(b.act), se=se_call(b.se, cin, cout))


def cost(g, b: BottleneckBlock, cin: int, cout: int, x: int) -> int:
    y = g.conv(x, b.mid_channels)
    y = g.conv(y, b.mid_channels, b.kernel, b.stride, b.groups, b.dilation)
    y = g.conv(y, cout)
    if b.se is not None:
        y = g.se(y, b.se, cin, cout)
    s = g.conv(x, cout, 1, b.stride) if (b.stride != 1 or cin != cout) else x
    return g.merge((y, s))


def canonical(b: BottleneckBlock, ins: tuple[int, ...]) -> dict[str, Any]:
    out = one_by_one_dilation(b)
    if b.se is not None:
        out["se"] = canonical_se(b.se, [(cin, b.out_channels) for cin in ins])
    return out


KIND = BlockKind(BottleneckBlock, "bot", recipe, cost, check, canonical)
