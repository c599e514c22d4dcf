"""Published efficient CNNs as specs, with width multipliers.

Each preset follows the reference implementation named in its docstring; the parameter
counts at width 1.0 and 1000 classes are checked in tests/test_presets.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from blocks.spec import ArchSpec, make_divisible


def _spec(name: str, **kw: Any) -> ArchSpec:
    return ArchSpec.model_validate({"name": name, **kw})


def _stage(kind: str, repeats: int = 1, **block: Any) -> dict[str, Any]:
    return {"block": {"kind": kind, **block}, "repeats": repeats}


def mobilenet_v1(width: float = 1.0, num_classes: int = 1000, resolution: int = 224) -> ArchSpec:
    """MobileNetV1 (Howard et al. 2017): 3x3 stem + 13 depthwise-separable blocks."""
    c = lambda n: make_divisible(n * width, 8)  # noqa: E731
    layout = [(64, 1, 1), (128, 2, 1), (128, 1, 1), (256, 2, 1), (256, 1, 1), (512, 2, 1),
              (512, 1, 5), (1024, 2, 1), (1024, 1, 1)]
    stages = [_stage("ds", n, out_channels=c(o), stride=s) for o, s, n in layout]
    return _spec(f"mobilenet_v1@{width:g}", num_classes=num_classes, resolution=resolution,
                 stem={"out_channels": c(32), "stride": 2}, stages=stages)


def mobilenet_v2(width: float = 1.0, num_classes: int = 1000, resolution: int = 224) -> ArchSpec:
    """MobileNetV2 as in torchvision (3,504,872 parameters at width 1.0)."""
    setting = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1)]
    stages = [
        _stage("mbconv", n, out_channels=make_divisible(c * width, 8), expand=float(t), stride=s,
               act="relu6")
        for t, c, n, s in setting
    ]
    return _spec(
        f"mobilenet_v2@{width:g}", num_classes=num_classes, resolution=resolution,
        stem={"out_channels": make_divisible(32 * width, 8), "stride": 2, "act": "relu6"},
        stages=stages,
        head={"out_channels": make_divisible(1280 * max(1.0, width), 8), "kernel": 1,
              "act": "relu6"},
        classifier={"dropout": 0.2},
    )


_MNV3_LARGE = [  # kernel, expanded, out, se, act, stride
    (3, 16, 16, False, "relu", 1), (3, 64, 24, False, "relu", 2), (3, 72, 24, False, "relu", 1),
    (5, 72, 40, True, "relu", 2), (5, 120, 40, True, "relu", 1), (5, 120, 40, True, "relu", 1),
    (3, 240, 80, False, "hswish", 2), (3, 200, 80, False, "hswish", 1),
    (3, 184, 80, False, "hswish", 1), (3, 184, 80, False, "hswish", 1),
    (3, 480, 112, True, "hswish", 1), (3, 672, 112, True, "hswish", 1),
    (5, 672, 160, True, "hswish", 2), (5, 960, 160, True, "hswish", 1),
    (5, 960, 160, True, "hswish", 1),
]
_MNV3_SMALL = [
    (3, 16, 16, True, "relu", 2), (3, 72, 24, False, "relu", 2), (3, 88, 24, False, "relu", 1),
    (5, 96, 40, True, "hswish", 2), (5, 240, 40, True, "hswish", 1),
    (5, 240, 40, True, "hswish", 1), (5, 120, 48, True, "hswish", 1),
    (5, 144, 48, True, "hswish", 1), (5, 288, 96, True, "hswish", 2),
    (5, 576, 96, True, "hswish", 1), (5, 576, 96, True, "hswish", 1),
]


def _mobilenet_v3(name, table, last, width, num_classes, resolution) -> ArchSpec:
    c = lambda n: make_divisible(n * width, 8)  # noqa: E731
    se = {"ratio": 0.25, "base": "mid", "divisor": 8, "act": "relu", "gate": "hsigmoid"}
    stages = [
        _stage("mbconv", 1, kernel=k, mid_channels=c(e), out_channels=c(o), stride=s, act=a,
               se=se if use_se else None)
        for k, e, o, use_se, a, s in table
    ]
    return _spec(
        f"{name}@{width:g}", num_classes=num_classes, resolution=resolution, norm_eps=0.001,
        stem={"out_channels": c(16), "stride": 2, "act": "hswish"}, stages=stages,
        # torchvision: six times the last block's rounded width (not the rounded 6x)
        head={"out_channels": 6 * c(table[-1][2]), "kernel": 1, "act": "hswish"},
        classifier={"hidden": c(last), "hidden_act": "hswish", "dropout": 0.2},
    )


def mobilenet_v3_large(width=1.0, num_classes=1000, resolution=224) -> ArchSpec:
    """MobileNetV3-Large as in torchvision (5,483,032 parameters)."""
    return _mobilenet_v3("mobilenet_v3_large", _MNV3_LARGE, 1280, width, num_classes, resolution)


def mobilenet_v3_small(width=1.0, num_classes=1000, resolution=224) -> ArchSpec:
    """MobileNetV3-Small as in torchvision (2,542,856 parameters)."""
    return _mobilenet_v3("mobilenet_v3_small", _MNV3_SMALL, 1024, width, num_classes, resolution)


def mnasnet(width: float = 1.0, num_classes: int = 1000, resolution: int = 224) -> ArchSpec:
    """MnasNet-B1 as in torchvision's mnasnet1_0 (4,383,312 parameters)."""
    d = lambda n: make_divisible(n * width, 8, min_value=8)  # noqa: E731
    table = [(24, 3, 2, 3, 3), (40, 5, 2, 3, 3), (80, 5, 2, 6, 3), (96, 3, 1, 6, 2),
             (192, 5, 2, 6, 4), (320, 3, 1, 6, 1)]
    stages = [_stage("ds", 1, out_channels=d(16), pw_act=False)]
    stages += [_stage("mbconv", n, out_channels=d(o), kernel=k, stride=s, expand=float(e))
               for o, k, s, e, n in table]
    return _spec(
        f"mnasnet@{width:g}", num_classes=num_classes, resolution=resolution,
        stem={"out_channels": d(32), "stride": 2}, stages=stages,
        head={"out_channels": 1280, "kernel": 1}, classifier={"dropout": 0.2},
    )


