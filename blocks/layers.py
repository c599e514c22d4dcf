"""The efficient-convolution block family as composable ``nn.Module``s.

Every block takes its layers as arguments: ``norm_layer(channels)``, ``act_layer()`` and,
for squeeze-and-excitation, ``gate_layer()``. Each norm sits right after its conv inside a
:class:`ConvNormAct`, which is what lets :func:`blocks.fold.fold_batchnorm` fold every
BatchNorm into its convolution for deployment-style measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[[], nn.Module]

ACTIVATIONS: dict[str, ActLayer] = {
    "relu": partial(nn.ReLU, inplace=True),
    "relu6": partial(nn.ReLU6, inplace=True),
    "hswish": partial(nn.Hardswish, inplace=True),
    "swish": partial(nn.SiLU, inplace=True),
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "hsigmoid": partial(nn.Hardsigmoid, inplace=True),
    "none": nn.Identity,
}


def activation(name: str) -> ActLayer:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}") from None


def batchnorm(eps: float = 1e-5) -> NormLayer:
    return partial(nn.BatchNorm2d, eps=eps)


def same_padding(kernel: int, dilation: int = 1) -> int:
    return dilation * (kernel - 1) // 2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, C, H, W] -> view as [B, g, C/g, H, W] -> swap -> flatten back."""
    b, c, h, w = x.shape
    x = x.reshape(b, groups, c // groups, h, w)
    x = x.transpose(1, 2).contiguous()
    return x.reshape(b, c, h, w)


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)


