"""The architecture spec: a versioned, bounded, JSON-serializable description of a CNN.

A network is ``stem -> stages -> head -> global average pool -> classifier``. A stage is
one block kind repeated ``repeats`` times; the first repeat takes the stage's stride, the
rest have stride 1 and take the stage's output width as input. Every numeric field is
bounded, so a spec that would allocate absurd tensors is rejected by validation, before
anything is built. The block kinds come from the table :data:`blocks.kinds.KINDS`; fields
that cannot change the built network are written at one canonical value on validation, so
one network has one spec and one hash.

Two serial forms, both exact:

* canonical JSON (:meth:`ArchSpec.canonical_json`): sorted keys, every field written,
  no whitespace; its SHA-256 (without ``name``) is the spec's content hash.
* a compact one-line string (:meth:`ArchSpec.to_compact` / :meth:`ArchSpec.from_compact`)
  in the spirit of timm's ``ir_r2_k3_s2_e6_c24_se0.25``, documented in docs/spec.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from blocks.fields import (
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_DILATION,
    MAX_GROUPS,
    MAX_KERNEL,
    MAX_REPEATS,
    MAX_RESOLUTION,
    MAX_STAGES,
    MAX_STRIDE,
    MIN_RESOLUTION,
    Activation,
    BlockSpec,
    Channels,
    Dilation,
    Gate,
    Groups,
    Kernel,
    SESpec,
    Stride,
    make_divisible,
    odd_kernel,
    se_channels,
)
from blocks.fields import Strict as _Strict
from blocks.kinds import KINDS
from blocks.kinds.bottleneck import BottleneckBlock
from blocks.kinds.conv import ConvBlock
from blocks.kinds.ds import DepthwiseSeparableBlock
from blocks.kinds.factorized import FactorizedBlock
from blocks.kinds.mbconv import MBConvBlock, mbconv_mid
from blocks.kinds.shuffle import ShuffleBlock
from blocks.kinds.spatial_sep import SpatialSepBlock

SCHEMA_VERSION = 1


class ConvLayer(_Strict):
    """conv -> norm -> act, used as stem and head."""

    out_channels: Channels
    kernel: Kernel = 3
    stride: Stride = 1
    act: Activation = "relu"

    @model_validator(mode="after")
    def _check(self) -> ConvLayer:
        odd_kernel(self.kernel)
        return self


# The stage's block: one of the kinds of the table, chosen by its "kind" field.
Block = Annotated[
    functools.reduce(operator.or_, (k.spec for k in KINDS.values())),
    Field(discriminator="kind"),
]

BLOCK_KINDS: dict[str, type[BlockSpec]] = {name: k.spec for name, k in KINDS.items()}
_BlockBase = BlockSpec


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

    @model_validator(mode="wrap")
    @classmethod
    def _canonical(cls, data: Any, handler: Any) -> ArchSpec:
        """Validate, then write every field that cannot change the built network at its
        one canonical value (docs/spec.md, "One network, one spec"): two specs of the same
        network are equal and hash equal."""
        spec = handler(data)
        updates = spec._canonical_updates()
        if not updates:
            return spec
        canonical = handler({**spec.model_dump(), **updates})
        assert not canonical._canonical_updates(), "canonical form is not a fixed point"
        return canonical

    def _canonical_updates(self) -> dict[str, Any]:
        updates: dict[str, Any] = {}
        cin = self.stem.out_channels
        stages, changed = [], False
        for stage in self.stages:
            block = stage.block
            cout = block.out_channels
            ins = (cin,) + (cout,) * (stage.repeats - 1)
            data = block.model_dump()
            new = {**data, **KINDS[block.kind].canonical(block, ins)}
            changed |= new != data
            stages.append({"block": new, "repeats": stage.repeats})
            cin = cout
        if changed:
            updates["stages"] = stages
        clf = self.classifier
        default_act = Classifier.model_fields["hidden_act"].default
        if clf.hidden is None and clf.hidden_act != default_act:  # no hidden layer to act
            updates["classifier"] = {**clf.model_dump(), "hidden_act": default_act}
        return updates

    # ---- serial forms -------------------------------------------------------------------

    def canonical_dict(self, include_name: bool = True) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if not include_name:
            data.pop("name", None)
        for stage, dumped in zip(self.stages, data["stages"], strict=True):
            block = stage.block
            for name in block.added_fields:
                if getattr(block, name) == type(block).model_fields[name].default:
                    dumped["block"].pop(name)
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


__all__ = [
    "BLOCK_KINDS",
    "MAX_CHANNELS",
    "MAX_CLASSES",
    "MAX_DILATION",
    "MAX_GROUPS",
    "MAX_KERNEL",
    "MAX_REPEATS",
    "MAX_RESOLUTION",
    "MAX_STAGES",
    "MAX_STRIDE",
    "MIN_RESOLUTION",
    "SCHEMA_VERSION",
    "Activation",
    "ArchSpec",
    "Block",
    "BlockSpec",
    "BottleneckBlock",
    "Classifier",
    "ConvBlock",
    "ConvLayer",
    "DepthwiseSeparableBlock",
    "Dilation",
    "FactorizedBlock",
    "Gate",
    "Groups",
    "MBConvBlock",
    "SESpec",
    "ShuffleBlock",
    "SpatialSepBlock",
    "Stage",
    "make_divisible",
    "mbconv_mid",
    "se_channels",
]
