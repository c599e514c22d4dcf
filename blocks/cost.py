"""Exact analytic cost model: parameters, MACs and activation memory from the spec alone.

Nothing is allocated: the walk mirrors :func:`blocks.builder.build_model` layer by layer
on top of :func:`blocks.shapes.resolve`, so the figures are exact for the network the
builder makes. Conventions (docs/spec.md, "Cost model"):

* ``params`` equals ``sum(p.numel() for p in build_model(spec).parameters())``:
  convolution and linear weights and biases, BatchNorm weight and bias (running
  statistics are buffers, not parameters).
* ``macs`` counts multiply-accumulates of convolutions and linear layers only, for the
  whole batch: a convolution costs ``N * Hout * Wout * Cout * (Cin / groups) * kh * kw``,
  a linear layer ``N * in * out``. Biases, BatchNorm, activations, pooling, SE scaling,
  residual adds and channel shuffles are not counted. This equals
  ``torch.utils.flop_counter.FlopCounterMode``'s total divided by 2.
* ``activation_bytes_total`` is the sum of the sizes of every tensor produced by a
  convolution, linear or pooling layer (stem max pool, ShuffleNet average pool, Xception
  max pool, SE squeeze, global average pool), plus the input image, times batch and
  ``dtype_bytes``.
* ``activation_bytes`` is the peak working set of one sequential inference pass: every
  tensor is live from the operation that makes it to the last operation that reads it,
  BatchNorm and activations work in place (they are folded / fused in deployment), and
  the peak is the largest total of live tensors during any one operation (its inputs,
  its output, and whatever is held for later: a residual's input, the SE input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from blocks.fields import SESpec, se_channels
from blocks.kinds import KINDS
from blocks.shapes import ResolvedBlock, SpecError, feature_width, resolve
from blocks.spec import MAX_RESOLUTION, MIN_RESOLUTION, ArchSpec, ConvLayer

HW = tuple[int, int]


# ---- primitives --------------------------------------------------------------------------


class LayerCost(NamedTuple):
    """Cost of one layer. ``macs`` and ``out_hw`` are ``None`` when no input size was given."""

    params: int
    macs: int | None
    out_hw: HW | None


def _pair(value: int | tuple[int, int]) -> HW:
    if isinstance(value, tuple):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def conv_out_hw(in_hw: int | HW, kernel: int | HW = 1, stride: int | HW = 1,
                dilation: int | HW = 1, padding: int | HW | None = None) -> HW:
    """Output size of a convolution / pooling window; ``padding=None`` means the builder's
    'same' padding ``dilation * (k - 1) // 2``."""
    (h, w), (kh, kw), (sh, sw), (dh, dw) = (_pair(in_hw), _pair(kernel), _pair(stride),
                                            _pair(dilation))
    ph, pw = (dh * (kh - 1) // 2, dw * (kw - 1) // 2) if padding is None else _pair(padding)
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def conv2d_cost(cin: int, cout: int, kernel: int | HW = 3, stride: int | HW = 1,
                groups: int = 1, bias: bool = False, in_hw: int | HW | None = None,
                dilation: int | HW = 1, padding: int | HW | None = None,
                batch: int = 1) -> LayerCost:
    """Parameters and MACs of ``nn.Conv2d(cin, cout, kernel, stride, padding, dilation,
    groups, bias)`` on a ``batch x cin x H x W`` input (``in_hw = (H, W)``)."""
    if cin % groups or cout % groups:
        raise ValueError(f"groups={groups} must divide cin={cin} and cout={cout}")
    kh, kw = _pair(kernel)
    weights = cout * (cin // groups) * kh * kw
    params = weights + (cout if bias else 0)
    if in_hw is None:
        return LayerCost(params, None, None)
    oh, ow = conv_out_hw(in_hw, kernel, stride, dilation, padding)
    return LayerCost(params, batch * oh * ow * weights, (oh, ow))


def linear_cost(in_features: int, out_features: int, bias: bool = True,
                batch: int = 1) -> LayerCost:
    """Parameters and MACs of ``nn.Linear(in_features, out_features, bias)``."""
    return LayerCost(in_features * out_features + (out_features if bias else 0),
                     batch * in_features * out_features, (1, 1))


def batchnorm_params(channels: int) -> int:
    """Learnable parameters of ``nn.BatchNorm2d(channels)`` (weight and bias)."""
    return 2 * channels


# ---- report ------------------------------------------------------------------------------


class BlockCost(BaseModel):
    """One row of the breakdown: the stem, one repeat of a stage, the head or the
    classifier (global pool + linear layers)."""

    model_config = ConfigDict(frozen=True)

    name: str  # "stem", "stages[2]#1", "head", "classifier"
    kind: str  # "conv" (stem/head), a block kind, or "classifier"
    in_channels: int
    out_channels: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    stride: int
    params: int
    macs: int
    activation_bytes: int = Field(description="peak working set while this row runs")
    activation_bytes_total: int = Field(description="conv/linear/pool outputs of this row")
    output_bytes: int


class CostReport(BaseModel):
    """What :func:`estimate_cost` returns; JSON-serializable."""

    model_config = ConfigDict(frozen=True)

    params: int
    macs: int
    activation_bytes: int = Field(description="peak working set of one inference pass")
    activation_bytes_total: int
    resolution: int
    batch: int
    dtype_bytes: int
    blocks: list[BlockCost]

    @property
    def flops(self) -> int:
        """2 x MACs, the convention of FlopCounterMode and most papers' 'FLOPs'."""
        return 2 * self.macs


# ---- the walk ----------------------------------------------------------------------------


@dataclass
class _Row:
    name: str
    kind: str
    in_channels: int
    in_hw: HW
    stride: int
    params: int = 0
    macs: int = 0  # per sample
    total: int = 0  # counted output elements per sample
    out_channels: int = 0
    out_hw: HW = (0, 0)
    output: int = -1  # tensor id


@dataclass
class CostGraph:
    """Tensors (elements per sample) and operations in execution order; enough to run the
    liveness sweep for the peak working set. A block kind's ``cost`` function adds its
    layers with the methods below, in the order its module runs them."""

    sizes: list[int] = field(default_factory=list)
    shapes: list[tuple[int, int, int]] = field(default_factory=list)
    ops: list[tuple[int, tuple[int, ...], int]] = field(default_factory=list)  # row, ins, out
    rows: list[_Row] = field(default_factory=list)

    def tensor(self, c: int, hw: HW) -> int:
        self.sizes.append(c * hw[0] * hw[1])
        self.shapes.append((c, hw[0], hw[1]))
        return len(self.sizes) - 1

    def op(self, inputs: tuple[int, ...], c: int, hw: HW, counted: bool) -> int:
        t = self.tensor(c, hw)
        self.ops.append((len(self.rows) - 1, inputs, t))
        if counted:
            self.rows[-1].total += self.sizes[t]
        return t

    def ch(self, t: int) -> int:
        return self.shapes[t][0]

    def hw(self, t: int) -> HW:
        return self.shapes[t][1], self.shapes[t][2]

    # layers ---------------------------------------------------------------------------

    def conv(self, x: int, cout: int, kernel: int | HW = 1, stride: int | HW = 1,
             groups: int = 1, dilation: int = 1, bias: bool = False, norm: bool = True) -> int:
        c = conv2d_cost(self.ch(x), cout, kernel, stride, groups, bias, self.hw(x), dilation)
        row = self.rows[-1]
        row.params += c.params + (batchnorm_params(cout) if norm else 0)
        row.macs += c.macs
        return self.op((x,), cout, c.out_hw, counted=True)

    def linear(self, x: int, out_features: int, bias: bool) -> int:
        c = linear_cost(self.ch(x), out_features, bias)
        row = self.rows[-1]
        row.params += c.params
        row.macs += c.macs
        return self.op((x,), out_features, (1, 1), counted=True)

    def pool(self, x: int, kernel: int, stride: int) -> int:
        return self.op((x,), self.ch(x), conv_out_hw(self.hw(x), kernel, stride), counted=True)

    def global_pool(self, x: int) -> int:
        return self.op((x,), self.ch(x), (1, 1), counted=True)

    def merge(self, inputs: tuple[int, ...], c: int | None = None) -> int:
        """Elementwise add / multiply (c=None: shape of the first input) or concat."""
        c = self.ch(inputs[0]) if c is None else c
        return self.op(inputs, c, self.hw(inputs[0]), counted=False)

    def shortcut(self, x: int, c: int, stride: int, projection: bool) -> int:
        """A residual's other input: ``x``, or its 1x1 projection (strided, with norm) when
        ``projection`` and the width or stride changes."""
        if projection and (stride != 1 or self.ch(x) != c):
            return self.conv(x, c, 1, stride)
        return x

    def view(self, x: int, c: int) -> int:
        """The first or last ``c`` channels of ``x``, as a view: no memory of its own (``x``
        must stay an input of a later op, which keeps it live)."""
        t = self.op((x,), c, self.hw(x), counted=False)
        self.sizes[t] = 0
        return t

    def shuffle(self, x: int) -> int:
        return self.op((x,), self.ch(x), self.hw(x), counted=False)

    def se(self, x: int, se: SESpec, cin: int, mid: int) -> int:
        s = self.global_pool(x)
        s = self.conv(s, se_channels(se, cin, mid), bias=True, norm=False)
        s = self.conv(s, mid, bias=True, norm=False)
        return self.merge((x, s))


def _block(g: CostGraph, rb: ResolvedBlock, x: int) -> int:
    b = rb.block
    return KINDS[b.kind].cost(g, b, rb.in_channels, rb.out_channels, x)


def _conv_layer(g: CostGraph, layer: ConvLayer, x: int) -> int:
    return g.conv(x, layer.out_channels, layer.kernel, layer.stride)


def _graph(spec: ArchSpec, resolution: int) -> CostGraph:
    resolved = resolve(spec, resolution)
    g = CostGraph()
    x = g.tensor(spec.in_channels, (resolution, resolution))

    def row(name: str, kind: str, x: int, stride: int) -> None:
        g.rows.append(_Row(name, kind, g.ch(x), g.hw(x), stride))

    row("stem", "conv", x, spec.stem.stride * (2 if spec.stem_pool else 1))
    g.rows[-1].total += g.sizes[x]  # the input image is counted once, with the stem
    x = _conv_layer(g, spec.stem, x)
    if spec.stem_pool:
        x = g.pool(x, 3, 2)
    _close(g, x)
    for rb in resolved:
        row(rb.path, rb.block.kind, x, rb.block.stride)
        x = _block(g, rb, x)
        if (g.ch(x), g.hw(x)) != (rb.out_channels, rb.out_hw):  # the two walks must agree
            raise AssertionError(f"{rb.path}: cost walk disagrees with shapes.resolve")
        _close(g, x)
    if spec.head is not None:
        row("head", "conv", x, spec.head.stride)
        x = _conv_layer(g, spec.head, x)
        _close(g, x)
    row("classifier", "classifier", x, 1)
    x = g.global_pool(x)
    assert g.ch(x) == feature_width(spec, resolved)
    clf = spec.classifier
    if clf.hidden is not None:
        x = g.linear(x, clf.hidden, bias=True)
    x = g.linear(x, spec.num_classes, bias=clf.bias)
    _close(g, x)
    return g


def _close(g: CostGraph, x: int) -> None:
    row = g.rows[-1]
    row.out_channels, row.out_hw, row.output = g.ch(x), g.hw(x), x


def _live_peaks(g: CostGraph) -> list[int]:
    """Elements (per sample) live during each op: a tensor is live from the op that makes
    it (the input image: from the first op) through the last op that reads it (the final
    output: to the end)."""
    n = len(g.ops)
    born = [0] * len(g.sizes)
    last = [0] * len(g.sizes)
    for i, (_, ins, out) in enumerate(g.ops):
        born[out] = i
        last[out] = max(last[out], i)
        for t in ins:
            last[t] = max(last[t], i)
    last[g.ops[-1][2]] = n - 1
    diff = [0] * (n + 1)
    for t, size in enumerate(g.sizes):
        diff[born[t]] += size
        diff[last[t] + 1] -= size
    live, acc = [], 0
    for i in range(n):
        acc += diff[i]
        live.append(acc)
    return live


def estimate_cost(spec: ArchSpec, resolution: int | None = None, batch: int = 1,
                  dtype_bytes: int = 4) -> CostReport:
    """Exact parameters, MACs and activation memory of ``build_model(spec)`` on a
    ``batch x in_channels x resolution x resolution`` input, without building it.

    Raises :class:`blocks.shapes.SpecError` (naming the field) for a spec that cannot be
    built or an out-of-range resolution / batch / dtype size."""
    res = spec.resolution if resolution is None else resolution
    if not MIN_RESOLUTION <= res <= MAX_RESOLUTION:
        raise SpecError("resolution",
                        f"must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] (got {res})")
    if batch < 1:
        raise SpecError("batch", f"must be >= 1 (got {batch})")
    if dtype_bytes not in (1, 2, 4, 8):
        raise SpecError("dtype_bytes", f"must be 1, 2, 4 or 8 (got {dtype_bytes})")
    g = _graph(spec, res)
    live = _live_peaks(g)
    scale = batch * dtype_bytes
    row_peak = [0] * len(g.rows)
    for (r, _, _), elems in zip(g.ops, live, strict=True):
        row_peak[r] = max(row_peak[r], elems)
    rows = [
        BlockCost(
            name=r.name, kind=r.kind, in_channels=r.in_channels, out_channels=r.out_channels,
            in_hw=r.in_hw, out_hw=r.out_hw, stride=r.stride, params=r.params,
            macs=r.macs * batch, activation_bytes=row_peak[i] * scale,
            activation_bytes_total=r.total * scale, output_bytes=g.sizes[r.output] * scale,
        )
        for i, r in enumerate(g.rows)
    ]
    return CostReport(
        params=sum(r.params for r in rows),
        macs=sum(r.macs for r in rows),
        activation_bytes=max(live) * scale,
        activation_bytes_total=sum(r.activation_bytes_total for r in rows),
        resolution=res,
        batch=batch,
        dtype_bytes=dtype_bytes,
        blocks=rows,
    )


__all__ = [
    "BlockCost",
    "CostGraph",
    "CostReport",
    "LayerCost",
    "batchnorm_params",
    "conv2d_cost",
    "conv_out_hw",
    "estimate_cost",
    "linear_cost",
]