def efficientnet_b0(width: float = 1.0, num_classes: int = 1000, resolution: int = 224) -> ArchSpec:
    """EfficientNet-B0 as in torchvision (5,288,548 parameters)."""
    c = lambda n: make_divisible(n * width, 8)  # noqa: E731
    table = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
    se = {"ratio": 0.25, "base": "in", "divisor": 1, "act": "swish", "gate": "sigmoid"}
    stages = [_stage("mbconv", n, out_channels=c(o), kernel=k, stride=s, expand=float(e),
                     act="swish", se=se) for e, k, s, o, n in table]
    return _spec(
        f"efficientnet_b0@{width:g}", num_classes=num_classes, resolution=resolution,
        stem={"out_channels": c(32), "stride": 2, "act": "swish"}, stages=stages,
        # torchvision: four times the last block's rounded width (1280 at width 1.0)
        head={"out_channels": 4 * c(table[-1][3]), "kernel": 1, "act": "swish"},
        classifier={"dropout": 0.2},
    )


def shufflenet_v1(width: float = 1.0, num_classes: int = 1000, resolution: int = 224,
                  groups: int = 3) -> ArchSpec:
    """ShuffleNet V1 (Zhang et al. 2018), g=3 by default, as in Megvii's reference code:
    grouped 1x1 + channel shuffle, first 1x1 of the first unit not grouped, no bias in the
    classifier."""
    widths = {1: 144, 2: 200, 3: 240, 4: 272, 8: 384}
    if groups not in widths:
        raise ValueError(f"ShuffleNet V1 groups must be one of {sorted(widths)}")
    base = widths[groups]
    outs = [make_divisible(base * m * width, 4 * groups) for m in (1, 2, 4)]
    # 24 (divisible by every allowed group count, as the stride-2 concat needs) up to
    # 1.5x as in the reference code; wider: a multiple of both 8 and groups.
    stem = 24 if width <= 1.5 else make_divisible(24 * width, math.lcm(8, groups))
    if stem >= outs[0]:  # very narrow: keep the first unit's branch (out - in) non-empty
        stem = outs[0] // 2
    stages = []
    for i, (out, n) in enumerate(zip(outs, (4, 8, 4), strict=True)):
        mid = out // 4
        stages.append(_stage("shuffle", 1, out_channels=out, mid_channels=mid, groups=groups,
                             stride=2, first_groups=1 if i == 0 else None))
        stages.append(_stage("shuffle", n - 1, out_channels=out, mid_channels=mid, groups=groups))
    return _spec(
        f"shufflenet_v1_g{groups}@{width:g}", num_classes=num_classes, resolution=resolution,
        stem={"out_channels": stem, "stride": 2}, stem_pool=True, stages=stages,
        classifier={"bias": False},
    )


