"""The table of block kinds: one :class:`~blocks.kinds.base.BlockKind` per kind, each
defined in its own module of this package.

The spec's ``block`` union, the shape checks, the builder, the cost model, the PyTorch
export and the compact form all read this table. To add a kind: write its module (spec
class, checks, recipe, cost, canonical rules, and its ``nn.Module`` if the existing layers
do not make it) and add its ``KIND`` here (docs/spec.md, "Adding a block kind").
"""

from __future__ import annotations

from blocks.kinds import (
    basic,
    bottleneck,
    conv,
    ds,
    factorized,
    mbconv,
    sepconv,
    shuffle,
    shuffle_v2,
    spatial_sep,
    xception,
)
from blocks.kinds.base import BlockKind

KINDS: dict[str, BlockKind] = {
    k.name: k
    for k in (
        conv.KIND,
        factorized.KIND,
        spatial_sep.KIND,
        ds.KIND,
        mbconv.KIND,
        bottleneck.KIND,
        basic.KIND,
        xception.KIND,
        sepconv.KIND,
        shuffle.KIND,
        shuffle_v2.KIND,
    )
}

__all__ = ["KINDS", "BlockKind"]
