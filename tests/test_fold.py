"""BatchNorm folding: same outputs, no norm left, the original untouched."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from strategies import arch_specs
from torch import nn

from blocks import build_model, preset
from blocks.cost import estimate_cost
from blocks.fold import fold_batchnorm, fold_conv_bn

torch.set_num_threads(1)


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def _count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_fold_conv_bn_is_exact_for_a_grouped_strided_conv():
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4, bias=True)
    bn = _randomize_norms(nn.Sequential(nn.BatchNorm2d(12))).eval()[0]
    bn.eps = 1e-3
    folded = fold_conv_bn(conv, bn)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        fold_conv_bn(conv, nn.BatchNorm2d(5))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "shufflenet_v1", "resnext50"])
def test_folded_presets_match(name):
    spec = preset(name, 0.5, resolution=64)
    model = _randomize_norms(build_model(spec))
    folded = fold_batchnorm(model)
    assert model.training  # the original is left alone
    assert _count(model, nn.BatchNorm2d) > 0
    assert _count(folded, nn.BatchNorm2d) == 0
    assert not folded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_inplace_fold_is_the_same_model_with_the_same_outputs():
    spec = preset("mobilenet_v2", 0.35, resolution=32)
    model = _randomize_norms(build_model(spec)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    copied = fold_batchnorm(model)
    folded = fold_batchnorm(model, inplace=True)
    assert folded is model and copied is not model
    assert _count(model, nn.BatchNorm2d) == 0
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(copied(x), expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=arch_specs())
def test_folded_random_specs_match_and_lose_exactly_the_norm_parameters(spec):
    model = _randomize_norms(build_model(spec)).eval()
    folded = fold_batchnorm(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # each folded norm leaves weight+bias (2C) and adds a conv bias (C)
    expected = estimate_cost(spec).params - sum(m.num_features for m in norms)
    assert sum(p.numel() for p in folded.parameters()) == expected
    x = torch.randn(2, spec.in_channels, spec.resolution, spec.resolution)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_norm_without_a_conv_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="cannot fold"):
        fold_batchnorm(model)