# torchvision's stage widths (stem, three stages, head) at its four published widths
_SHUFFLENET_V2 = {0.5: (24, 48, 96, 192, 1024), 1.0: (24, 116, 232, 464, 1024),
                  1.5: (24, 176, 352, 704, 1024), 2.0: (24, 244, 488, 976, 2048)}


def shufflenet_v2(width: float = 1.0, num_classes: int = 1000,
                  resolution: int = 224) -> ArchSpec:
    """ShuffleNet V2 (Ma et al. 2018) as torchvision's shufflenet_v2_x0_5 / x1_0 / x1_5 /
    x2_0 (2,278,604 parameters at x1.0); other widths scale x1.0's stage widths to a
    multiple of 4 and keep its 24-channel stem and 1024-channel head."""
    if width in _SHUFFLENET_V2:
        stem, *outs, head = _SHUFFLENET_V2[width]
    else:
        stem, head = 24, 1024
        outs = [make_divisible(c * width, 4) for c in _SHUFFLENET_V2[1.0][1:4]]
    stages = []
    for out, n in zip(outs, (4, 8, 4), strict=True):
        stages.append(_stage("shuffle_v2", 1, out_channels=out, stride=2))
        stages.append(_stage("shuffle_v2", n - 1, out_channels=out))
    return _spec(
        f"shufflenet_v2@{width:g}", num_classes=num_classes, resolution=resolution,
        stem={"out_channels": stem, "stride": 2}, stem_pool=True, stages=stages,
        head={"out_channels": head, "kernel": 1},
    )


def _resnet(name: str, depths: tuple[int, ...], width: float, num_classes: int,
            resolution: int) -> ArchSpec:
    c = lambda n: make_divisible(n * width, 8)  # noqa: E731
    stages = [_stage("basic", n, out_channels=c(o), stride=s)
              for o, n, s in zip((64, 128, 256, 512), depths, (1, 2, 2, 2), strict=True)]
    return _spec(f"{name}@{width:g}", num_classes=num_classes, resolution=resolution,
                 stem={"out_channels": c(64), "kernel": 7, "stride": 2}, stem_pool=True,
                 stages=stages)


def resnet18(width: float = 1.0, num_classes: int = 1000, resolution: int = 224) -> ArchSpec:
    """ResNet-18 as in torchvision (11,689,512 parameters): basic blocks, projection
    shortcuts where the stride or the width changes."""
    return _resnet("resnet18", (2, 2, 2, 2), width, num_classes, resolution)


