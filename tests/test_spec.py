"""The spec's serial forms, hash and bounds."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from strategies import arch_specs

from blocks import PRESETS, ArchSpec, SpecError, SpecLoadError, build_model, load_spec, preset
from blocks.compact import CompactFormatError, from_compact

MINIMAL = {"stem": {"out_channels": 8}, "stages": [{"block": {"kind": "conv", "out_channels": 8}}]}
MINIMAL_CANONICAL = (
    '{"classifier":{"bias":true,"dropout":0.0,"hidden":null,"hidden_act":"hswish"},'
    '"head":null,"in_channels":3,"name":null,"norm_eps":1e-05,"num_classes":1000,'
    '"resolution":224,"schema_version":1,"stages":[{"block":{"act":"relu","dilation":1,'
    '"groups":1,"kernel":3,"kind":"conv","out_channels":8,"residual":false,"stride":1},'
    '"repeats":1}],"stem":{"act":"relu","kernel":3,"out_channels":8,"stride":1},'
    '"stem_pool":false}'
)


def _spec(**changes) -> dict:
    data = json.loads(json.dumps(MINIMAL))
    data.update(changes)
    return data


def _block(**fields) -> dict:
    return _spec(stages=[{"block": {"kind": "conv", "out_channels": 8, **fields}}])


# ---- compact form ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(spec=arch_specs(), name=st.one_of(st.none(), st.text(max_size=20)))
def test_compact_round_trip_random(spec, name):
    spec = ArchSpec.model_validate({**spec.model_dump(), "name": name})
    text = spec.to_compact()
    assert "\n" not in text and " " not in text
    back = ArchSpec.from_compact(text)
    assert back == spec
    assert back.hash == spec.hash
    assert back.to_compact() == text


@pytest.mark.parametrize("name", list(PRESETS))
def test_compact_round_trip_presets(name):
    for width in (1.0, 0.35):
        spec = preset(name, width)
        assert ArchSpec.from_compact(spec.to_compact()) == spec


def test_compact_reads_like_timm():
    spec = preset("mobilenet_v2")
    text = spec.to_compact()
    assert ",ir_r2_s2_c24_a-relu6," in text
    assert text.startswith("net_v1_r224_")
    assert load_spec(text) == spec
    minimal = ArchSpec.model_validate(MINIMAL)
    assert minimal.to_compact() == "net_v1_r224,stem:cn_c8,cn_c8"
    for name in ("", "a_b,c d", "x-y%z"):  # names are quoted; the empty one too
        named = ArchSpec.model_validate(_spec(name=name))
        assert ArchSpec.from_compact(named.to_compact()).name == name
    se = ArchSpec.from_compact("net_v1_r64,stem:cn_s2_c16,ir_r2_k5_s2_e4_c24_se0.25_seb-in,fc_h32")
    block = se.stages[0].block
    assert (block.kind, block.kernel, block.stride, block.expand) == ("mbconv", 5, 2, 4.0)
    assert (se.stages[0].repeats, block.se.ratio, block.se.base) == (2, 0.25, "in")
    assert se.classifier.hidden == 32


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("cn_c8", "must start with 'net"),
        ("net_v1,cn_c8", "no 'stem:cn_...' part"),
        ("net_v1,stem:cn_c8,zz_c8", "unknown block kind 'zz'"),
        ("net_v1,stem:cn_c8,ir_c8_q7", "unknown token 'q7'"),
        ("net_v1,stem:cn_c8,ir_c8,,", "empty part"),
        ("net_v1,stem:cn_c8,cn_c9999", "out_channels"),
    ],
)
def test_compact_errors_name_the_part(text, needle):
    with pytest.raises(CompactFormatError, match=needle):
        from_compact(text)
    with pytest.raises(SpecLoadError):
        load_spec(text)


# ---- canonical JSON and hash -------------------------------------------------------------


def test_canonical_json_is_pinned():
    spec = ArchSpec.model_validate(MINIMAL)
    assert spec.canonical_json() == MINIMAL_CANONICAL
    without_name = MINIMAL_CANONICAL.replace('"name":null,', "")
    assert spec.canonical_json(include_name=False) == without_name
    assert spec.hash == hashlib.sha256(without_name.encode()).hexdigest()
    assert spec.hash == "e434bc6fbd2d6fe2783ddcd3d23ba485b4bef98bfc3af1072800f7d081d54726"
    assert len(spec.short_hash) == 12 and spec.hash.startswith(spec.short_hash)


def test_preset_hash_is_stable():
    # the measurement cache is keyed by this: a change here invalidates every stored result
    assert preset("mobilenet_v2").hash == (
        "354d4ca48a8489f266bbdcb96ed0b489686947fd6761694e09d4a2d95e37b2be"
    )


@settings(max_examples=40, deadline=None)
@given(spec=arch_specs(), name=st.one_of(st.none(), st.text(max_size=20)))
def test_hash_ignores_name_and_json_round_trips(spec, name):
    renamed = spec.model_copy(update={"name": name})
    assert renamed.hash == spec.hash
    text = spec.canonical_json()
    assert json.loads(text) == spec.canonical_dict()
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert ArchSpec.model_validate_json(text) == spec
    # key order and whitespace of the input do not matter
    shuffled = json.dumps(dict(reversed(list(spec.canonical_dict().items()))), indent=3)
    assert ArchSpec.model_validate_json(shuffled).hash == spec.hash


def test_equal_networks_hash_equal_and_different_ones_differ():
    a = ArchSpec.model_validate(MINIMAL)
    b = ArchSpec.model_validate(_spec(resolution=224, name="other"))  # defaults written out
    c = ArchSpec.model_validate(_block(kernel=5))
    assert a.hash == b.hash
    assert a.hash != c.hash
    assert a.with_resolution(160).hash != a.hash


# ---- bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (_block(out_channels=5000), "out_channels"),
        (_block(kernel=13), "kernel"),
        (_block(kernel=4), "kernel must be odd"),
        (_block(stride=5), "stride"),
        (_block(dilation=9), "dilation"),
        (_block(groups=0), "groups"),
        (_block(color="red"), "color"),
        (_spec(resolution=4), "resolution"),
        (_spec(resolution=2048), "resolution"),
        (_spec(in_channels=100), "in_channels"),
        (_spec(num_classes=0), "num_classes"),
        (_spec(stages=[]), "stages"),
        (_spec(stages=[MINIMAL["stages"][0]] * 25), "stages"),
        (_spec(stages=[{**MINIMAL["stages"][0], "repeats": 33}]), "repeats"),
        (_spec(stem={"out_channels": 8, "kernel": 15}), "kernel"),
        (_spec(classifier={"dropout": 1.0}), "dropout"),
        (_spec(schema_version=2), "schema_version"),
        (_spec(stages=[{"block": {"kind": "mbconv", "out_channels": 8, "expand": 64}}]),
         "expand"),
        (_spec(stages=[{"block": {"kind": "warp", "out_channels": 8}}]), "kind"),
    ],
)
def test_bounds_are_rejected_naming_the_field(data, field):
    with pytest.raises(ValidationError) as err:
        ArchSpec.model_validate(data)
    assert field in str(err.value)
    with pytest.raises(SpecLoadError) as lerr:
        load_spec(json.dumps(data))
    assert field.split()[0] in str(lerr.value)
    assert "\n" not in str(lerr.value)


@pytest.mark.parametrize(
    ("stage", "field"),
    [
        ({"kind": "conv", "out_channels": 8, "groups": 3}, "stages[0].block.groups"),
        ({"kind": "conv", "out_channels": 16, "residual": True}, "stages[0].block.residual"),
        ({"kind": "conv", "out_channels": 8, "stride": 2, "residual": True},
         "stages[0].block.residual"),
        ({"kind": "bottleneck", "out_channels": 16, "mid_channels": 6, "groups": 4},
         "stages[0].block.groups"),
        ({"kind": "shuffle", "out_channels": 12, "mid_channels": 6, "groups": 2},
         "stages[0].block.out_channels"),
        ({"kind": "shuffle", "out_channels": 8, "mid_channels": 6, "groups": 2, "stride": 2},
         "stages[0].block.out_channels"),
        ({"kind": "shuffle", "out_channels": 8, "mid_channels": 6, "groups": 2, "stride": 3},
         "stages[0].block.stride"),
        ({"kind": "shuffle", "out_channels": 8, "mid_channels": 6, "groups": 2,
          "first_groups": 3}, "stages[0].block.first_groups"),
    ],
)
def test_spec_error_names_the_field(stage, field):
    spec = ArchSpec.model_validate(_spec(stages=[{"block": stage}]))
    with pytest.raises(SpecError) as err:
        build_model(spec)
    assert err.value.field == field
    assert str(err.value).startswith(field + ": ")
