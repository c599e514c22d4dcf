"""Field types, bounds and shared parts of the spec that every block kind stands on.

Kept apart from :mod:`blocks.spec` (which assembles the blocks into an ``ArchSpec``) so
that a block kind's module can define its spec class without importing the whole spec.
Needs pydantic only.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Bounds. They are generous for real mobile/edge CNNs (ResNeXt-101 fits) and small enough
# that one spec cannot ask for a tensor that would exhaust a worker's memory.
MAX_CHANNELS = 4096
MAX_KERNEL = 11
MAX_STRIDE = 4
MAX_DILATION = 8
MAX_REPEATS = 32
MAX_STAGES = 24
MIN_RESOLUTION = 8
MAX_RESOLUTION = 1024
MAX_CLASSES = 100_000
MAX_GROUPS = 1024

Activation = Literal["relu", "relu6", "hswish", "swish", "gelu", "sigmoid", "hsigmoid", "none"]
Gate = Literal["sigmoid", "hsigmoid"]

Channels = Annotated[int, Field(ge=1, le=MAX_CHANNELS)]
Kernel = Annotated[int, Field(ge=1, le=MAX_KERNEL)]
Stride = Annotated[int, Field(ge=1, le=MAX_STRIDE)]
Dilation = Annotated[int, Field(ge=1, le=MAX_DILATION)]
Groups = Annotated[int, Field(ge=1, le=MAX_GROUPS)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def odd_kernel(kernel: int) -> int:
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd (got {kernel}); even kernels have no 'same' padding")
    return kernel


class SESpec(Strict):
    """Squeeze-and-excitation: global pool -> 1x1 reduce -> act -> 1x1 expand -> gate.

    Squeeze width = ``int(base * ratio)`` (at least 1), then rounded to a multiple of
    ``divisor`` the way torchvision's ``_make_divisible`` does when ``divisor > 1``.
    ``base`` is the block's input width (EfficientNet) or the width the SE acts on
    (``mid``: MobileNetV3's expanded width, the bottleneck's output width).
    """

    ratio: float = Field(0.25, gt=0.0, le=1.0)
    base: Literal["in", "mid"] = "mid"
    divisor: int = Field(1, ge=1, le=64)
    act: Activation = "relu"
    gate: Gate = "sigmoid"


class BlockSpec(Strict):
    """Fields every block kind has; a kind's spec class adds its own and a ``kind``
    literal, which is the discriminator of the stage's ``block`` field."""

    # Fields a kind gained after its specs were first hashed: at their default they are
    # left out of the canonical JSON, so the hashes of existing specs (the measurement
    # cache's keys) stay as they were.
    added_fields: ClassVar[tuple[str, ...]] = ()

    kind: str
    out_channels: Channels
    kernel: Kernel = 3
    stride: Stride = 1
    act: Activation = "relu"

    @model_validator(mode="after")
    def _check_kernel(self) -> BlockSpec:
        odd_kernel(self.kernel)
        return self


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision/TF rounding of channel counts to a multiple of ``divisor`` that does not
    go more than 10% below ``value``."""
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return int(new_value)


def se_raw(se: SESpec, in_channels: int, mid_channels: int) -> int:
    """The squeeze width before the divisor's rounding."""
    base = in_channels if se.base == "in" else mid_channels
    return max(1, math.floor(base * se.ratio + 1e-9))


def se_channels(se: SESpec, in_channels: int, mid_channels: int) -> int:
    raw = se_raw(se, in_channels, mid_channels)
    return make_divisible(raw, se.divisor) if se.divisor > 1 else raw


def canonical_se(se: SESpec | None, widths: list[tuple[int, int]]) -> dict | None:
    """The SE fields that change nothing, set to their defaults: ``base`` when the input
    and the SE's own width are equal in every repeat, ``divisor`` when its rounding leaves
    every squeeze width as it is. ``widths``: (input, SE width) of each repeat."""
    if se is None:
        return None
    data = se.model_dump()
    if all(cin == mid for cin, mid in widths):
        data["base"] = "mid"
    if se.divisor > 1 and all(se_channels(se, c, m) == se_raw(se, c, m) for c, m in widths):
        data["divisor"] = 1
    return data
