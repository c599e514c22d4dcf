"""``factorized``: kx1 conv-norm-act then 1xk conv-norm-act (Inception-style)."""

from __future__ import annotations

from typing import Literal

from blocks.fields import BlockSpec
from blocks.kinds.base import BlockKind
from blocks.layers import FactorizedConv
from blocks.recipe import NORM, Act, call


class FactorizedBlock(BlockSpec):
    """kx1 conv-norm-act then 1xk conv-norm-act (Inception-style factorization)."""

    kind: Literal["factorized"] = "factorized"


def recipe(b: FactorizedBlock, cin: int, cout: int):
    return call(FactorizedConv, cin, cout, kernel=b.kernel, stride=b.stride, norm_layer=NORM,
                act_layer=Act(b.act))


def cost(g, b: FactorizedBlock, cin: int, cout: int, x: int) -> int:
    y = g.conv(x, cout, (b.kernel, 1), (b.stride, 1))
    return g.conv(y, cout, (1, b.kernel), (1, b.stride))


KIND = BlockKind(FactorizedBlock, "fac", recipe, cost)
