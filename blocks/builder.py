"""spec -> ``nn.Module``."""

from __future__ import annotations

import torch
from torch import nn

from blocks.kinds import KINDS
from blocks.layers import ConvNormAct, activation, batchnorm
from blocks.recipe import instantiate
from blocks.shapes import ResolvedBlock, feature_width, resolve
from blocks.spec import ArchSpec


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


def build_block(rb: ResolvedBlock, norm_eps: float = 1e-5) -> nn.Module:
    """The block's module: its kind's recipe, instantiated (the PyTorch export writes the
    same recipe out as source)."""
    b = rb.block
    return instantiate(KINDS[b.kind].recipe(b, rb.in_channels, rb.out_channels),
                       batchnorm(norm_eps))


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
