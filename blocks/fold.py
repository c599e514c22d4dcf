"""Fold BatchNorm into the preceding convolution, as deployment runtimes do.

In eval mode ``bn(conv(x)) = gamma * (W*x + b - mean) / sqrt(var + eps) + beta``, which is
one convolution with ``W' = W * s`` and ``b' = (b - mean) * s + beta`` where
``s = gamma / sqrt(var + eps)`` per output channel. The builder puts every norm right after
its convolution inside a ``nn.Sequential`` (see :class:`blocks.layers.ConvNormAct`), so
folding is a walk over Sequentials replacing each (Conv2d, BatchNorm2d) pair.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new ``Conv2d`` (with bias) equal to ``bn(conv(x))`` in eval mode."""
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"BatchNorm has {bn.num_features} features, the conv {conv.out_channels} outputs"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    weight = conv.weight.detach()
    dtype = weight.dtype
    w64 = weight.double()
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    folded = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
        device=weight.device, dtype=dtype,
    )
    with torch.no_grad():
        folded.weight.copy_((w64 * scale.reshape(-1, 1, 1, 1)).to(dtype))
        folded.bias.copy_(((bias - mean) * scale + beta).to(dtype))
    return folded


def _fold_sequential(seq: nn.Sequential) -> int:
    names = list(seq._modules)
    count = 0
    for first, second in itertools.pairwise(names):
        conv, bn = seq._modules[first], seq._modules[second]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            seq._modules[first] = fold_conv_bn(conv, bn)
            seq._modules[second] = nn.Identity()
            count += 1
    return count


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return a copy of ``model`` in eval mode with every BatchNorm that directly follows a
    convolution in a ``nn.Sequential`` folded into it (the original is left untouched);
    ``inplace=True`` folds ``model`` itself and returns it (no copy: for a model built
    only to be folded).

    Raises ``ValueError`` if a BatchNorm is left that could not be folded, so a folded
    model never silently keeps a norm layer."""
    folded = (model if inplace else copy.deepcopy(model)).eval()
    for module in list(folded.modules()):
        if isinstance(module, nn.Sequential):
            _fold_sequential(module)
    left = [name for name, m in folded.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ValueError(f"BatchNorm not preceded by a Conv2d, cannot fold: {', '.join(left[:5])}")
    return folded


__all__ = ["fold_batchnorm", "fold_conv_bn"]
