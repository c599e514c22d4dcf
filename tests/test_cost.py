"""The analytic cost model against the built model, an independent counter and the seed
figures of DESIGN.md section 5."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from strategies import arch_specs
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from blocks import PRESETS, ArchSpec, SpecError, build_model, preset
from blocks.cost import (
    CostReport,
    batchnorm_params,
    conv2d_cost,
    conv_out_hw,
    estimate_cost,
    linear_cost,
)

torch.set_num_threads(1)

_COUNTED = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def _measure(spec: ArchSpec, batch: int = 1):
    """params, MACs (FlopCounterMode / 2), counted activation elements and the largest
    single-layer input+output, all from the real model."""
    torch.manual_seed(0)
    model = build_model(spec).eval()
    params = sum(p.numel() for p in model.parameters())
    outputs: list[int] = []
    largest = [0]

    def hook(_mod, inputs, output):
        outputs.append(output.numel())
        largest[0] = max(largest[0], inputs[0].numel() + output.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _COUNTED)]
    x = torch.randn(batch, spec.in_channels, spec.resolution, spec.resolution)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    for h in handles:
        h.remove()
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return params, flops // 2, x.numel() + sum(outputs), largest[0]


# ---- seed figures (DESIGN.md section 5) ---------------------------------------------------


def test_seed_standard_conv():
    c = conv2d_cost(64, 128, kernel=3, in_hw=56)
    assert c.params == 73_728
    assert c.out_hw == (56, 56)
    assert c.macs == 231_211_008
    assert conv2d_cost(256, 256, 3).params == 589_824


def test_seed_bottleneck_and_depthwise_separable():
    bottleneck = (conv2d_cost(256, 64, 1).params + conv2d_cost(64, 64, 3).params
                  + conv2d_cost(64, 256, 1).params)
    assert bottleneck == 69_632
    ds = conv2d_cost(64, 64, 3, groups=64).params + conv2d_cost(64, 128, 1).params
    assert ds == 8_768
    assert 73_728 / ds == pytest.approx(8.4, abs=0.05)


def test_seed_with_bias():
    assert conv2d_cost(64, 128, 3, bias=True).params == 73_856
    assert conv2d_cost(64, 128, 3, groups=2, bias=True).params == 36_992
    assert conv2d_cost(64, 128, 3, groups=4, bias=True).params == 18_560
    assert conv2d_cost(64, 64, 3, groups=64, bias=True).params == 640
    assert conv2d_cost(64, 64, 3, bias=True).params == 36_928


def test_seed_factorized_7x7():
    full = conv2d_cost(1, 1, 7).params
    factorized = conv2d_cost(1, 1, (7, 1)).params + conv2d_cost(1, 1, (1, 7)).params
    assert (full, factorized) == (49, 14)


@pytest.mark.parametrize(
    ("cin", "cout", "k", "groups", "bias", "expected"),
    [(64, 128, 3, 1, False, 73_728), (64, 128, 3, 2, True, 36_992),
     (64, 128, 3, 4, True, 18_560), (64, 64, 3, 64, True, 640), (256, 256, 3, 1, False, 589_824)],
)
def test_primitive_matches_nn_conv2d(cin, cout, k, groups, bias, expected):
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias)
    assert conv2d_cost(cin, cout, k, groups=groups, bias=bias).params == expected
    assert sum(p.numel() for p in conv.parameters()) == expected


def test_primitive_macs_match_counter_with_stride_and_dilation():
    conv = nn.Conv2d(8, 12, (5, 3), stride=(2, 1), padding=(4, 2), dilation=2, groups=4)
    x = torch.randn(2, 8, 17, 13)
    with FlopCounterMode(display=False) as counter:
        y = conv(x)
    c = conv2d_cost(8, 12, (5, 3), (2, 1), groups=4, bias=True, in_hw=(17, 13), dilation=2,
                    batch=2)
    assert c.out_hw == tuple(y.shape[2:])
    assert c.macs == counter.get_total_flops() // 2
    assert linear_cost(10, 7).params == 77
    assert linear_cost(10, 7, batch=3).macs == 210
    assert batchnorm_params(32) == sum(p.numel() for p in nn.BatchNorm2d(32).parameters())
    assert conv_out_hw(7, 3, 2) == (4, 4)


def test_bottleneck_block_row_is_the_seed_figure_plus_batchnorm():
    spec = ArchSpec.model_validate({
        "resolution": 56, "stem": {"out_channels": 256, "kernel": 1},
        "stages": [{"block": {"kind": "bottleneck", "out_channels": 256, "mid_channels": 64}}],
    })
    row = estimate_cost(spec).blocks[1]
    assert row.name == "stages[0]#0"
    assert row.params == 69_632 + batchnorm_params(64 + 64 + 256)
    assert row.macs == 69_632 * 56 * 56


# ---- presets ---------------------------------------------------------------------------


def test_mobilenet_v2_at_224():
    r = estimate_cost(preset("mobilenet_v2"))
    assert r.params == 3_504_872
    assert r.macs == 300_774_272  # torchvision lists 0.30 GFLOPS (multiply-adds)
    assert r.resolution == 224
    assert r.flops == 2 * r.macs


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_matches_model_and_counter(name):
    spec = preset(name, resolution=64)
    params, macs, total, largest = _measure(spec)
    r = estimate_cost(spec)
    assert r.params == params
    assert r.macs == macs
    assert r.activation_bytes_total == 4 * total
    assert r.activation_bytes >= 4 * largest


# ---- random specs ----------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=arch_specs())
def test_random_specs_match_model_and_counter(spec):
    params, macs, total, largest = _measure(spec, batch=2)
    r = estimate_cost(spec, batch=2)
    assert r.params == params
    assert r.macs == macs
    assert r.activation_bytes_total == 4 * total
    assert r.activation_bytes >= 4 * largest
    assert sum(b.params for b in r.blocks) == r.params
    assert sum(b.macs for b in r.blocks) == r.macs
    assert max(b.activation_bytes for b in r.blocks) == r.activation_bytes


@settings(max_examples=30, deadline=None)
@given(spec=arch_specs())
def test_cost_scales_with_batch_dtype_and_resolution(spec):
    one = estimate_cost(spec)
    three = estimate_cost(spec, batch=3, dtype_bytes=2)
    assert three.params == one.params
    assert three.macs == 3 * one.macs
    assert three.activation_bytes * 2 == one.activation_bytes * 3
    assert three.activation_bytes_total * 2 == one.activation_bytes_total * 3
    bigger = estimate_cost(spec, resolution=spec.resolution + 8)
    assert bigger.activation_bytes >= one.activation_bytes
    assert bigger.activation_bytes_total > one.activation_bytes_total
    assert bigger.macs >= one.macs
    assert bigger.params == one.params


def test_peak_is_monotonic_in_resolution_for_presets():
    for name in ("mobilenet_v2", "resnext50", "shufflenet_v1"):
        peaks = [estimate_cost(preset(name), resolution=r).activation_bytes
                 for r in (32, 64, 96, 128, 224, 320)]
        assert peaks == sorted(peaks)
        assert peaks[0] < peaks[-1]


def test_peak_working_set_hand_computed():
    # input 3x16x16, stem 3x3/2 -> 8x8x8, one residual mbconv (expand 2: 16 mid), fc.
    spec = ArchSpec.model_validate({
        "resolution": 16, "num_classes": 10,
        "stem": {"out_channels": 8, "stride": 2},
        "stages": [{"block": {"kind": "mbconv", "out_channels": 8, "expand": 2.0}}],
    })
    r = estimate_cost(spec)
    x, stem, mid = 3 * 256, 8 * 64, 16 * 64
    # depthwise conv: block input (held for the shortcut) + expanded input + dw output
    assert r.activation_bytes == 4 * (stem + mid + mid)
    assert r.blocks[0].activation_bytes == 4 * (x + stem)
    assert [b.name for b in r.blocks] == ["stem", "stages[0]#0", "classifier"]
    assert r.blocks[1].out_hw == (8, 8)
    assert r.activation_bytes_total == 4 * (x + stem + mid + mid + stem + 8 + 10)


def test_report_is_json_and_rejects_bad_arguments():
    r = estimate_cost(preset("mobilenet_v3_small"), resolution=64)
    assert CostReport.model_validate_json(r.model_dump_json()) == r
    with pytest.raises(SpecError) as err:
        estimate_cost(preset("mobilenet_v2"), resolution=4)
    assert err.value.field == "resolution"
    with pytest.raises(SpecError) as err:
        estimate_cost(preset("mobilenet_v2"), batch=0)
    assert err.value.field == "batch"


def test_structural_error_names_the_field():
    spec = ArchSpec.model_validate({
        "stem": {"out_channels": 6},
        "stages": [{"block": {"kind": "conv", "out_channels": 8, "groups": 4}}],
    })
    with pytest.raises(SpecError) as err:
        estimate_cost(spec)
    assert err.value.field == "stages[0].block.groups"


@pytest.mark.parametrize("kind", ["conv", "ds", "mbconv"])
def test_projection_shortcut_where_a_residual_changes_shape(kind):
    """``projection``: a 1x1 conv (strided) + BatchNorm shortcut where the residual changes
    the width or the stride: 8 -> 16 at stride 2 adds 8 * 16 weights + 2 * 16 norm
    parameters and 16 * 8 * 8 * 8 MACs at 16x16 input."""
    def net(**extra):
        return ArchSpec.model_validate({
            "resolution": 16, "stem": {"out_channels": 8},
            "stages": [{"block": {"kind": kind, "out_channels": 16, "stride": 2,
                                  "residual": True, **extra}}]})
    projected = net(projection=True)
    params, macs, _, _ = _measure(projected)
    cost = estimate_cost(projected)
    assert (cost.params, cost.macs) == (params, macs)
    if kind != "conv":  # an identity residual cannot change shape; conv refuses it
        plain = estimate_cost(net())
        assert cost.params - plain.params == 8 * 16 + 2 * 16
        assert cost.macs - plain.macs == 16 * 8 * 8 * 8
    else:
        with pytest.raises(SpecError, match="set projection"):
            estimate_cost(net())
    x = torch.randn(1, 3, 16, 16)
    assert build_model(projected).eval()(x).shape == (1, 1000)
