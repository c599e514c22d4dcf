"""``shuffle_v2``: the ShuffleNet V2 unit (Ma et al. 2018), as in torchvision.

Stride 1: the input is split in two halves by channel; one half passes unchanged, the
other goes through 1x1-norm-act -> depthwise kxk-norm -> 1x1-norm-act. Stride 2: no split;
two branches see the whole input, depthwise kxk/2-norm -> 1x1-norm-act beside the same
three-layer branch as above (its depthwise conv strided). Either way the two halves are
concatenated and the channels shuffled in 2 groups, so each half mixes with the other in
the next unit.

This module is the whole kind: spec class, ``nn.Module``, rules, recipe and cost (the
PyTorch export copies :class:`ShuffleV2Unit`'s source into the file it writes).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from blocks.errors import SpecError
from blocks.fields import BlockSpec
from blocks.kinds.base import BlockKind
from blocks.layers import ACTIVATIONS, ActLayer, ConvNormAct, NormLayer, channel_shuffle
from blocks.recipe import NORM, Act, call


class ShuffleV2Block(BlockSpec):
    """ShuffleNet V2 unit: channel split (stride 1) or two branches (stride 2), concat,
    channel shuffle. ``out_channels`` is even; at stride 1 it equals the input width."""

    kind: Literal["shuffle_v2"] = "shuffle_v2"


class ShuffleV2Unit(nn.Module):
    """ShuffleNet V2 unit. Stride 1: ``shuffle(cat(x1, branch2(x2)))`` with ``x1, x2`` the
    two halves of ``x``. Stride 2: ``shuffle(cat(branch1(x), branch2(x)))``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1,
                 norm_layer: NormLayer = nn.BatchNorm2d,
                 act_layer: ActLayer = ACTIVATIONS["relu"]):
        super().__init__()
        half = out_channels // 2
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(
                ConvNormAct(in_channels, in_channels, kernel, stride, groups=in_channels,
                            norm_layer=norm_layer, act_layer=None),
                ConvNormAct(in_channels, half, 1, norm_layer=norm_layer, act_layer=act_layer),
            )
        else:
            self.branch1 = nn.Identity()
        self.branch2 = nn.Sequential(
            ConvNormAct(in_channels if stride > 1 else half, half, 1, norm_layer=norm_layer,
                        act_layer=act_layer),
            ConvNormAct(half, half, kernel, stride, groups=half, norm_layer=norm_layer,
                        act_layer=None),
            ConvNormAct(half, half, 1, norm_layer=norm_layer, act_layer=act_layer),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


def check(b: ShuffleV2Block, field: str, cin: int) -> None:
    cout = b.out_channels
    if b.stride not in (1, 2):
        raise SpecError(f"{field}.stride", "a ShuffleNet V2 unit has stride 1 or 2")
    if cout % 2:
        raise SpecError(f"{field}.out_channels",
                        f"a ShuffleNet V2 unit concatenates two halves, so out_channels must "
                        f"be even (got {cout})")
    if b.stride == 1 and cin != cout:
        raise SpecError(
            f"{field}.out_channels",
            f"a stride-1 ShuffleNet V2 unit passes half its input through, so out_channels "
            f"must equal the input width {cin} (got {cout})",
        )


def recipe(b: ShuffleV2Block, cin: int, cout: int):
    return call(ShuffleV2Unit, cin, cout, kernel=b.kernel, stride=b.stride, norm_layer=NORM,
                act_layer=Act(b.act))


def cost(g, b: ShuffleV2Block, cin: int, cout: int, x: int) -> int:
    half = cout // 2
    if b.stride > 1:
        left = g.conv(x, cin, b.kernel, b.stride, cin)
        left = g.conv(left, half)
        y = x
    else:
        left = x  # x1 is a view of x: x stays live until the concat
        y = g.view(x, half)
    y = g.conv(y, half)
    y = g.conv(y, half, b.kernel, b.stride, half)
    y = g.conv(y, half)
    return g.shuffle(g.merge((left, y), cout))


KIND = BlockKind(ShuffleV2Block, "sh2", recipe, cost, check)
