"""Presets match their reference implementations exactly (1000 classes, width 1.0)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blocks import PRESETS, build_model, load_spec, preset
from blocks.cost import estimate_cost

# torchvision's counts (and the MobileNetV1 paper's 4.2M, the Xception paper's 22.86M at
# 299x299, pretrainedmodels' SE-ResNeXt-50);
# ShuffleNet V1 g=3 is ours.
EXPECTED_PARAMS = {
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_large": 5_483_032,
    "mobilenet_v3_small": 2_542_856,
    "mnasnet": 4_383_312,
    "efficientnet_b0": 5_288_548,
    "resnext50": 25_028_904,
    "mobilenet_v1": 4_231_976,
    "shufflenet_v1": 1_864_728,
    "shufflenet_v2": 2_278_604,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "se_resnext50": 27_559_896,
    "xception": 22_855_952,
}
# multiply-accumulates at 224x224; torchvision lists these as GFLOPS 0.30 / 0.22 / 0.06 /
# 0.31 / 0.39 / 4.23, the MobileNetV1 paper 569M mult-adds.
EXPECTED_MACS = {
    "mobilenet_v2": 300_774_272,
    "mobilenet_v3_large": 216_589_760,
    "mobilenet_v3_small": 56_510_400,
    "mnasnet": 314_415_872,
    "efficientnet_b0": 385_814_752,
    "resnext50": 4_230_479_872,
    "mobilenet_v1": 568_740_352,
    "shufflenet_v2": 144_907_992,
    "resnet18": 1_814_073_344,
    "resnet34": 3_663_761_408,
}


def test_every_preset_is_pinned():
    assert set(EXPECTED_PARAMS) == set(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count(name):
    spec = preset(name)
    model = build_model(spec)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]
    assert estimate_cost(spec).params == EXPECTED_PARAMS[name]
    assert load_spec(f"preset:{name}") == spec


@pytest.mark.parametrize("name", list(EXPECTED_MACS))
def test_preset_macs_at_224(name):
    assert estimate_cost(preset(name)).macs == EXPECTED_MACS[name]


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("width", [0.5, 1.4])
def test_width_multipliers_build_and_are_costed_exactly(name, width):
    spec = preset(name, width, num_classes=10, resolution=32)
    model = build_model(spec).eval()
    assert estimate_cost(spec).params == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert load_spec(f"preset:{name}@{width}").stages == preset(name, width).stages


def test_width_changes_the_cost_monotonically():
    params = [estimate_cost(preset("mobilenet_v2", w)).params for w in (0.35, 0.5, 0.75, 1.0)]
    assert params == sorted(params) and len(set(params)) == 4


def test_bad_presets_are_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("vgg16")
    with pytest.raises(ValueError, match="width multiplier"):
        preset("mobilenet_v2", 10.0)


# torchvision's counts at width_mult=0.33 (1000 classes)
@pytest.mark.parametrize(("name", "params"), [("mobilenet_v3_large", 933_504),
                                              ("efficientnet_b0", 919_066)])
def test_width_multiplier_matches_torchvision(name, params):
    spec = preset(name, 0.33)
    assert estimate_cost(spec).params == params
    assert sum(p.numel() for p in build_model(spec).parameters()) == params


@pytest.mark.parametrize(("name", "factor"), [("mobilenet_v3_large", 6), ("mobilenet_v3_small", 6),
                                              ("efficientnet_b0", 4)])
@pytest.mark.parametrize("width", [0.1, 0.25, 0.33, 0.5, 0.75, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0])
def test_head_is_a_multiple_of_the_last_blocks_rounded_width(name, factor, width):
    """torchvision sizes the head from the last block's rounded width (x6 for MobileNetV3,
    x4 for EfficientNet), not by rounding the scaled 960 / 1280."""
    spec = preset(name, width)
    assert spec.head.out_channels == factor * spec.stages[-1].block.out_channels


# torchvision's shufflenet_v2_x0_5 / x1_0 (params, MACs at 224x224)
@pytest.mark.parametrize(("width", "params", "macs"), [(0.5, 1_366_792, 40_476_448),
                                                       (1.0, 2_278_604, 144_907_992)])
def test_shufflenet_v2_matches_torchvision(width, params, macs):
    spec = preset("shufflenet_v2", width)
    model = build_model(spec).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224))
    assert sum(p.numel() for p in model.parameters()) == params
    assert counter.get_total_flops() // 2 == macs
    cost = estimate_cost(spec)
    assert (cost.params, cost.macs) == (params, macs)


def test_se_resnext50_is_resnext50_plus_its_squeeze_excitation():
    """SE (reduction 16, with biases) on each bottleneck's output: 2 * out * out/16 + out/16
    + out parameters per block; MACs add the two 1x1 convs on the pooled vector."""
    plain, se = estimate_cost(preset("resnext50")), estimate_cost(preset("se_resnext50"))
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert se.params - plain.params == sum(2 * w * (w // 16) + w // 16 + w for w in widths)
    assert se.macs - plain.macs == sum(2 * w * (w // 16) for w in widths)


def test_xception_at_299_is_costed_exactly():
    """The paper's 22,855,952 parameters; MACs as FlopCounterMode counts the built model
    (the stem convs are 'same'-padded, so they are not the reference's 8.4G exactly)."""
    spec = preset("xception")
    assert spec.resolution == 299
    torch.set_num_threads(1)
    model = build_model(spec).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 299, 299))
    cost = estimate_cost(spec)
    assert cost.params == sum(p.numel() for p in model.parameters()) == 22_855_952
    assert cost.macs == counter.get_total_flops() // 2 == 8_470_752_656
