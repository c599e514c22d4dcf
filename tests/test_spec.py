"""The spec's serial forms, hash and bounds."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from strategies import arch_specs

from blocks import PRESETS, ArchSpec, SpecError, SpecLoadError, build_model, load_spec, preset
from blocks.compact import CompactFormatError, compact_dict, from_compact
from blocks.shapes import resolve

torch.set_num_threads(1)

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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("net_v1_r224,stem:cn_s2_c32,ir_e1.0_c16_a-relu7",
         "invalid spec: part 3 ('ir_e1.0_c16_a-relu7'): stages.0.block.mbconv.act: Input "
         "should be 'relu', 'relu6', 'hswish', 'swish', 'gelu', 'sigmoid', 'hsigmoid' or 'none'"),
        ("net_v1,stem:cn_c8,cn_c9999",
         "invalid spec: part 3 ('cn_c9999'): stages.0.block.conv.out_channels: Input should "
         "be less than or equal to 4096"),
        ("net_v1_r5,stem:cn_c8,cn_c9",
         "invalid spec: part 1 ('net_v1_r5'): resolution: Input should be greater than or "
         "equal to 8"),
        ("net_v1,stem:cn_c8,cn_c9,fc_drop1.5",
         "invalid spec: part 4 ('fc_drop1.5'): classifier.dropout: Input should be less than 1"),
    ],
)
def test_compact_validation_errors_keep_the_part_the_field_and_the_reason(text, message):
    with pytest.raises(SpecLoadError) as err:
        load_spec(text)
    assert str(err.value) == message
    # the same field path and reason as the JSON form of the same spec
    part = message.split(": ", 2)[1]
    with pytest.raises(SpecLoadError) as json_err:
        load_spec(json.dumps(compact_dict(text)))
    assert str(json_err.value) == message.replace(part + ": ", "")


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


def test_a_field_added_to_a_kind_keeps_the_hashes_of_existing_specs():
    # the bottleneck's se came after ResNeXt specs were hashed: unset, it is not written
    spec = preset("resnext50")
    assert spec.hash == "37edb4b2047a177ea1845a93dd58bedce4bd836c889e9cc054dfa90a4fe29976"
    assert '"se"' not in spec.canonical_json()
    with_se = preset("se_resnext50")
    assert '"se":{' in with_se.canonical_json()
    assert ArchSpec.model_validate_json(spec.canonical_json()) == spec


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


# ---- one network, one hash -----------------------------------------------------------------


def _fill(state: dict, positive: bool, seed: int = 0, shift: float = 0.25) -> None:
    """Weights of about 1 / fan-in. Positive ones with positive inputs: no activation
    kills the signal, so a difference in structure shows. Signed, larger ones: values past
    every activation's knee and on both sides of zero (relu vs relu6 vs none), so a
    difference in function shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in state.items():
            if not value.is_floating_point():
                continue
            r = torch.rand(value.shape, generator=gen)
            if not positive:  # shift 0.25: mostly positive (a path rarely dies); 0.5: even
                r = 8 * (r - shift)
            if key.endswith("running_mean"):
                value.zero_()
            elif key.endswith("running_var"):
                value.fill_(1.0)
            elif value.dim() > 1:
                fan_in = value.numel() / value.shape[0]
                value.copy_((0.5 + r) / fan_in if positive else r / fan_in)
            else:
                value.copy_(0.2 * r if key.endswith("bias") else 0.8 + 0.4 * r)


