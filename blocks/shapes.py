"""Shape resolution: walk a spec, track widths and feature-map sizes, check every
structural rule, and name the offending field when one is broken.

The builder and the cost model both stand on :func:`resolve`, so a spec that builds is a
spec that is costed, and vice versa.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocks.errors import SpecError
from blocks.kinds import KINDS
from blocks.spec import ArchSpec


@dataclass(frozen=True)
class ResolvedBlock:
    path: str  # e.g. "stages[2]#1" (stage 2, repeat 1)
    field: str  # e.g. "stages[2].block"
    stage: int
    repeat: int
    block: object
    in_channels: int
    out_channels: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]


def out_size(size: int, stride: int) -> int:
    """Output size of a 'same'-padded conv / pool (odd kernel): ceil(size / stride)."""
    return (size - 1) // stride + 1


def check_block(block, field: str, cin: int) -> int:
    """Validate ``block`` given its input width (its kind's rules); return its output
    width."""
    KINDS[block.kind].check(block, field, cin)
    return block.out_channels


def resolve(spec: ArchSpec, resolution: int | None = None) -> list[ResolvedBlock]:
    """Walk the stages with the input at ``resolution`` (default: the spec's)."""
    res = resolution if resolution is not None else spec.resolution
    h = w = out_size(res, spec.stem.stride)
    if spec.stem_pool:
        h, w = out_size(h, 2), out_size(w, 2)
    cin = spec.stem.out_channels
    out: list[ResolvedBlock] = []
    for si, stage in enumerate(spec.stages):
        for ri in range(stage.repeats):
            block = stage.block if ri == 0 or stage.block.stride == 1 else stage.block.model_copy(
                update={"stride": 1}
            )
            field = f"stages[{si}].block"
            cout = check_block(block, field, cin)
            oh, ow = out_size(h, block.stride), out_size(w, block.stride)
            out.append(
                ResolvedBlock(
                    f"stages[{si}]#{ri}", field, si, ri, block, cin, cout, (h, w), (oh, ow)
                )
            )
            cin, h, w = cout, oh, ow
    return out


def feature_width(spec: ArchSpec, blocks: list[ResolvedBlock] | None = None) -> int:
    """Width entering the classifier."""
    if spec.head is not None:
        return spec.head.out_channels
    blocks = blocks if blocks is not None else resolve(spec)
    return blocks[-1].out_channels


__all__ = ["ResolvedBlock", "SpecError", "check_block", "feature_width", "out_size", "resolve"]
