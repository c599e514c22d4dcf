"""Design spaces: loading, validation, pure and always-valid sampling."""

from __future__ import annotations

import json

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.trial import FixedTrial

from blocks.presets import preset
from blocks.shapes import check_block, resolve
from search.space import BUILTIN_SPACES, SEARCH_KINDS, DesignSpace, SpaceError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _random_specs(space: DesignSpace, n: int, seed: int):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n):
        trial = study.ask()
        spec = space.sample(trial)
        yield trial, spec
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


@pytest.mark.parametrize("name", BUILTIN_SPACES)
def test_builtin_spaces_load_and_every_sample_resolves(name):
    space = DesignSpace.load(name)
    assert space.name == name
    kinds_seen = set()
    for _, spec in _random_specs(space, 300, seed=1):
        blocks = resolve(spec)  # raises SpecError on any broken structural rule
        assert blocks[0].in_channels == spec.stem.out_channels
        assert spec.resolution in space.resolution
        kinds_seen.update(st.block.kind for st in spec.stages)
    if name == "default":
        assert kinds_seen == set(SEARCH_KINDS)


def test_default_space_uses_every_block_family_and_variant():
    """conv grouped / depthwise / dilated, mbconv with and without SE, grouped bottleneck,
    factorized, spatial_sep, ds, shuffle all appear among samples."""
    space = DesignSpace.load("default")
    seen = set()
    for _, spec in _random_specs(space, 400, seed=2):
        for r in resolve(spec):
            b = r.block
            seen.add(b.kind)
            if b.kind == "conv":
                if b.groups == r.in_channels == r.out_channels and b.groups > 1:
                    seen.add("conv-depthwise")
                elif b.groups > 1:
                    seen.add("conv-grouped")
                if b.dilation > 1:
                    seen.add("conv-dilated")
            if b.kind == "mbconv":
                seen.add("mbconv-se" if b.se else "mbconv-plain")
            if b.kind == "bottleneck" and b.groups > 1:
                seen.add("bottleneck-grouped")
    expected = set(SEARCH_KINDS) | {"conv-depthwise", "conv-grouped", "conv-dilated",
                                   "mbconv-se", "mbconv-plain", "bottleneck-grouped"}
    assert expected <= seen, expected - seen


@pytest.mark.parametrize("name", BUILTIN_SPACES)
def test_same_params_give_the_same_spec(name):
    space = DesignSpace.load(name)
    for trial, spec in _random_specs(space, 60, seed=3):
        again = space.sample(FixedTrial(trial.params))
        assert again.canonical_json() == spec.canonical_json()
        assert space.sample_params(dict(trial.params)).hash == spec.hash


def test_parameter_names_have_fixed_choices():
    """TPE needs one distribution per name: collect every (name -> distribution) seen."""
    space = DesignSpace.load("default")
    dists: dict[str, object] = {}
    for trial, _ in _random_specs(space, 200, seed=4):
        frozen = trial.study._storage.get_trial(trial._trial_id)
        for pname, dist in frozen.distributions.items():
            assert dists.setdefault(pname, dist) == dist, pname
    assert {"resolution", "width_mult", "s2.kind", "s2.depth", "s2.width"} <= set(dists)
    # conditional, kind-qualified names exist where choices differ between kinds
    assert any(n.startswith("s3.") and n.count(".") == 2 for n in dists)


