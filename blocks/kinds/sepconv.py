"""``sepconv``: Xception's separable convolution as a layer of its own (depthwise kxk ->
pointwise 1x1 -> norm -> act, no norm between the two convs); Xception's exit flow."""

from __future__ import annotations

from typing import Literal

from blocks.fields import BlockSpec
from blocks.kinds.base import BlockKind
from blocks.layers import SeparableConvNormAct
from blocks.recipe import NORM, Act, call


class SepConvBlock(BlockSpec):
    """Separable conv-norm-act: depthwise kxk (strided) -> pointwise 1x1 -> norm -> act."""

    kind: Literal["sepconv"] = "sepconv"


def recipe(b: SepConvBlock, cin: int, cout: int):
    return call(SeparableConvNormAct, cin, cout, kernel=b.kernel, stride=b.stride,
                norm_layer=NORM, act_layer=Act(b.act))


def cost(g, b: SepConvBlock, cin: int, cout: int, x: int) -> int:
    y = g.conv(x, cin, b.kernel, b.stride, cin, norm=False)
    return g.conv(y, cout)


KIND = BlockKind(SepConvBlock, "sep", recipe, cost)
