"""``mbconv``: inverted residual / MBConv (MobileNetV2/V3, MnasNet, EfficientNet)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from blocks.errors import SpecError
from blocks.fields import BlockSpec, Channels, Dilation, SESpec, canonical_se
from blocks.kinds.base import (
    BlockKind,
    canonical_residual,
    one_by_one_dilation,
    takes_shortcut,
)
from blocks.layers import InvertedResidual
from blocks.recipe import NORM, Act, call, se_call

MIN_EXPAND, MAX_EXPAND = 0.1, 16.0


class MBConvBlock(BlockSpec):
    """Inverted residual / MBConv (MobileNetV2/V3, MnasNet, EfficientNet): 1x1 expand
    (skipped when the expanded width equals the input) -> depthwise kxk -> [SE] -> linear
    1x1 projection; identity shortcut when stride is 1 and widths match (with
    ``projection``: a 1x1 projection shortcut, strided, where they do not).

    Expanded width: ``mid_channels`` when given, else ``round(in * expand)``."""

    added_fields = ("projection",)

    kind: Literal["mbconv"] = "mbconv"
    expand: float = Field(6.0, ge=MIN_EXPAND, le=MAX_EXPAND)
    mid_channels: Channels | None = None
    dilation: Dilation = 1
    se: SESpec | None = None
    residual: bool = True
    projection: bool = False


def mbconv_mid(block: MBConvBlock, in_channels: int) -> int:
    if block.mid_channels is not None:
        return block.mid_channels
    return max(1, round(in_channels * block.expand))


def check(b: MBConvBlock, field: str, cin: int) -> None:
    mid = mbconv_mid(b, cin)
    if mid > 8 * 4096:
        raise SpecError(f"{field}.expand", f"expanded width {mid} is too large")


def recipe(b: MBConvBlock, cin: int, cout: int):
    mid = mbconv_mid(b, cin)
    return call(InvertedResidual, cin, cout, mid_channels=mid, kernel=b.kernel,
                stride=b.stride, dilation=b.dilation, norm_layer=NORM, act_layer=Act(b.act),
                se=se_call(b.se, cin, mid), residual=b.residual,
                project_shortcut=b.projection)


def cost(g, b: MBConvBlock, cin: int, cout: int, x: int) -> int:
    mid = mbconv_mid(b, cin)
    y = g.conv(x, mid) if mid != cin else x
    y = g.conv(y, mid, b.kernel, b.stride, mid, b.dilation)
    if b.se is not None:
        y = g.se(y, b.se, cin, mid)
    y = g.conv(y, cout)
    if takes_shortcut(b, cin, cout):
        return g.merge((y, g.shortcut(x, cout, b.stride, b.projection)))
    return y


def canonical(b: MBConvBlock, ins: tuple[int, ...]) -> dict[str, Any]:
    """The expanded widths, written as ``expand`` whenever one ratio gives them all
    (``mid / in`` of the first repeat), else as ``mid_channels`` with ``expand`` at its
    default; the shortcut flags as :func:`~blocks.kinds.base.canonical_residual` says."""
    out = one_by_one_dilation(b)
    mids = [mbconv_mid(b, cin) for cin in ins]
    ratio = mids[0] / ins[0]
    if MIN_EXPAND <= ratio <= MAX_EXPAND and all(
            max(1, round(cin * ratio)) == mid for cin, mid in zip(ins, mids, strict=True)):
        out.update(expand=ratio, mid_channels=None)
    elif b.mid_channels is not None:  # expand is not read
        out["expand"] = MBConvBlock.model_fields["expand"].default
    if b.se is not None:
        out["se"] = canonical_se(b.se, list(zip(ins, mids, strict=True)))
    out.update(canonical_residual(b, ins, default=True))
    return out


KIND = BlockKind(MBConvBlock, "ir", recipe, cost, check, canonical)
