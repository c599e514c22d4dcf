"""The table of block kinds: each kind is one module and one entry, and everything that
dispatches on a kind (spec union, checks, builder, cost, export, compact form) reads it."""

from __future__ import annotations

import pytest
from strategies import ALL_KINDS

from blocks import ArchSpec, preset
from blocks.compact import KIND_PREFIX, _block_keys
from blocks.export import pytorch_source
from blocks.kinds import KINDS
from blocks.spec import BLOCK_KINDS


def test_prefixes_are_unique_and_every_kind_is_drawn_by_the_strategies():
    assert len(set(KIND_PREFIX.values())) == len(KINDS)
    assert set(ALL_KINDS) == set(KINDS) == set(BLOCK_KINDS)


@pytest.mark.parametrize("name", list(KINDS))
def test_a_kind_is_one_module(name):
    kind = KINDS[name]
    assert kind.name == name
    module = kind.spec.__module__
    assert module == f"blocks.kinds.{name}"
    assert {kind.recipe.__module__, kind.cost.__module__} == {module}
    # every field can be written in the compact form
    keys = _block_keys(name)
    assert set(kind.spec.model_fields) - {"kind", "se"} <= set(keys)
    # and the spec union takes it
    required = {f: 8 for f, info in kind.spec.model_fields.items() if info.is_required()}
    spec = ArchSpec.model_validate({"stem": {"out_channels": 8},
                                    "stages": [{"block": {**required, "kind": name}}]})
    assert type(spec.stages[0].block) is kind.spec


def test_a_kinds_own_layer_travels_with_the_pytorch_export():
    source = pytorch_source(preset("shufflenet_v2", 0.5, resolution=32))
    assert source.count("class ShuffleV2Unit(nn.Module):") == 1
    assert "ShuffleV2Unit(24, 48, kernel=3, stride=2, norm_layer=norm" in source
    assert "blocks" not in source.split("# ---- layers")[0].split('"""', 2)[2]
