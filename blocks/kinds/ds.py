"""``ds``: MobileNetV1's depthwise separable block, optionally with SE."""

from __future__ import annotations

from typing import Any, Literal

from blocks.fields import BlockSpec, Dilation, SESpec, canonical_se
from blocks.kinds.base import (
    BlockKind,
    canonical_residual,
    one_by_one_dilation,
    takes_shortcut,
)
from blocks.layers import DepthwiseSeparable
from blocks.recipe import NORM, Act, call, se_call


class DepthwiseSeparableBlock(BlockSpec):
    """MobileNetV1: depthwise kxk-norm-act [-> SE] -> pointwise 1x1-norm[-act]. ``residual``
    adds the input where stride is 1 and widths match; with ``projection``, a 1x1
    projection of it (strided, with norm) where they do not."""

    added_fields = ("projection",)

    kind: Literal["ds"] = "ds"
    dilation: Dilation = 1
    se: SESpec | None = None
    pw_act: bool = True
    residual: bool = False
    projection: bool = False


def recipe(b: DepthwiseSeparableBlock, cin: int, cout: int):
    return call(DepthwiseSeparable, cin, cout, kernel=b.kernel, stride=b.stride,
                dilation=b.dilation, norm_layer=NORM, act_layer=Act(b.act),
                se=se_call(b.se, cin, cin), pw_act=b.pw_act, residual=b.residual,
                project_shortcut=b.projection)


def cost(g, b: DepthwiseSeparableBlock, cin: int, cout: int, x: int) -> int:
    y = g.conv(x, cin, b.kernel, b.stride, cin, b.dilation)
    if b.se is not None:
        y = g.se(y, b.se, cin, cin)
    y = g.conv(y, cout)
    if takes_shortcut(b, cin, cout):
        return g.merge((y, g.shortcut(x, cout, b.stride, b.projection)))
    return y


def canonical(b: DepthwiseSeparableBlock, ins: tuple[int, ...]) -> dict[str, Any]:
    out = one_by_one_dilation(b)
    if b.se is not None:
        out["se"] = canonical_se(b.se, [(cin, cin) for cin in ins])
    out.update(canonical_residual(b, ins, default=False))
    return out


KIND = BlockKind(DepthwiseSeparableBlock, "ds", recipe, cost, canonical=canonical)
