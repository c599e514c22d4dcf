"""Build recipes: a block as a tree of constructor calls, which the builder instantiates
and the PyTorch export writes out as source.

Both read the same :class:`Call`, so the exported ``build_model()`` constructs exactly the
module the builder does (same classes, arguments and state-dict keys) by construction.
Arguments are plain literals, :data:`NORM` (the network's BatchNorm factory, ``norm`` in
the exported file), :class:`Act` (an activation factory) or nested calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blocks.fields import SESpec, se_channels
from blocks.layers import ConvNormAct, SqueezeExcite, activation


class _Norm:
    def __repr__(self) -> str:
        return "norm"


NORM = _Norm()


@dataclass(frozen=True)
class Act:
    """The activation factory ``activation(name)``."""

    name: str


@dataclass(frozen=True)
class Call:
    """``cls(*args, **kwargs)``; ``cls`` is an ``nn.Module`` class."""

    cls: type
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()


def call(cls: type, *args: Any, **kwargs: Any) -> Call:
    return Call(cls, args, tuple(kwargs.items()))


def se_call(se: SESpec | None, cin: int, mid: int) -> Call | None:
    """Squeeze-and-excitation on ``mid`` channels, or ``None``."""
    if se is None:
        return None
    return call(SqueezeExcite, mid, se_channels(se, cin, mid), act_layer=Act(se.act),
                gate_layer=Act(se.gate))


def projection_call(cin: int, cout: int, stride: int, wanted: bool) -> Call | None:
    """A residual's 1x1 projection (strided, then norm) where the width or stride changes
    and ``wanted``; ``None`` (the identity) otherwise."""
    if wanted and (stride != 1 or cin != cout):
        return call(ConvNormAct, cin, cout, kernel=1, stride=stride, norm_layer=NORM,
                    act_layer=None)
    return None


def instantiate(value: Any, norm: Any) -> Any:
    """The object a recipe value stands for; ``norm`` is the BatchNorm factory."""
    if isinstance(value, Call):
        args = [instantiate(a, norm) for a in value.args]
        kwargs = {k: instantiate(v, norm) for k, v in value.kwargs}
        return value.cls(*args, **kwargs)
    if isinstance(value, Act):
        return activation(value.name)
    if value is NORM:
        return norm
    return value


def render(value: Any) -> str:
    """Python source for a recipe value (names as the exported file defines them)."""
    if isinstance(value, Call):
        parts = [render(a) for a in value.args] + [f"{k}={render(v)}" for k, v in value.kwargs]
        return f"{value.cls.__name__}({', '.join(parts)})"
    if isinstance(value, Act):
        return f"activation({value.name!r})"
    return repr(value)


def classes(value: Any) -> list[type]:
    """Every module class a recipe constructs, outermost first, each once."""
    out: list[type] = []
    if isinstance(value, Call):
        out.append(value.cls)
        for v in (*value.args, *(v for _, v in value.kwargs)):
            out += [c for c in classes(v) if c not in out]
    return list(dict.fromkeys(out))