def _same_network(a: ArchSpec, b: ArchSpec) -> bool:
    """Equal state-dict shapes, and equal outputs with the same weights and statistics
    (two fillings), at the spec's resolution and at a larger one (where a dilation that a
    tiny feature map hides shows)."""
    ma, mb = build_model(a).eval(), build_model(b).eval()
    sa, sb = ma.state_dict(), mb.state_dict()
    if [(k, v.shape) for k, v in sa.items()] != [(k, v.shape) for k, v in sb.items()]:
        return False
    if a.in_channels != b.in_channels:
        return False
    for positive, seed, shift in ((True, 0, 0), (False, 1, 0.25), (False, 2, 0.5),
                                  (False, 3, 0.5)):
        _fill(sa, positive, seed, shift)
        mb.load_state_dict(sa)
        gen = torch.Generator().manual_seed(2)
        for res in (a.resolution, 40):
            x = torch.rand(2, a.in_channels, res, res, generator=gen)
            x = x if positive else 40 * (x - shift)
            with torch.no_grad():
                if not torch.equal(ma(x), mb(x)):
                    return False
    return True


def _net(*blocks: dict, stem: int = 16, **top) -> ArchSpec:
    return ArchSpec.model_validate({"resolution": 16, "num_classes": 5,
                                    "stem": {"out_channels": stem},
                                    "stages": [{"block": b} for b in blocks], **top})


_SE = {"ratio": 0.25, "base": "mid", "divisor": 1, "act": "relu", "gate": "hsigmoid"}
SAME_NETWORK_PAIRS = {
    "mbconv expand ignored when mid_channels is set": (
        _net({"kind": "mbconv", "out_channels": 24, "mid_channels": 96, "expand": 3.0}),
        _net({"kind": "mbconv", "out_channels": 24, "mid_channels": 96, "expand": 4.0})),
    "mid_channels 96 and the expand that gives 96": (
        _net({"kind": "mbconv", "out_channels": 24, "mid_channels": 96}),
        _net({"kind": "mbconv", "out_channels": 24, "expand": 6.0})),
    "expand ratios that round to the same width": (
        _net({"kind": "mbconv", "out_channels": 24, "expand": 6.02}),
        _net({"kind": "mbconv", "out_channels": 24, "expand": 6.0})),
    "ds SE base in and mid": (
        _net({"kind": "ds", "out_channels": 24, "se": {**_SE, "base": "in"}}),
        _net({"kind": "ds", "out_channels": 24, "se": _SE})),
    "hidden_act without a hidden layer": (
        _net({"kind": "conv", "out_channels": 8}, classifier={"hidden_act": "relu"}),
        _net({"kind": "conv", "out_channels": 8}, classifier={"hidden_act": "gelu"})),
    "dilation on a 1x1 kernel": (
        _net({"kind": "conv", "out_channels": 8, "kernel": 1, "dilation": 3}),
        _net({"kind": "conv", "out_channels": 8, "kernel": 1})),
    "shuffle first_groups equal to groups": (
        _net({"kind": "shuffle", "out_channels": 48, "mid_channels": 12, "groups": 4,
              "first_groups": 4, "stride": 2}),
        _net({"kind": "shuffle", "out_channels": 48, "mid_channels": 12, "groups": 4,
              "stride": 2})),
    "the residual flag at stride 2": (
        _net({"kind": "mbconv", "out_channels": 16, "stride": 2, "residual": False}),
        _net({"kind": "mbconv", "out_channels": 16, "stride": 2})),
    "the residual flag where the width changes": (
        _net({"kind": "ds", "out_channels": 24, "residual": True}),
        _net({"kind": "ds", "out_channels": 24})),
    "a projection where the shape is kept": (
        _net({"kind": "mbconv", "out_channels": 16, "projection": True}),
        _net({"kind": "mbconv", "out_channels": 16})),
    "a projection without a residual": (
        _net({"kind": "ds", "out_channels": 24, "stride": 2, "projection": True}),
        _net({"kind": "ds", "out_channels": 24, "stride": 2})),
    "an SE divisor that changes nothing": (
        _net({"kind": "mbconv", "out_channels": 16, "se": {**_SE, "divisor": 8}}),
        _net({"kind": "mbconv", "out_channels": 16, "se": _SE})),
}


