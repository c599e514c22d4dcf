"""Hypothesis strategies for random, valid, small architecture specs.

``arch_specs()`` draws specs that pass validation AND build (every structural rule in
:mod:`blocks.shapes` holds), covering every block kind, SE variants, groups, dilation,
stem pooling, with and without a head, and a classifier with or without a hidden layer.
They stay tiny (a few channels, resolution <= 32) so a test can build and run dozens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from blocks.spec import BLOCK_KINDS, ArchSpec

ALL_KINDS: tuple[str, ...] = tuple(BLOCK_KINDS)
ACTIVATIONS = ("relu", "relu6", "hswish", "swish", "gelu", "sigmoid", "hsigmoid", "none")


def _divisors(n: int, candidates: Sequence[int] = (1, 2, 3, 4)) -> list[int]:
    return [g for g in candidates if n % g == 0]


@st.composite
def se_specs(draw) -> dict[str, Any]:
    return {
        "ratio": draw(st.sampled_from([0.25, 0.5, 1.0])),
        "base": draw(st.sampled_from(["in", "mid"])),
        "divisor": draw(st.sampled_from([1, 1, 4, 8])),
        "act": draw(st.sampled_from(["relu", "swish", "hswish"])),
        "gate": draw(st.sampled_from(["sigmoid", "hsigmoid"])),
    }


def _maybe_se(draw) -> dict[str, Any] | None:
    return draw(st.one_of(st.none(), se_specs()))


@st.composite
def stages(draw, kind: str, cin: int, max_channels: int = 24,
           max_repeats: int = 2) -> dict[str, Any]:
    """One stage of ``kind`` whose input width is ``cin`` (valid for every repeat)."""
    repeats = draw(st.integers(1, max_repeats))
    kernel = draw(st.sampled_from([1, 3, 5]))
    stride = draw(st.sampled_from([1, 2]))
    act = draw(st.sampled_from(ACTIVATIONS))
    block: dict[str, Any] = {"kind": kind, "kernel": kernel, "stride": stride, "act": act}
    width = st.integers(2, max_channels)
    if kind == "conv":
        groups = draw(st.sampled_from(_divisors(cin)))
        cout = groups * draw(st.integers(1, max(1, max_channels // groups)))
        projection = draw(st.booleans())
        residual = (projection or (stride == 1 and cout == cin)) and draw(st.booleans())
        block.update(out_channels=cout, groups=groups, dilation=draw(st.sampled_from([1, 2])),
                     residual=residual, projection=projection)
    elif kind in ("factorized", "spatial_sep"):
        block.update(out_channels=draw(width))
    elif kind == "ds":
        cout = draw(st.one_of(st.just(cin), width))
        block.update(out_channels=cout, dilation=draw(st.sampled_from([1, 2])),
                     se=_maybe_se(draw), pw_act=draw(st.booleans()),
                     residual=draw(st.booleans()), projection=draw(st.booleans()))
    elif kind == "mbconv":
        cout = draw(st.one_of(st.just(cin), width))
        block.update(out_channels=cout, dilation=draw(st.sampled_from([1, 2])),
                     se=_maybe_se(draw), residual=draw(st.booleans()),
                     projection=draw(st.booleans()))
        if draw(st.booleans()):
            block["mid_channels"] = draw(st.integers(1, 2 * max_channels))
        else:
            block["expand"] = draw(st.sampled_from([1.0, 0.5, 2.0, 3.0, 4.0]))
    elif kind == "bottleneck":
        groups = draw(st.sampled_from([1, 2, 4]))
        mid = groups * draw(st.integers(1, max(1, max_channels // (2 * groups))))
        cout = draw(st.one_of(st.just(cin), width))
        block.update(out_channels=cout, mid_channels=mid, groups=groups,
                     dilation=draw(st.sampled_from([1, 2])), se=_maybe_se(draw))
    elif kind == "shuffle":
        groups = draw(st.sampled_from(_divisors(cin, (1, 2, 3))))
        first = draw(st.sampled_from([None, 1]))
        mid = groups * draw(st.integers(1, 4))
        if stride == 2:
            cout = cin + groups * draw(st.integers(1, max(1, max_channels // (2 * groups))))
        else:
            cout = cin
        block.update(out_channels=cout, mid_channels=mid, groups=groups, first_groups=first)
    elif kind == "basic":
        block.update(out_channels=draw(st.one_of(st.just(cin), width)))
    elif kind == "sepconv":
        block.update(out_channels=draw(width))
    elif kind == "xception":
        block.update(out_channels=draw(st.one_of(st.just(cin), width)),
                     reps=draw(st.integers(1, 3)), grow_first=draw(st.booleans()),
                     start_act=draw(st.booleans()))
    elif kind == "shuffle_v2":
        if cin % 2:
            stride = block["stride"] = 2  # stride 1 passes half the input through
        cout = cin if stride == 1 else 2 * draw(st.integers(1, max_channels // 2))
        block.update(out_channels=cout)
    else:  # pragma: no cover - a new kind must be added here
        raise ValueError(f"no strategy for block kind {kind!r}")
    return {"block": block, "repeats": repeats}


@st.composite
def arch_specs(draw, kinds: Sequence[str] | None = None, max_stages: int = 3,
               max_channels: int = 24, min_resolution: int = 8,
               max_resolution: int = 32) -> ArchSpec:
    """A random valid spec; ``kinds`` limits the block kinds drawn (default: all)."""
    kinds = tuple(kinds) if kinds is not None else ALL_KINDS
    in_channels = draw(st.integers(1, 3))
    stem_out = draw(st.sampled_from([4, 6, 8, 12]))
    data: dict[str, Any] = {
        "in_channels": in_channels,
        "resolution": draw(st.integers(min_resolution, max_resolution)),
        "num_classes": draw(st.integers(1, 10)),
        "norm_eps": draw(st.sampled_from([1e-5, 1e-3])),
        "stem": {
            "out_channels": stem_out,
            "kernel": draw(st.sampled_from([1, 3, 5])),
            "stride": draw(st.sampled_from([1, 2])),
            "act": draw(st.sampled_from(ACTIVATIONS)),
        },
        "stem_pool": draw(st.booleans()),
    }
    n_stages = draw(st.integers(1, max_stages))
    cin = stem_out
    stage_list = []
    for _ in range(n_stages):
        kind = draw(st.sampled_from(kinds))
        stage = draw(stages(kind, cin, max_channels))
        stage_list.append(stage)
        cin = stage["block"]["out_channels"]
    data["stages"] = stage_list
    if draw(st.booleans()):
        data["head"] = {
            "out_channels": draw(st.integers(2, 32)),
            "kernel": draw(st.sampled_from([1, 3])),
            "stride": draw(st.sampled_from([1, 2])),
            "act": draw(st.sampled_from(ACTIVATIONS)),
        }
    data["classifier"] = {
        "hidden": draw(st.one_of(st.none(), st.integers(2, 16))),
        "hidden_act": draw(st.sampled_from(ACTIVATIONS)),
        "dropout": draw(st.sampled_from([0.0, 0.2])),
        "bias": draw(st.booleans()),
    }
    if draw(st.booleans()):
        data["name"] = draw(st.sampled_from(["tiny", "random net", "a_b,c"]))
    return ArchSpec.model_validate(data)
