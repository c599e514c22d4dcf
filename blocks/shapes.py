"""Shape resolution: walk a spec, track widths and feature-map sizes, check every
structural rule, and name the offending field when one is broken.

The builder and the cost model both stand on :func:`resolve`, so a spec that builds is a
spec that is costed, and vice versa.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocks.spec import (
    ArchSpec,
    BottleneckBlock,
    ConvBlock,
    DepthwiseSeparableBlock,
    MBConvBlock,
    ShuffleBlock,
    mbconv_mid,
)


class SpecError(ValueError):
    """A spec that validates field by field but cannot be built; ``field`` is a dotted path
    such as ``stages[3].block.groups``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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


def _divides(field: str, groups: int, channels: int, what: str) -> None:
    if channels % groups:
        raise SpecError(field, f"groups={groups} does not divide {what} ({channels} channels)")


def check_block(block, field: str, cin: int) -> int:
    """Validate ``block`` given its input width; return its output width."""
    cout = block.out_channels
    if isinstance(block, ConvBlock):
        _divides(f"{field}.groups", block.groups, cin, "the input width")
        _divides(f"{field}.groups", block.groups, cout, "out_channels")
        if block.residual and (block.stride != 1 or cin != cout):
            raise SpecError(
                f"{field}.residual",
                f"a residual needs stride 1 and equal widths (stride={block.stride}, "
                f"in={cin}, out={cout})",
            )
    elif isinstance(block, MBConvBlock):
        mid = mbconv_mid(block, cin)
        if mid > 8 * 4096:
            raise SpecError(f"{field}.expand", f"expanded width {mid} is too large")
    elif isinstance(block, BottleneckBlock):
        _divides(f"{field}.groups", block.groups, block.mid_channels, "mid_channels")
    elif isinstance(block, ShuffleBlock):
        g1 = block.groups if block.first_groups is None else block.first_groups
        if block.stride not in (1, 2):
            raise SpecError(f"{field}.stride", "a ShuffleNet unit has stride 1 or 2")
        if block.stride == 1 and cin != cout:
            raise SpecError(
                f"{field}.out_channels",
                f"a stride-1 ShuffleNet unit adds its input, so out_channels must equal the "
                f"input width {cin} (got {cout})",
            )
        if block.stride == 2 and cout <= cin:
            raise SpecError(
                f"{field}.out_channels",
                f"a stride-2 ShuffleNet unit concatenates its input, so out_channels must exceed "
                f"the input width {cin} (got {cout})",
            )
        branch = cout - cin if block.stride == 2 else cout
        field_g1 = f"{field}.first_groups" if block.first_groups is not None else f"{field}.groups"
        _divides(field_g1, g1, cin, "the input width")
        _divides(field_g1, g1, block.mid_channels, "mid_channels")
        _divides(f"{field}.groups", block.groups, block.mid_channels, "mid_channels")
        _divides(f"{field}.groups", block.groups, branch, "the branch width (out - in)")
    elif isinstance(block, DepthwiseSeparableBlock):
        pass
    return cout


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
