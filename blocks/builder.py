"""spec -> ``nn.Module``."""

from __future__ import annotations

import torch
from torch import nn

from blocks.layers import (
    Bottleneck,
    ConvNormAct,
    DepthwiseSeparable,
    FactorizedConv,
    InvertedResidual,
    Residual,
    ShuffleUnit,
    SpatiallySeparableConv,
    SqueezeExcite,
    activation,
    batchnorm,
)
from blocks.shapes import ResolvedBlock, feature_width, resolve
from blocks.spec import (
    ArchSpec,
    BottleneckBlock,
    ConvBlock,
    DepthwiseSeparableBlock,
    FactorizedBlock,
    MBConvBlock,
    SESpec,
    ShuffleBlock,
    SpatialSepBlock,
    mbconv_mid,
    se_channels,
)


class Network(nn.Module):
    """stem [-> 3x3/2 max pool] -> stages -> [head] -> global avg pool -> classifier."""

    def __init__(self, stem: nn.Module, stages: nn.Sequential, head: nn.Module,
                 classifier: nn.Sequential, stem_pool: bool):
        super().__init__()
        self.stem = stem
        self.stem_pool = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
        self.stages = stages
        self.head = head
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.stages(self.stem_pool(self.stem(x))))
        return self.classifier(torch.flatten(self.pool(x), 1))


def _se(se: SESpec | None, cin: int, mid: int) -> nn.Module | None:
    if se is None:
        return None
    return SqueezeExcite(mid, se_channels(se, cin, mid), activation(se.act), activation(se.gate))


def build_block(rb: ResolvedBlock, norm_eps: float = 1e-5) -> nn.Module:
    b, cin, cout = rb.block, rb.in_channels, rb.out_channels
    norm = batchnorm(norm_eps)
    act = activation(b.act)
    if isinstance(b, ConvBlock):
        body = ConvNormAct(cin, cout, b.kernel, b.stride, b.dilation, b.groups, norm, act)
        return Residual(body, True) if b.residual else body
    if isinstance(b, FactorizedBlock):
        return FactorizedConv(cin, cout, b.kernel, b.stride, norm, act)
    if isinstance(b, SpatialSepBlock):
        return SpatiallySeparableConv(cin, cout, b.kernel, b.stride, norm, act)
    if isinstance(b, DepthwiseSeparableBlock):
        return DepthwiseSeparable(cin, cout, b.kernel, b.stride, b.dilation, norm, act,
                                  _se(b.se, cin, cin), b.pw_act, b.residual)
    if isinstance(b, MBConvBlock):
        mid = mbconv_mid(b, cin)
        return InvertedResidual(cin, cout, mid, b.kernel, b.stride, b.dilation, norm, act,
                                _se(b.se, cin, mid), b.residual)
    if isinstance(b, BottleneckBlock):
        return Bottleneck(cin, cout, b.mid_channels, b.kernel, b.stride, b.groups, b.dilation,
                          norm, act)
    if isinstance(b, ShuffleBlock):
        return ShuffleUnit(cin, cout, b.mid_channels, b.groups, b.first_groups, b.kernel,
                           b.stride, norm, act)
    raise TypeError(f"{rb.field}: unsupported block kind {type(b).__name__}")


def build_model(spec: ArchSpec) -> Network:
    """Build the network; raises :class:`blocks.shapes.SpecError` naming the offending
    field when the spec is structurally invalid."""
    resolved = resolve(spec)
    norm = batchnorm(spec.norm_eps)
    stem = ConvNormAct(spec.in_channels, spec.stem.out_channels, spec.stem.kernel,
                       spec.stem.stride, norm_layer=norm, act_layer=activation(spec.stem.act))
    per_stage: list[list[nn.Module]] = [[] for _ in spec.stages]
    for rb in resolved:
        per_stage[rb.stage].append(build_block(rb, spec.norm_eps))
    stages = nn.Sequential(*(nn.Sequential(*blocks) for blocks in per_stage))
    last = resolved[-1].out_channels
    head: nn.Module = nn.Identity()
    if spec.head is not None:
        head = ConvNormAct(last, spec.head.out_channels, spec.head.kernel, spec.head.stride,
                           norm_layer=norm, act_layer=activation(spec.head.act))
    width = feature_width(spec, resolved)
    clf = spec.classifier
    layers: list[nn.Module] = []
    if clf.hidden is not None:
        layers += [nn.Linear(width, clf.hidden), activation(clf.hidden_act)()]
        width = clf.hidden
    if clf.dropout > 0:
        layers.append(nn.Dropout(clf.dropout))
    layers.append(nn.Linear(width, spec.num_classes, bias=clf.bias))
    return Network(stem, stages, head, nn.Sequential(*layers), spec.stem_pool)
