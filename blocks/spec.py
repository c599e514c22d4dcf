"""The architecture spec: a versioned, bounded, JSON-serializable description of a CNN.

A network is ``stem -> stages -> head -> global average pool -> classifier``. A stage is
one block kind repeated ``repeats`` times; the first repeat takes the stage's stride, the
rest have stride 1 and take the stage's output width as input. Every numeric field is
bounded, so a spec that would allocate absurd tensors is rejected by validation, before
anything is built.

Two serial forms, both exact:

* canonical JSON (:meth:`ArchSpec.canonical_json`): sorted keys, every field written,
  no whitespace; its SHA-256 (without ``name``) is the spec's content hash.
* a compact one-line string (:meth:`ArchSpec.to_compact` / :meth:`ArchSpec.from_compact`)
  in the spirit of timm's ``ir_r2_k3_s2_e6_c24_se0.25``, documented in docs/spec.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _odd_kernel(kernel: int) -> int:
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd (got {kernel}); even kernels have no 'same' padding")
    return kernel


class SESpec(_Strict):
    """Squeeze-and-excitation: global pool -> 1x1 reduce -> act -> 1x1 expand -> gate.

    Squeeze width = ``int(base * ratio)`` (at least 1), then rounded to a multiple of
    ``divisor`` the way torchvision's ``_make_divisible`` does when ``divisor > 1``.
    ``base`` is the block's input width (EfficientNet) or its expanded width (MobileNetV3).
    """

    ratio: float = Field(0.25, gt=0.0, le=1.0)
    base: Literal["in", "mid"] = "mid"
    divisor: int = Field(1, ge=1, le=64)
    act: Activation = "relu"
    gate: Gate = "sigmoid"


class ConvLayer(_Strict):
    """conv -> norm -> act, used as stem and head."""

    out_channels: Channels
    kernel: Kernel = 3
    stride: Stride = 1
    act: Activation = "relu"

    @model_validator(mode="after")
    def _check(self) -> ConvLayer:
        _odd_kernel(self.kernel)
        return self


class _BlockBase(_Strict):
    kind: str
    out_channels: Channels
    kernel: Kernel = 3
    stride: Stride = 1
    act: Activation = "relu"

    @model_validator(mode="after")
    def _check_kernel(self) -> _BlockBase:
        _odd_kernel(self.kernel)
        return self


class ConvBlock(_BlockBase):
    """conv-norm-act: standard, 1x1 (kernel 1), grouped (groups > 1), depthwise
    (groups == in == out) and dilated (dilation > 1). ``residual`` adds the input when
    stride is 1 and widths match."""

    kind: Literal["conv"] = "conv"
    dilation: Dilation = 1
    groups: Groups = 1
    residual: bool = False


class FactorizedBlock(_BlockBase):
    """kx1 conv-norm-act then 1xk conv-norm-act (Inception-style factorization)."""

    kind: Literal["factorized"] = "factorized"


class SpatialSepBlock(_BlockBase):
    """Spatially separable convolution: kx1 then 1xk with nothing between (a rank-1
    factorization of a kxk kernel), then norm and act."""

    kind: Literal["spatial_sep"] = "spatial_sep"


class DepthwiseSeparableBlock(_BlockBase):
    """MobileNetV1: depthwise kxk-norm-act [-> SE] -> pointwise 1x1-norm[-act]."""

    kind: Literal["ds"] = "ds"
    dilation: Dilation = 1
    se: SESpec | None = None
    pw_act: bool = True
    residual: bool = False


class MBConvBlock(_BlockBase):
    """Inverted residual / MBConv (MobileNetV2/V3, MnasNet, EfficientNet): 1x1 expand
    (skipped when the expanded width equals the input) -> depthwise kxk -> [SE] -> linear
    1x1 projection; identity shortcut when stride is 1 and widths match.

    Expanded width: ``mid_channels`` when given, else ``round(in * expand)``."""

    kind: Literal["mbconv"] = "mbconv"
    expand: float = Field(6.0, ge=0.1, le=16.0)
    mid_channels: Channels | None = None
    dilation: Dilation = 1
    se: SESpec | None = None
    residual: bool = True


class BottleneckBlock(_BlockBase):
    """ResNet/ResNeXt bottleneck: 1x1 -> kxk (grouped, strided) -> 1x1, norm after each,
    act after the first two and after the residual sum; projection shortcut (1x1 conv +
    norm) when stride or width changes."""

    kind: Literal["bottleneck"] = "bottleneck"
    mid_channels: Channels
    groups: Groups = 1
    dilation: Dilation = 1


class ShuffleBlock(_BlockBase):
    """ShuffleNet V1 unit: grouped 1x1 -> act -> channel shuffle -> depthwise kxk ->
    grouped 1x1; stride 1 adds the input, stride 2 concatenates a 3x3 average-pooled
    input (the branch then produces ``out - in`` channels). ``first_groups`` overrides
    the groups of the first 1x1 (ShuffleNet does not group it in its first unit)."""

    kind: Literal["shuffle"] = "shuffle"
    mid_channels: Channels
    groups: Groups = 3
    first_groups: Groups | None = None


Block = Annotated[
    ConvBlock
    | FactorizedBlock
    | SpatialSepBlock
    | DepthwiseSeparableBlock
    | MBConvBlock
    | BottleneckBlock
    | ShuffleBlock,
    Field(discriminator="kind"),
]

BLOCK_KINDS: dict[str, type[_BlockBase]] = {
    "conv": ConvBlock,
    "factorized": FactorizedBlock,
    "spatial_sep": SpatialSepBlock,
    "ds": DepthwiseSeparableBlock,
    "mbconv": MBConvBlock,
    "bottleneck": BottleneckBlock,
    "shuffle": ShuffleBlock,
}


class Stage(_Strict):
    block: Block
    repeats: int = Field(1, ge=1, le=MAX_REPEATS)


class Classifier(_Strict):
    """Global average pool -> [Linear(hidden) -> act -> dropout] -> dropout -> Linear."""

    hidden: Channels | None = None
    hidden_act: Activation = "hswish"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True


class ArchSpec(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str | None = Field(None, max_length=200)
    in_channels: int = Field(3, ge=1, le=64)
    resolution: int = Field(224, ge=MIN_RESOLUTION, le=MAX_RESOLUTION)
    num_classes: int = Field(1000, ge=1, le=MAX_CLASSES)
    norm_eps: float = Field(1e-5, gt=0.0, le=0.1)
    stem: ConvLayer
    stem_pool: bool = False
    stages: list[Stage] = Field(min_length=1, max_length=MAX_STAGES)
    head: ConvLayer | None = None
    classifier: Classifier = Classifier()

    # ---- serial forms -------------------------------------------------------------------

    def canonical_dict(self, include_name: bool = True) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if not include_name:
            data.pop("name", None)
        return data

    def canonical_json(self, include_name: bool = True) -> str:
        return json.dumps(
            self.canonical_dict(include_name), sort_keys=True, separators=(",", ":")
        )

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical JSON without ``name``: equal networks hash equal."""
        return hashlib.sha256(self.canonical_json(include_name=False).encode()).hexdigest()

    @property
    def short_hash(self) -> str:
        return self.hash[:12]

    def to_compact(self) -> str:
        from blocks.compact import to_compact

        return to_compact(self)

    @classmethod
    def from_compact(cls, text: str) -> ArchSpec:
        from blocks.compact import from_compact

        return from_compact(text)

    def with_resolution(self, resolution: int) -> ArchSpec:
        return self.model_validate({**self.model_dump(), "resolution": resolution})



def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision/TF rounding of channel counts to a multiple of ``divisor`` that does not
    go more than 10% below ``value``."""
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return int(new_value)


def se_channels(se: SESpec, in_channels: int, mid_channels: int) -> int:
    base = in_channels if se.base == "in" else mid_channels
    raw = max(1, math.floor(base * se.ratio + 1e-9))
    return make_divisible(raw, se.divisor) if se.divisor > 1 else raw


def mbconv_mid(block: MBConvBlock, in_channels: int) -> int:
    if block.mid_channels is not None:
        return block.mid_channels
    return max(1, round(in_channels * block.expand))