def resnet34(width: float = 1.0, num_classes: int = 1000, resolution: int = 224) -> ArchSpec:
    """ResNet-34 as in torchvision (21,797,672 parameters)."""
    return _resnet("resnet34", (3, 4, 6, 3), width, num_classes, resolution)


def _resnext50(name: str, width: float, num_classes: int, resolution: int,
               se: dict[str, Any] | None = None) -> ArchSpec:
    c = lambda n: make_divisible(n * width, 32)  # noqa: E731
    stages = [
        _stage("bottleneck", n, out_channels=c(p * 4), mid_channels=c(p * 2), groups=32,
               stride=s, se=se)
        for p, n, s in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
    ]
    return _spec(f"{name}@{width:g}", num_classes=num_classes, resolution=resolution,
                 stem={"out_channels": c(64), "kernel": 7, "stride": 2}, stem_pool=True,
                 stages=stages)


def resnext50(width: float = 1.0, num_classes: int = 1000, resolution: int = 224) -> ArchSpec:
    """ResNeXt-50 32x4d as in torchvision (25,028,904 parameters)."""
    return _resnext50("resnext50_32x4d", width, num_classes, resolution)


def se_resnext50(width: float = 1.0, num_classes: int = 1000,
                 resolution: int = 224) -> ArchSpec:
    """SE-ResNeXt-50 32x4d (Hu et al. 2018): ResNeXt-50 with squeeze-and-excitation
    (reduction 16, ReLU, sigmoid) on every bottleneck's branch before the sum, as in the
    authors' model and the pretrainedmodels port (27,559,896 parameters)."""
    se = {"ratio": 1 / 16, "base": "mid", "divisor": 1, "act": "relu", "gate": "sigmoid"}
    return _resnext50("se_resnext50_32x4d", width, num_classes, resolution, se)


def xception(width: float = 1.0, num_classes: int = 1000, resolution: int = 299) -> ArchSpec:
    """Xception (Chollet 2017) as the reference model (22,855,952 parameters at 299x299):
    entry flow (two 3x3 convs, three strided blocks), middle flow (eight 728-wide blocks of
    three separable convs), exit flow (a strided block, two separable conv-norm-act). The
    two stem convs are 'same'-padded here (the reference pads neither), which changes the
    feature-map sizes and the MACs, not the parameters."""
    c = lambda n: make_divisible(n * width, 8)  # noqa: E731
    xc = lambda out, reps, stride, **kw: _stage(  # noqa: E731
        "xception", 1, out_channels=c(out), reps=reps, stride=stride, **kw)
    stages = [
        _stage("conv", 1, out_channels=c(64)),
        xc(128, 2, 2, start_act=False), xc(256, 2, 2), xc(728, 2, 2),
        {**xc(728, 3, 1), "repeats": 8},
        xc(1024, 2, 2, grow_first=False),
        _stage("sepconv", 1, out_channels=c(1536)),
        _stage("sepconv", 1, out_channels=c(2048)),
    ]
    return _spec(f"xception@{width:g}", num_classes=num_classes, resolution=resolution,
                 stem={"out_channels": c(32), "stride": 2}, stages=stages)


PRESETS: dict[str, Callable[..., ArchSpec]] = {
    "mobilenet_v1": mobilenet_v1,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_large": mobilenet_v3_large,
    "mobilenet_v3_small": mobilenet_v3_small,
    "mnasnet": mnasnet,
    "efficientnet_b0": efficientnet_b0,
    "shufflenet_v1": shufflenet_v1,
    "shufflenet_v2": shufflenet_v2,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnext50": resnext50,
    "se_resnext50": se_resnext50,
    "xception": xception,
}


def preset(name: str, width: float = 1.0, **kw: Any) -> ArchSpec:
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    if not 0.1 <= width <= 4.0:
        raise ValueError(f"width multiplier must be in [0.1, 4.0] (got {width})")
    return factory(width, **kw)
