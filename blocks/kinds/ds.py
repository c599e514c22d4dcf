"""``ds``: MobileNetV1's depthwise separable block, optionally with SE."""

from __future__ import annotations

from typing import Any, Literal

from blocks.fields import BlockSpec, Dilation, SESpec, canonical_se
from blocks.kinds.base import BlockKind, one_by_one_dilation, strides
from blocks.layers import DepthwiseSeparable
from blocks.recipe import NORM, Act, call, se_call


class DepthwiseSeparableBlock(BlockSpec):
    """MobileNetV1: depthwise kxk-norm-act [-> SE] -> pointwise 1x1-norm[-act]."""

    kind: Literal["ds"] = "ds"
    dilation: Dilation = 1
    se: SESpec | None = None
    pw_act: bool = True
    residual: bool = False


def recipe(b: DepthwiseSeparableBlock, cin: int, cout: int):
    return call(DepthwiseSeparable, cin, cout, kernel=b.kernel, stride=b.stride,
                dilation=b.dilation, norm_layer=NORM, act_layer=Act(b.act),
                se=se_call(b.se, cin, cin), pw_act=b.pw_act, residual=b.residual)


def cost(g, b: DepthwiseSeparableBlock, cin: int, cout: int, x: int) -> int:
    y = g.conv(x, cin, b.kernel, b.stride, cin, b.dilation)
    if b.se is not None:
        y = g.se(y, b.se, cin, cin)
    y = g.conv(y, cout)
    residual = b.residual and b.stride == 1 and cin == cout
    return g.merge((y, x)) if residual else y


def canonical(b: DepthwiseSeparableBlock, ins: tuple[int, ...]) -> dict[str, Any]:
    out = one_by_one_dilation(b)
    if b.se is not None:
        out["se"] = canonical_se(b.se, [(cin, cin) for cin in ins])
    if not any(s == 1 and cin == b.out_channels for s, cin in zip(strides(b, ins), ins,
                                                                     strict=True)):
        out["residual"] = False  # no repeat can take the shortcut
    return out


KIND = BlockKind(DepthwiseSeparableBlock, "ds", recipe, cost, canonical=canonical)
