"""``spatial_sep``: a rank-1 factorization of a kxk kernel (kx1 then 1xk, nothing
between), then norm and act."""

from __future__ import annotations

from typing import Literal

from blocks.fields import BlockSpec
from blocks.kinds.base import BlockKind
from blocks.layers import SpatiallySeparableConv
from blocks.recipe import NORM, Act, call


class SpatialSepBlock(BlockSpec):
    """Spatially separable convolution: kx1 then 1xk with nothing between (a rank-1
    factorization of a kxk kernel), then norm and act."""

    kind: Literal["spatial_sep"] = "spatial_sep"


def recipe(b: SpatialSepBlock, cin: int, cout: int):
    return call(SpatiallySeparableConv, cin, cout, kernel=b.kernel, stride=b.stride,
                norm_layer=NORM, act_layer=Act(b.act))


def cost(g, b: SpatialSepBlock, cin: int, cout: int, x: int) -> int:
    y = g.conv(x, cout, (b.kernel, 1), (b.stride, 1), norm=False)
    return g.conv(y, cout, (1, b.kernel), (1, b.stride))


KIND = BlockKind(SpatialSepBlock, "ssp", recipe, cost)
