"""``xception``: the Xception block (Chollet 2017), as in the reference Keras model and
its PyTorch port.

A stack of ``reps`` separable convolutions, each preceded by the activation (the first
one's only when ``start_act``) and followed by norm; the width changes at the first conv
(``grow_first``) or at the last; at stride > 1 a 3x3 max pool with that stride ends the
stack. The shortcut is the identity, or a projection (1x1 conv with the stride, then norm)
when the stride or the width changes; no activation after the sum.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from blocks.fields import BlockSpec
from blocks.kinds.base import BlockKind
from blocks.layers import ACTIVATIONS, ActLayer, ConvNormAct, NormLayer, SeparableConvNormAct
from blocks.recipe import NORM, Act, call


class XceptionBlock(BlockSpec):
    """Xception block: ``reps`` x ([act] -> separable kxk conv -> norm) [-> 3x3 max pool /
    stride] + identity or projection shortcut."""

    kind: Literal["xception"] = "xception"
    reps: int = Field(2, ge=1, le=8)
    grow_first: bool = True
    start_act: bool = True


class XceptionUnit(nn.Module):
    """``body(x) + shortcut(x)``: the body is the separable stack (and the pool), the
    shortcut the identity or a strided 1x1 projection."""

    @staticmethod
    def widths(cin: int, cout: int, reps: int, grow_first: bool) -> list[tuple[int, int]]:
        """(in, out) of each separable conv of the stack (a method, so that the exported
        file, which copies this class, has it too)."""
        if grow_first:
            return [(cin, cout)] + [(cout, cout)] * (reps - 1)
        return [(cin, cin)] * (reps - 1) + [(cin, cout)]

    def __init__(self, in_channels: int, out_channels: int, reps: int = 2, kernel: int = 3,
                 stride: int = 1, grow_first: bool = True, start_act: bool = True,
                 norm_layer: NormLayer = nn.BatchNorm2d,
                 act_layer: ActLayer = ACTIVATIONS["relu"]):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(self.widths(in_channels, out_channels, reps, grow_first)):
            if i > 0 or start_act:
                act = act_layer()
                if i == 0 and hasattr(act, "inplace"):
                    act.inplace = False  # the shortcut still reads the block's input
                layers.append(act)
            layers.append(SeparableConvNormAct(a, b, kernel, norm_layer=norm_layer,
                                               act_layer=None))
        if stride > 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.body = nn.Sequential(*layers)
        self.shortcut = (
            ConvNormAct(in_channels, out_channels, 1, stride, norm_layer=norm_layer,
                        act_layer=None)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def recipe(b: XceptionBlock, cin: int, cout: int):
    return call(XceptionUnit, cin, cout, reps=b.reps, kernel=b.kernel, stride=b.stride,
                grow_first=b.grow_first, start_act=b.start_act, norm_layer=NORM,
                act_layer=Act(b.act))


def cost(g, b: XceptionBlock, cin: int, cout: int, x: int) -> int:
    y = x
    for a, c in XceptionUnit.widths(cin, cout, b.reps, b.grow_first):
        y = g.conv(y, a, b.kernel, 1, a, norm=False)
        y = g.conv(y, c)
    if b.stride > 1:
        y = g.pool(y, 3, b.stride)
    s = g.conv(x, cout, 1, b.stride) if (b.stride != 1 or cin != cout) else x
    return g.merge((y, s))


KIND = BlockKind(XceptionBlock, "xc", recipe, cost,
                 keys={"reps": "n", "grow_first": "gf", "start_act": "sa"})