class ConvNormAct(nn.Sequential):
    """conv -> norm -> act. ``kernel``/``stride``/``padding`` may be (h, w) pairs, which is
    how the factorized kx1 / 1xk layers are made."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        dilation: int = 1,
        groups: int = 1,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer | None = ACTIVATIONS["relu"],
        padding: int | tuple[int, int] | None = None,
    ):
        if padding is None:
            if isinstance(kernel, tuple):
                padding = (same_padding(kernel[0], dilation), same_padding(kernel[1], dilation))
            else:
                padding = same_padding(kernel, dilation)
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels, out_channels, kernel, stride, padding, dilation, groups,
                bias=norm_layer is None,
            )
        ]
        layers.append(norm_layer(out_channels) if norm_layer is not None else nn.Identity())
        layers.append(act_layer() if act_layer is not None else nn.Identity())
        super().__init__(*layers)
        self.in_channels = in_channels
        self.out_channels = out_channels


class SqueezeExcite(nn.Module):
    """Global average pool -> 1x1 reduce (+bias) -> act -> 1x1 expand (+bias) -> gate,
    then scale the input channel-wise."""

    def __init__(
        self,
        channels: int,
        squeeze_channels: int,
        act_layer: ActLayer = ACTIVATIONS["relu"],
        gate_layer: ActLayer = nn.Sigmoid,
    ):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = act_layer()
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.expand(self.act(self.reduce(self.pool(x)))))
        return x * s


def projection(in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer,
               wanted: bool) -> nn.Module | None:
    """The 1x1 conv (strided) + norm shortcut of a residual that changes the width or the
    stride, when ``wanted`` and needed; ``None`` otherwise (an identity shortcut or none)."""
    if wanted and (stride != 1 or in_channels != out_channels):
        return ConvNormAct(in_channels, out_channels, 1, stride, norm_layer=norm_layer,
                           act_layer=None)
    return None


class Residual(nn.Module):
    """``body(x) + x`` (or ``+ shortcut(x)``, a projection) when enabled; the body alone
    otherwise."""

    def __init__(self, body: nn.Module, enabled: bool, shortcut: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.enabled = enabled
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if not self.enabled:
            return y
        return y + (self.shortcut(x) if self.shortcut is not None else x)


class FactorizedConv(nn.Sequential):
    """kx1 conv-norm-act -> 1xk conv-norm-act (stride split across the two)."""

    def __init__(self, in_channels, out_channels, kernel, stride=1,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = ACTIVATIONS["relu"]):
        super().__init__(
            ConvNormAct(in_channels, out_channels, (kernel, 1), (stride, 1),
                        norm_layer=norm_layer, act_layer=act_layer),
            ConvNormAct(out_channels, out_channels, (1, kernel), (1, stride),
                        norm_layer=norm_layer, act_layer=act_layer),
        )


class SpatiallySeparableConv(nn.Sequential):
    """kx1 conv -> 1xk conv-norm-act: a rank-1 kxk kernel, nothing between the two."""

    def __init__(self, in_channels, out_channels, kernel, stride=1,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = ACTIVATIONS["relu"]):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, (kernel, 1), (stride, 1),
                      (same_padding(kernel), 0), bias=False),
            ConvNormAct(out_channels, out_channels, (1, kernel), (1, stride),
                        norm_layer=norm_layer, act_layer=act_layer),
        )


class SeparableConvNormAct(nn.Sequential):
    """Xception's separable convolution: depthwise kxk -> pointwise 1x1, nothing between
    the two, then norm -> act (the norm follows the pointwise conv, so it folds)."""

    def __init__(self, in_channels, out_channels, kernel=3, stride=1,
                 norm_layer: NormLayer = nn.BatchNorm2d,
                 act_layer: ActLayer | None = ACTIVATIONS["relu"]):
        super().__init__(
            nn.Conv2d(in_channels, in_channels, kernel, stride, same_padding(kernel),
                      groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            norm_layer(out_channels),
            act_layer() if act_layer is not None else nn.Identity(),
        )


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: depthwise kxk-norm-act [-> SE] -> pointwise 1x1-norm[-act]; with
    ``residual``, an identity shortcut when stride 1 and widths match, or a projection
    where they do not when ``project_shortcut``."""

    def __init__(self, in_channels, out_channels, kernel=3, stride=1, dilation=1,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = ACTIVATIONS["relu"],
                 se: nn.Module | None = None, pw_act: bool = True, residual: bool = False,
                 project_shortcut: bool = False):
        super().__init__()
        self.dw = ConvNormAct(in_channels, in_channels, kernel, stride, dilation, in_channels,
                              norm_layer, act_layer)
        self.se = se if se is not None else nn.Identity()
        self.pw = ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer,
                              act_layer=act_layer if pw_act else None)
        self.shortcut = projection(in_channels, out_channels, stride, norm_layer,
                                   residual and project_shortcut)
        self.use_residual = residual and (
            self.shortcut is not None or (stride == 1 and in_channels == out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw(self.se(self.dw(x)))
        if not self.use_residual:
            return y
        return y + (self.shortcut(x) if self.shortcut is not None else x)


class InvertedResidual(nn.Module):
    """MBConv: [1x1 expand-norm-act] -> depthwise kxk-norm-act -> [SE] -> 1x1 project-norm
    (linear), identity shortcut when stride 1 and widths match, a projection shortcut where
    they do not when ``project_shortcut``."""

    def __init__(self, in_channels, out_channels, mid_channels, kernel=3, stride=1, dilation=1,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = ACTIVATIONS["relu6"],
                 se: nn.Module | None = None, residual: bool = True,
                 project_shortcut: bool = False):
        super().__init__()
        self.expand = (
            ConvNormAct(in_channels, mid_channels, 1, norm_layer=norm_layer, act_layer=act_layer)
            if mid_channels != in_channels
            else nn.Identity()
        )
        self.dw = ConvNormAct(mid_channels, mid_channels, kernel, stride, dilation, mid_channels,
                              norm_layer, act_layer)
        self.se = se if se is not None else nn.Identity()
        self.project = ConvNormAct(mid_channels, out_channels, 1, norm_layer=norm_layer,
                                   act_layer=None)
        self.shortcut = projection(in_channels, out_channels, stride, norm_layer,
                                   residual and project_shortcut)
        self.use_residual = residual and (
            self.shortcut is not None or (stride == 1 and in_channels == out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        if not self.use_residual:
            return y
        return y + (self.shortcut(x) if self.shortcut is not None else x)


class Bottleneck(nn.Module):
    """ResNet / ResNeXt bottleneck (stride on the kxk conv, as in ResNet v1.5); with ``se``,
    squeeze-and-excitation on the residual branch before the sum (SE-ResNeXt)."""

    def __init__(self, in_channels, out_channels, mid_channels, kernel=3, stride=1, groups=1,
                 dilation=1, norm_layer: NormLayer = nn.BatchNorm2d,
                 act_layer: ActLayer = ACTIVATIONS["relu"], se: nn.Module | None = None):
        super().__init__()
        self.reduce = ConvNormAct(in_channels, mid_channels, 1, norm_layer=norm_layer,
                                  act_layer=act_layer)
        self.conv = ConvNormAct(mid_channels, mid_channels, kernel, stride, dilation, groups,
                                norm_layer, act_layer)
        self.restore = ConvNormAct(mid_channels, out_channels, 1, norm_layer=norm_layer,
                                   act_layer=None)
        self.se = se if se is not None else nn.Identity()
        self.shortcut = (
            ConvNormAct(in_channels, out_channels, 1, stride, norm_layer=norm_layer, act_layer=None)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.restore(self.conv(self.reduce(x)))) + self.shortcut(x))


class ShuffleUnit(nn.Module):
    """ShuffleNet V1 unit. Stride 1: ``act(x + branch(x))``. Stride 2:
    ``act(cat(avgpool3x3s2(x), branch(x)))`` with the branch producing ``out - in``."""

    def __init__(self, in_channels, out_channels, mid_channels, groups=3, first_groups=None,
                 kernel=3, stride=1, norm_layer: NormLayer = nn.BatchNorm2d,
                 act_layer: ActLayer = ACTIVATIONS["relu"]):
        super().__init__()
        self.stride = stride
        branch_out = out_channels - in_channels if stride > 1 else out_channels
        g1 = groups if first_groups is None else first_groups
        self.reduce = ConvNormAct(in_channels, mid_channels, 1, groups=g1, norm_layer=norm_layer,
                                  act_layer=act_layer)
        self.shuffle = ChannelShuffle(groups)
        self.dw = ConvNormAct(mid_channels, mid_channels, kernel, stride, groups=mid_channels,
                              norm_layer=norm_layer, act_layer=None)
        self.expand = ConvNormAct(mid_channels, branch_out, 1, groups=groups,
                                  norm_layer=norm_layer, act_layer=None)
        self.pool = nn.AvgPool2d(3, stride, 1) if stride > 1 else None
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(self.dw(self.shuffle(self.reduce(x))))
        if self.pool is not None:
            return self.act(torch.cat((self.pool(x), y), 1))
        return self.act(x + y)
