"""``basic``: the ResNet basic block (He et al. 2016; ResNet-18/34), as in torchvision.

kxk conv-norm-act (strided) -> kxk conv-norm, plus the shortcut, act after the sum. The
shortcut is the identity when the block keeps stride 1 and its width, else a projection
(1x1 conv with the block's stride, then norm): the paper's option B, torchvision's
``downsample``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from blocks.fields import BlockSpec
from blocks.kinds.base import BlockKind
from blocks.layers import ACTIVATIONS, ActLayer, ConvNormAct, NormLayer
from blocks.recipe import NORM, Act, call


class BasicBlock(BlockSpec):
    """ResNet basic block: two kxk conv-norm (act after the first and after the sum) and
    an identity or projection shortcut."""

    kind: Literal["basic"] = "basic"


class BasicResidual(nn.Module):
    """``act(conv2(conv1(x)) + shortcut(x))``; the shortcut projects (1x1 conv + norm,
    strided) when the stride or the width changes."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1,
                 norm_layer: NormLayer = nn.BatchNorm2d,
                 act_layer: ActLayer = ACTIVATIONS["relu"]):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel, stride,
                                 norm_layer=norm_layer, act_layer=act_layer)
        self.conv2 = ConvNormAct(out_channels, out_channels, kernel, norm_layer=norm_layer,
                                 act_layer=None)
        self.shortcut = (
            ConvNormAct(in_channels, out_channels, 1, stride, norm_layer=norm_layer,
                        act_layer=None)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


def recipe(b: BasicBlock, cin: int, cout: int):
    return call(BasicResidual, cin, cout, kernel=b.kernel, stride=b.stride, norm_layer=NORM,
                act_layer=Act(b.act))


def cost(g, b: BasicBlock, cin: int, cout: int, x: int) -> int:
    y = g.conv(x, cout, b.kernel, b.stride)
    y = g.conv(y, cout, b.kernel)
    s = g.conv(x, cout, 1, b.stride) if (b.stride != 1 or cin != cout) else x
    return g.merge((y, s))


KIND = BlockKind(BasicBlock, "bb", recipe, cost)
