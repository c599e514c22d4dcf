"""``conv``: standard, 1x1, grouped, depthwise and dilated convolution (conv-norm-act)."""

from __future__ import annotations

from typing import Any, Literal

from blocks.errors import SpecError
from blocks.fields import BlockSpec, Dilation, Groups
from blocks.kinds.base import BlockKind, canonical_projection, divides, one_by_one_dilation
from blocks.layers import ConvNormAct, Residual
from blocks.recipe import NORM, Act, call, projection_call


class ConvBlock(BlockSpec):
    """conv-norm-act: standard, 1x1 (kernel 1), grouped (groups > 1), depthwise
    (groups == in == out) and dilated (dilation > 1). ``residual`` adds the input when
    stride is 1 and widths match, or a projection of it (1x1 conv + norm, strided) where
    they do not when ``projection``."""

    added_fields = ("projection",)

    kind: Literal["conv"] = "conv"
    dilation: Dilation = 1
    groups: Groups = 1
    residual: bool = False
    projection: bool = False


def check(b: ConvBlock, field: str, cin: int) -> None:
    cout = b.out_channels
    divides(f"{field}.groups", b.groups, cin, "the input width")
    divides(f"{field}.groups", b.groups, cout, "out_channels")
    if b.residual and not b.projection and (b.stride != 1 or cin != cout):
        raise SpecError(
            f"{field}.residual",
            f"an identity residual needs stride 1 and equal widths (stride={b.stride}, "
            f"in={cin}, out={cout}); set projection for a 1x1 projection shortcut",
        )


def recipe(b: ConvBlock, cin: int, cout: int):
    body = call(ConvNormAct, cin, cout, kernel=b.kernel, stride=b.stride, dilation=b.dilation,
                groups=b.groups, norm_layer=NORM, act_layer=Act(b.act))
    if not b.residual:
        return body
    shortcut = projection_call(cin, cout, b.stride, b.projection)
    return call(Residual, body, enabled=True, shortcut=shortcut)


def cost(g, b: ConvBlock, cin: int, cout: int, x: int) -> int:
    y = g.conv(x, cout, b.kernel, b.stride, b.groups, b.dilation)
    return g.merge((y, g.shortcut(x, cout, b.stride, b.projection))) if b.residual else y


def canonical(b: ConvBlock, ins: tuple[int, ...]) -> dict[str, Any]:
    return {**one_by_one_dilation(b), **canonical_projection(b, ins)}


KIND = BlockKind(ConvBlock, "cn", recipe, cost, check, canonical)
