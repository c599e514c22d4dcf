"""``conv``: standard, 1x1, grouped, depthwise and dilated convolution (conv-norm-act)."""

from __future__ import annotations

from typing import Literal

from blocks.errors import SpecError
from blocks.fields import BlockSpec, Dilation, Groups
from blocks.kinds.base import BlockKind, divides, one_by_one_dilation
from blocks.layers import ConvNormAct, Residual
from blocks.recipe import NORM, Act, call


class ConvBlock(BlockSpec):
    """conv-norm-act: standard, 1x1 (kernel 1), grouped (groups > 1), depthwise
    (groups == in == out) and dilated (dilation > 1). ``residual`` adds the input when
    stride is 1 and widths match."""

    kind: Literal["conv"] = "conv"
    dilation: Dilation = 1
    groups: Groups = 1
    residual: bool = False


def check(b: ConvBlock, field: str, cin: int) -> None:
    cout = b.out_channels
    divides(f"{field}.groups", b.groups, cin, "the input width")
    divides(f"{field}.groups", b.groups, cout, "out_channels")
    if b.residual and (b.stride != 1 or cin != cout):
        raise SpecError(
            f"{field}.residual",
            f"a residual needs stride 1 and equal widths (stride={b.stride}, "
            f"in={cin}, out={cout})",
        )


def recipe(b: ConvBlock, cin: int, cout: int):
    body = call(ConvNormAct, cin, cout, kernel=b.kernel, stride=b.stride, dilation=b.dilation,
                groups=b.groups, norm_layer=NORM, act_layer=Act(b.act))
    return call(Residual, body, enabled=True) if b.residual else body


def cost(g, b: ConvBlock, cin: int, cout: int, x: int) -> int:
    y = g.conv(x, cout, b.kernel, b.stride, b.groups, b.dilation)
    return g.merge((y, x)) if b.residual else y


KIND = BlockKind(ConvBlock, "cn", recipe, cost, check,
                 lambda b, ins: one_by_one_dilation(b))