@pytest.mark.parametrize("pair", list(SAME_NETWORK_PAIRS))
def test_fields_that_cannot_change_the_network_do_not_change_the_hash(pair):
    a, b = SAME_NETWORK_PAIRS[pair]
    assert _same_network(a, b)
    assert a.hash == b.hash
    assert a == b and a.to_compact() == b.to_compact()


def test_canonical_form_keeps_what_changes_the_network():
    # mid_channels fixed across repeats whose inputs differ: no one ratio gives it
    fixed = _net({"kind": "mbconv", "out_channels": 24, "mid_channels": 96})
    two = ArchSpec.model_validate({**fixed.model_dump(), "stages": [
        {"block": {"kind": "mbconv", "out_channels": 24, "mid_channels": 96}, "repeats": 2}]})
    assert two.stages[0].block.mid_channels == 96
    ratio = ArchSpec.model_validate({**fixed.model_dump(), "stages": [
        {"block": {"kind": "mbconv", "out_channels": 24, "expand": 6.0}, "repeats": 2}]})
    assert not _same_network(two, ratio) and two.hash != ratio.hash
    # an SE divisor that rounds 6 up to 8 changes the network
    se = {**_SE, "ratio": 0.0625, "divisor": 8}
    a = _net({"kind": "mbconv", "out_channels": 16, "se": se})
    assert a.stages[0].block.se.divisor == 8
    assert a.hash != _net({"kind": "mbconv", "out_channels": 16,
                           "se": {**se, "divisor": 1}}).hash


_NEUTRAL_CANDIDATES = ("residual", "projection", "dilation", "expand", "mid_channels",
                       "first_groups")


def _neutral_change_case(spec: ArchSpec, data) -> None:
    """Change one field that may or may not matter: the two specs hash equal exactly
    when they build the same network (state-dict shapes and outputs)."""
    d = spec.model_dump()
    choices = [(None, "hidden_act")]
    for i, stage in enumerate(d["stages"]):
        block = stage["block"]
        choices += [(i, f) for f in _NEUTRAL_CANDIDATES if f in block]
        if block.get("se") is not None:
            choices += [(i, "se.base"), (i, "se.divisor")]
    i, field = data.draw(st.sampled_from(choices))
    if i is None:
        d["classifier"]["hidden_act"] = data.draw(st.sampled_from(["relu", "gelu", "hswish"]))
    elif field.startswith("se."):
        key = field[3:]
        d["stages"][i]["block"]["se"][key] = data.draw(st.sampled_from(
            ["in", "mid"] if key == "base" else [1, 2, 4, 8]))
    else:
        block = d["stages"][i]["block"]
        cin = next(rb.in_channels for rb in resolve(spec) if rb.stage == i)
        mid = block.get("mid_channels") or max(1, round(cin * block.get("expand", 1.0)))
        block[field] = data.draw({
            "residual": st.booleans(), "projection": st.booleans(),
            "dilation": st.sampled_from([1, 2, 3]),
            "expand": st.sampled_from([mid / cin, (mid + 0.3) / cin, 2.0, 6.0]),
            "mid_channels": st.sampled_from([mid, mid + 1]),
            "first_groups": st.sampled_from([None, 1, block.get("groups") or 1]),
        }[field])
    try:
        other = ArchSpec.model_validate(d)
        build_model(other)
    except (ValidationError, SpecError):
        assume(False)
    note(f"{spec.to_compact()}  vs  {other.to_compact()}")
    assert (other.hash == spec.hash) == _same_network(spec, other)


# the kinds with fields that can be no-ops (the others are covered by the round trips)
_NEUTRAL_SPECS = arch_specs(kinds=("conv", "ds", "mbconv", "bottleneck", "shuffle"),
                            max_channels=12, max_resolution=16)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_NEUTRAL_SPECS, data=st.data())
def test_specs_that_build_the_same_network_hash_the_same(spec, data):
    _neutral_change_case(spec, data)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_NEUTRAL_SPECS, data=st.data())
def test_specs_that_build_the_same_network_hash_the_same_many(spec, data):
    _neutral_change_case(spec, data)


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