def test_mobilenet_v2_is_a_point_of_the_mobilenet_v2_space():
    space = DesignSpace.load("mobilenet_v2")
    params = {"width_mult": 0.5, "resolution": 224}
    for sid, width, depth in (("s2", 24, 2), ("s3", 32, 3), ("s4", 64, 4), ("s5", 96, 3),
                              ("s6", 160, 3)):
        params.update({f"{sid}.width": width, f"{sid}.depth": depth, f"{sid}.kernel": 3,
                       f"{sid}.expand": 6.0})
    params.update({"s7.width": 320, "s7.kernel": 3})
    spec = space.sample_params(params)
    assert spec.hash == preset("mobilenet_v2", 0.5).hash


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cin=st.integers(1, 96),
    width=st.sampled_from([8, 12, 16, 24, 40, 48, 72, 96]),
    stride=st.sampled_from([1, 2]),
    kind=st.sampled_from(sorted(SEARCH_KINDS)),
    groups=st.sampled_from([1, 2, 3, 4, 8, 16, "dw"]),
    ratio=st.sampled_from([0.25, 0.5, 1.0]),
)
def test_repairs_always_give_a_valid_block(cin, width, stride, kind, groups, ratio):
    """Any combination of stage input width and choices is repaired into a block that
    passes blocks.shapes.check_block, for every repeat of the stage."""
    space = DesignSpace.from_dict({
        "stem": {"width": [cin], "stride": 1},
        "channel_divisor": 1,
        "resolution": [16],
        "stages": [{"kinds": {kind: {"groups": [groups], "mid_ratio": [ratio]}},
                    "stride": stride, "width": [width], "depth": [2, 2]}],
    })
    spec = space.sample(FixedTrial({}))
    blocks = resolve(spec)
    assert len(blocks) == 2
    for rb in blocks:
        check_block(rb.block, rb.field, rb.in_channels)


def test_load_from_json_and_yaml_files(tmp_path):
    data = {
        "name": "tiny",
        "resolution": [32, 48],
        "stem": {"width": [8]},
        "stages": [{"kinds": ["mbconv", "ds"], "stride": 2, "width": [16, 24],
                    "depth": [1, 2], "kernel": [3, 5]}],
    }
    jpath = tmp_path / "tiny.json"
    jpath.write_text(json.dumps(data))
    ypath = tmp_path / "tiny.yaml"
    import yaml

    ypath.write_text(yaml.safe_dump(data))
    a, b = DesignSpace.load(str(jpath)), DesignSpace.load(str(ypath))
    assert a == b
    names = set()
    for trial, spec in _random_specs(a, 40, seed=5):
        names.update(trial.params)
        assert spec.resolution in (32, 48)
        assert spec.stages[0].block.out_channels in (16, 24)
    # kernel is shared by both kinds (same choices); expand has one (built-in) choice, so
    # it is a constant, not a parameter
    assert names == {"resolution", "s1.kind", "s1.width", "s1.depth", "s1.kernel"}


@pytest.mark.parametrize("data, fragment", [
    ({"stem": {"width": [8]}, "stages": [{"kinds": ["nope"], "width": [8]}]},
     "unknown block kind 'nope'"),
    ({"stem": {"width": [8]}, "stages": [{"kinds": ["conv"], "width": [8], "kernel": [4]}]},
     "kernel: 4 is not an odd size"),
    ({"stem": {"width": [8]}, "stages": [{"kinds": ["conv"], "width": [8], "depth": [3, 1]}]},
     "depth range [3, 1]"),
    ({"stem": {"width": [8]}, "stages": [{"kinds": ["conv"], "width": []}]},
     "give at least one choice"),
    ({"stem": {"width": [8]}, "stages": []}, "stages"),
    ({"stem": {"width": [8]}, "stages": [{"kinds": ["conv"], "width": [8]}],
      "resolution": [4]}, "resolution 4"),
])
def test_bad_spaces_are_refused_with_one_line(data, fragment):
    with pytest.raises(SpaceError) as err:
        DesignSpace.from_dict(data)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_space_name_and_bad_file(tmp_path):
    with pytest.raises(SpaceError, match="neither a built-in space"):
        DesignSpace.load("no-such-space")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        DesignSpace.load(str(bad))


def test_space_round_trips_through_json():
    space = DesignSpace.load("default")
    again = DesignSpace.model_validate_json(space.model_dump_json())
    assert again == space
    assert space.n_configurations() > 1e12
