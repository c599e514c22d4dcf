"""Declarative design spaces and the pure sampler that turns an Optuna trial into a spec.

A design space (YAML or JSON, see docs/search.md) lists, per stage, which block kinds may
appear and the choices for each of their knobs (kernel sizes, expansion ratios, group
sizes, SE on/off and ratio, activation, dilation, width choices, depth range), plus the
global input resolution and width-multiplier choices.

:meth:`DesignSpace.sample` calls only ``trial.suggest_*``: the same parameters always give
the same spec. Parameter names are stable and conditional (``s2.kind``, ``s2.width``,
``s2.kernel``, ``s2.mbconv.expand`` ...), and every name always has the same fixed set of
choices, which is what Optuna's TPE needs. A combination that the block rules forbid is
repaired deterministically (documented in docs/search.md, "Repairs"), so sampling never
produces an invalid spec and never raises.
"""

from __future__ import annotations

import json
import math
from functools import reduce
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from blocks.kinds import KINDS
from blocks.shapes import resolve
from blocks.spec import (
    MAX_CHANNELS,
    MAX_REPEATS,
    MAX_STAGES,
    Activation,
    ArchSpec,
    make_divisible,
)

BUILTIN_SPACES = ("default", "mobilenet_v2")
# The block kinds a design space may list: those _make_block knows how to sample and repair
# (a subset of blocks.kinds.KINDS).
SEARCH_KINDS = ("conv", "factorized", "spatial_sep", "ds", "mbconv", "bottleneck", "shuffle")

GroupsChoice = int | Literal["dw"]

# Which options each block kind reads. Anything else given for a kind is ignored.
KIND_OPTIONS: dict[str, tuple[str, ...]] = {
    "conv": ("kernel", "act", "groups", "dilation", "residual"),
    "factorized": ("kernel", "act"),
    "spatial_sep": ("kernel", "act"),
    "ds": ("kernel", "act", "dilation", "se", "se_ratio"),
    "mbconv": ("kernel", "act", "expand", "dilation", "se", "se_ratio"),
    "bottleneck": ("kernel", "act", "groups", "dilation", "mid_ratio"),
    "shuffle": ("kernel", "act", "groups", "mid_ratio"),
}

# Built-in choices when neither the kind, the stage nor the space's defaults give one.
_BUILTIN: dict[str, list[Any]] = {
    "kernel": [3],
    "act": ["relu"],
    "expand": [6.0],
    "groups": [1],
    "dilation": [1],
    "se": [False],
    "se_ratio": [0.25],
    "mid_ratio": [0.25],
    "residual": [True],
}
_KIND_BUILTIN: dict[str, dict[str, list[Any]]] = {
    "shuffle": {"groups": [2], "mid_ratio": [0.25]},
    "bottleneck": {"mid_ratio": [0.25]},
}


class SpaceError(ValueError):
    """A design space that cannot be loaded or is inconsistent; one line for a person."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _nonempty_unique(values: list[Any] | None, what: str) -> list[Any] | None:
    if values is None:
        return None
    if not values:
        raise ValueError(f"{what}: give at least one choice")
    seen: list[Any] = []
    for v in values:
        if v in seen:
            raise ValueError(f"{what}: duplicate choice {v!r}")
        seen.append(v)
    return values


class Options(_Model):
    """Choice lists for block knobs. ``None`` inherits (kind -> stage -> space defaults ->
    built-in)."""

    kernel: list[int] | None = None
    act: list[Activation] | None = None
    expand: list[float] | None = None
    groups: list[GroupsChoice] | None = None
    dilation: list[int] | None = None
    se: list[bool] | None = None
    se_ratio: list[float] | None = None
    mid_ratio: list[float] | None = None
    residual: list[bool] | None = None

    @model_validator(mode="after")
    def _check(self) -> Options:
        for name in type(self).model_fields:
            if name in Options.model_fields:
                _nonempty_unique(getattr(self, name), name)
        for k in self.kernel or []:
            if not (1 <= k <= 11 and k % 2 == 1):
                raise ValueError(f"kernel: {k} is not an odd size in [1, 11]")
        for e in self.expand or []:
            if not 0.1 <= e <= 16:
                raise ValueError(f"expand: {e} is outside [0.1, 16]")
        for g in self.groups or []:
            if g != "dw" and not (isinstance(g, int) and 1 <= g <= 1024):
                raise ValueError(f"groups: {g!r} is neither 'dw' nor an integer in [1, 1024]")
        for d in self.dilation or []:
            if not 1 <= d <= 8:
                raise ValueError(f"dilation: {d} is outside [1, 8]")
        for r in self.se_ratio or []:
            if not 0 < r <= 1:
                raise ValueError(f"se_ratio: {r} is outside (0, 1]")
        for r in self.mid_ratio or []:
            if not 0 < r <= 4:
                raise ValueError(f"mid_ratio: {r} is outside (0, 4]")
        return self


class StageSpace(Options):
    """One stage: a block kind repeated ``depth`` times; the first repeat has ``stride``."""

    id: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$",
                           description="parameter prefix; default s<N> (1-based)")
    kinds: list[str] | dict[str, Options]
    stride: int = Field(1, ge=1, le=2)
    width: list[int] = Field(description="output width choices before the width multiplier")
    depth: list[int] | int = Field(1, description="[min, max] repeats, or a fixed count")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[str] | dict[str, Options]) -> list[str] | dict[str, Options]:
        names = list(v)
        if not names:
            raise ValueError("give at least one block kind")
        unknown = [k for k in names if k not in SEARCH_KINDS]
        if unknown:
            raise ValueError(f"unknown block kind {unknown[0]!r}; known: {', '.join(SEARCH_KINDS)}")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError("duplicate block kind")
        return v

    @field_validator("width")
    @classmethod
    def _width(cls, v: list[int]) -> list[int]:
        _nonempty_unique(v, "width")
        for w in v:
            if not 1 <= w <= MAX_CHANNELS:
                raise ValueError(f"width {w} is outside [1, {MAX_CHANNELS}]")
        return v

    @field_validator("depth")
    @classmethod
    def _depth(cls, v: list[int] | int) -> list[int] | int:
        lo, hi = (v, v) if isinstance(v, int) else (v[0], v[-1]) if v else (0, 0)
        if isinstance(v, list) and len(v) not in (1, 2):
            raise ValueError("depth is [min, max] or a single number")
        if not 1 <= lo <= hi <= MAX_REPEATS:
            raise ValueError(f"depth range [{lo}, {hi}] is not within [1, {MAX_REPEATS}]")
        return v

    @property
    def depth_range(self) -> tuple[int, int]:
        if isinstance(self.depth, int):
            return self.depth, self.depth
        return self.depth[0], self.depth[-1]

    def kind_names(self) -> list[str]:
        return list(self.kinds)

    def kind_options(self, kind: str) -> Options | None:
        return self.kinds.get(kind) if isinstance(self.kinds, dict) else None


class LayerSpace(_Model):
    """Stem or head (conv-norm-act)."""

    width: list[int]
    kernel: list[int] = [3]
    act: list[Activation] = ["relu"]
    scale_with_width: bool = Field(
        True, description="apply the width multiplier; MobileNetV2 keeps a 1280-wide head "
        "for multipliers below 1 (false here means max(1, multiplier))")

    @model_validator(mode="after")
    def _check(self) -> LayerSpace:
        _nonempty_unique(self.width, "width")
        _nonempty_unique(self.kernel, "kernel")
        _nonempty_unique(self.act, "act")
        for w in self.width:
            if not 1 <= w <= MAX_CHANNELS:
                raise ValueError(f"width {w} is outside [1, {MAX_CHANNELS}]")
        for k in self.kernel:
            if not (1 <= k <= 11 and k % 2 == 1):
                raise ValueError(f"kernel: {k} is not an odd size in [1, 11]")
        return self


class StemSpace(LayerSpace):
    stride: int = Field(2, ge=1, le=4)


class TrialLike(Protocol):
    """What :meth:`DesignSpace.sample` needs: an ``optuna.trial.Trial`` or ``FixedTrial``."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...

    def suggest_int(self, name: str, low: int, high: int) -> int: ...


class DesignSpace(_Model):
    """A design space. Load one with :meth:`load`; sample with :meth:`sample`."""

    version: Literal[1] = 1
    name: str = Field("custom", max_length=100)
    description: str = ""
    in_channels: int = Field(3, ge=1, le=64)
    num_classes: int = Field(1000, ge=1, le=100_000)
    resolution: list[int] = Field([224], description="input resolution choices")
    width_mult: list[float] = Field([1.0], description="global width multiplier choices")
    channel_divisor: int = Field(8, ge=1, le=64, description="widths round to a multiple")
    stem: StemSpace
    stem_pool: bool = False
    stages: list[StageSpace] = Field(min_length=1, max_length=MAX_STAGES)
    head: LayerSpace | None = None
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    defaults: Options = Options()

    @model_validator(mode="after")
    def _check(self) -> DesignSpace:
        _nonempty_unique(self.resolution, "resolution")
        _nonempty_unique(self.width_mult, "width_mult")
        for r in self.resolution:
            if not 8 <= r <= 1024:
                raise ValueError(f"resolution {r} is outside [8, 1024]")
        for m in self.width_mult:
            if not 0.05 <= m <= 4.0:
                raise ValueError(f"width_mult {m} is outside [0.05, 4]")
        ids = self.stage_ids()
        if len(set(ids)) != len(ids):
            raise ValueError("stage ids must be unique")
        widest = max(self.width_mult)
        for sid, st in zip(ids, self.stages, strict=True):
            if max(st.width) * widest > MAX_CHANNELS / 2:
                raise ValueError(f"{sid}: widest choice x widest multiplier is too large")
        return self

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path_or_name: str | Path) -> DesignSpace:
        """A built-in name (``default``, ``mobilenet_v2``) or a .yaml/.yml/.json file."""
        arg = str(path_or_name)
        if arg in BUILTIN_SPACES:
            text = resources.files("search").joinpath("spaces", f"{arg}.yaml").read_text()
            return cls.from_text(text, "yaml", where=f"built-in space {arg!r}")
        path = Path(arg)
        if not path.is_file():
            raise SpaceError(
                f"{arg!r} is neither a built-in space ({', '.join(BUILTIN_SPACES)}) nor a file"
            )
        fmt = "json" if path.suffix.lower() == ".json" else "yaml"
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise SpaceError(f"{path}: cannot read ({exc})") from exc
        return cls.from_text(text, fmt, where=str(path))

    @classmethod
    def from_text(cls, text: str, fmt: str = "yaml", where: str = "space") -> DesignSpace:
        try:
            if fmt == "json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SpaceError(f"{where}: not valid {fmt.upper()} ({first})") from exc
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data: Any, where: str = "space") -> DesignSpace:
        if not isinstance(data, dict):
            raise SpaceError(f"{where}: a design space is a mapping (got {type(data).__name__})")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "space"
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            msg = err["msg"].removeprefix("Value error, ")
            raise SpaceError(f"{where}: {loc}: {msg}{more}") from exc

    # ---- names and choices -----------------------------------------------------------------

    def stage_ids(self) -> list[str]:
        return [st.id or f"s{i + 1}" for i, st in enumerate(self.stages)]

    def choices(self, stage: StageSpace, kind: str, option: str) -> list[Any]:
        """Effective choices of ``option`` for ``kind`` in ``stage``."""
        for source in (stage.kind_options(kind), stage, self.defaults):
            if source is not None and getattr(source, option) is not None:
                return list(getattr(source, option))
        return list(_KIND_BUILTIN.get(kind, {}).get(option, _BUILTIN[option]))

    def param_name(self, sid: str, stage: StageSpace, kind: str, option: str) -> str:
        """``<stage>.<option>`` when every kind of the stage that reads the option has the
        same choices, else ``<stage>.<kind>.<option>``: a name never changes its choices."""
        users = [k for k in stage.kind_names() if option in KIND_OPTIONS[k]]
        first = self.choices(stage, users[0], option)
        if all(self.choices(stage, k, option) == first for k in users[1:]):
            return f"{sid}.{option}"
        return f"{sid}.{kind}.{option}"

    def n_configurations(self) -> float:
        """Rough size of the space (product of choices, counting conditionals as a sum)."""
        total = float(len(self.resolution) * len(self.width_mult))
        total *= len(self.stem.width) * len(self.stem.kernel) * len(self.stem.act)
        if self.head is not None:
            total *= len(self.head.width) * len(self.head.act)
        for st in self.stages:
            lo, hi = st.depth_range
            per_kind = 0.0
            for kind in st.kind_names():
                n = 1.0
                for opt in KIND_OPTIONS[kind]:
                    if opt == "se_ratio":
                        continue
                    c = self.choices(st, kind, opt)
                    if opt == "se" and True in c:
                        n *= len(c) - 1 + len(self.choices(st, kind, "se_ratio"))
                    else:
                        n *= len(c)
                per_kind += n
            total *= per_kind * len(st.width) * (hi - lo + 1)
        return total

    # ---- sampling -----------------------------------------------------------------------

    def sample(self, trial: TrialLike) -> ArchSpec:
        """Pure: ``trial.suggest_*`` only; equal parameters give an equal spec."""
        return self._build(_Suggester(trial))

    def sample_params(self, params: dict[str, Any]) -> ArchSpec:
        """The spec for a dict of parameters (e.g. ``FrozenTrial.params``)."""
        from optuna.trial import FixedTrial

        return self.sample(FixedTrial(params))

    def locate(self, spec: ArchSpec) -> dict[str, Any]:
        """The parameters for which :meth:`sample` gives ``spec`` (equal hash), e.g. to
        enqueue a known network as a trial. Raises :class:`SpaceError` saying the first
        thing of the spec the space cannot express."""
        reasons: list[str] = []
        for field, want, have in (("in_channels", self.in_channels, spec.in_channels),
                                  ("num_classes", self.num_classes, spec.num_classes),
                                  ("stem_pool", self.stem_pool, spec.stem_pool),
                                  ("stem.stride", self.stem.stride, spec.stem.stride),
                                  ("stages", len(self.stages), len(spec.stages)),
                                  ("head", self.head is not None, spec.head is not None),
                                  ("classifier.dropout", self.dropout, spec.classifier.dropout),
                                  ("classifier.hidden", None, spec.classifier.hidden)):
            if want != have:
                raise SpaceError(f"not a point of the space {self.name!r}: {field} is "
                                 f"{have!r}, the space's is {want!r}")
        if spec.resolution not in self.resolution:
            raise SpaceError(f"not a point of the space {self.name!r}: resolution "
                             f"{spec.resolution} is not one of {self.resolution}")
        for mult in self.width_mult:
            try:
                params = self._locate_at(spec, mult)
            except SpaceError as exc:
                reasons.append(str(exc))
                continue
            suggested = _Recorder(params)
            if self.sample(suggested).hash == spec.hash:
                return suggested.used
            reasons.append("the parameters found do not rebuild the same network")
        # the most telling reason: one from a multiplier at which the stem width fits
        reasons.sort(key=lambda r: "not reachable at width multiplier" in r)
        first = reasons[0] if reasons else "no width multiplier fits"
        raise SpaceError(f"not a point of the space {self.name!r}: {first}")

    def _locate_at(self, spec: ArchSpec, mult: float) -> dict[str, Any]:
        div = self.channel_divisor

        def ch(width: int, scale: bool = True) -> int:
            m = mult if scale else max(1.0, mult)
            return min(MAX_CHANNELS, make_divisible(width * m, div) if div > 1
                       else max(1, round(width * m)))

        def pick(name: str, choices: list[Any], want: Any, what: str) -> Any:
            if want not in choices:
                raise SpaceError(f"{what} {want!r} is not one of {choices}")
            params[name] = want
            return want

        params: dict[str, Any] = {"resolution": spec.resolution, "width_mult": mult}
        widths = [w for w in self.stem.width
                  if ch(w, self.stem.scale_with_width) == spec.stem.out_channels]
        if not widths:
            raise SpaceError(f"stem width {spec.stem.out_channels} is not reachable at "
                             f"width multiplier {mult}")
        params["stem.width"] = widths[0]
        pick("stem.kernel", self.stem.kernel, spec.stem.kernel, "stem kernel")
        pick("stem.act", self.stem.act, spec.stem.act, "stem activation")
        cin = spec.stem.out_channels
        for sid, st, stage in zip(self.stage_ids(), self.stages, spec.stages, strict=True):
            block = stage.block
            kind = pick(f"{sid}.kind", st.kind_names(), block.kind, f"{sid}: block kind")
            lo, hi = st.depth_range
            if not lo <= stage.repeats <= hi:
                raise SpaceError(f"{sid}: depth {stage.repeats} is outside [{lo}, {hi}]")
            params[f"{sid}.depth"] = stage.repeats
            if block.stride != st.stride:
                raise SpaceError(f"{sid}: stride {block.stride}, the space has {st.stride}")
            found = self._locate_block(sid, st, kind, block, cin, ch)
            if found is None:
                raise SpaceError(f"{sid}: no choice of the stage's knobs gives "
                                 f"{block.kind} block {block.model_dump(exclude_defaults=True)}")
            params.update(found)
            cin = block.out_channels
        if self.head is not None and spec.head is not None:
            widths = [w for w in self.head.width
                      if ch(w, self.head.scale_with_width) == spec.head.out_channels]
            if not widths:
                raise SpaceError(f"head width {spec.head.out_channels} is not reachable")
            params["head.width"] = widths[0]
            pick("head.kernel", self.head.kernel, spec.head.kernel, "head kernel")
            pick("head.act", self.head.act, spec.head.act, "head activation")
        return params

    def _locate_block(self, sid: str, st: StageSpace, kind: str, block: Any, cin: int,
                      ch) -> dict[str, Any] | None:
        """The stage's parameters whose block (after the repairs) equals ``block``."""
        import itertools

        want = block.model_dump()
        options = KIND_OPTIONS[kind] + (("se_ratio",) if "se" in KIND_OPTIONS[kind] else ())
        lists = [self.choices(st, kind, o) for o in options]
        model = KINDS[kind].spec
        for width in st.width:
            for combo in itertools.product(*lists):
                values = dict(zip(options, combo, strict=True))
                used: dict[str, Any] = {}

                def opt(option: str, values=values, used=used) -> Any:
                    used[self.param_name(sid, st, kind, option)] = values[option]
                    return values[option]

                try:
                    made = model.model_validate(
                        _make_block(kind, opt, cin, ch(width), st.stride, self.channel_divisor))
                except ValidationError:
                    continue
                if made.model_dump() == want:
                    return {f"{sid}.width": width, **used}
        return None

    def _build(self, s: _Suggester) -> ArchSpec:
        div = self.channel_divisor
        resolution = s.cat("resolution", self.resolution)
        mult = s.cat("width_mult", self.width_mult)

        def ch(width: int, scale: bool = True) -> int:
            m = mult if scale else max(1.0, mult)
            return min(MAX_CHANNELS, make_divisible(width * m, div) if div > 1
                       else max(1, round(width * m)))

        stem_act = s.cat("stem.act", self.stem.act)
        stem = {
            "out_channels": ch(s.cat("stem.width", self.stem.width), self.stem.scale_with_width),
            "kernel": s.cat("stem.kernel", self.stem.kernel),
            "stride": self.stem.stride,
            "act": stem_act,
        }
        cin = stem["out_channels"]
        stages = []
        for sid, st in zip(self.stage_ids(), self.stages, strict=True):
            kind = s.cat(f"{sid}.kind", st.kind_names())
            lo, hi = st.depth_range
            repeats = s.int(f"{sid}.depth", lo, hi)
            width = ch(s.cat(f"{sid}.width", st.width))

            def opt(option: str, st: StageSpace = st, sid: str = sid, kind: str = kind) -> Any:
                return s.cat(self.param_name(sid, st, kind, option),
                             self.choices(st, kind, option))

            block = _make_block(kind, opt, cin, width, st.stride, div)
            stages.append({"block": block, "repeats": repeats})
            cin = block["out_channels"]
        head = None
        if self.head is not None:
            head = {
                "out_channels": ch(s.cat("head.width", self.head.width),
                                   self.head.scale_with_width),
                "kernel": s.cat("head.kernel", self.head.kernel),
                "act": s.cat("head.act", self.head.act),
            }
        spec = ArchSpec.model_validate({
            "name": f"{self.name}-candidate",
            "in_channels": self.in_channels,
            "resolution": resolution,
            "num_classes": self.num_classes,
            "stem": stem,
            "stem_pool": self.stem_pool,
            "stages": stages,
            "head": head,
            "classifier": {"dropout": self.dropout},
        })
        resolve(spec)  # the repairs make this hold; tests/test_space.py checks many seeds
        return spec


class _Suggester:
    """Wraps a trial; lists with one choice and fixed ranges are not suggested (a constant
    is not a parameter)."""

    def __init__(self, trial: TrialLike):
        self.trial = trial

    def cat(self, name: str, choices: list[Any]) -> Any:
        if len(choices) == 1:
            return choices[0]
        return self.trial.suggest_categorical(name, choices)

    def int(self, name: str, low: int, high: int) -> int:
        if low == high:
            return low
        return self.trial.suggest_int(name, low, high)


class _Recorder:
    """A fixed trial that records which parameters the sampler asked for."""

    def __init__(self, params: dict[str, Any]):
        self.params = params
        self.used: dict[str, Any] = {}

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        value = self.params[name]
        self.used[name] = value
        return value

    def suggest_int(self, name: str, low: int, high: int) -> int:
        value = int(self.params[name])
        self.used[name] = value
        return value


# ---- deterministic repairs ----------------------------------------------------------------


def _largest_divisor(requested: int, *channels: int) -> int:
    """The largest ``d <= requested`` that divides every width in ``channels``."""
    common = reduce(math.gcd, channels)
    for d in range(min(requested, common), 0, -1):
        if common % d == 0:
            return d
    return 1


def _se(ratio: float, act: str) -> dict[str, Any]:
    gate = "hsigmoid" if act == "hswish" else "sigmoid"
    return {"ratio": ratio, "base": "in", "divisor": 1, "act": "relu", "gate": gate}


def _make_block(kind: str, opt, cin: int, width: int, stride: int, div: int) -> dict[str, Any]:
    """Build the block dict for ``kind``; repair what the block rules forbid."""
    block: dict[str, Any] = {"kind": kind, "out_channels": width, "stride": stride,
                             "kernel": opt("kernel"), "act": opt("act")}
    if kind == "conv":
        groups = opt("groups")
        dilation = opt("dilation")
        residual = opt("residual")
        requested = width if groups == "dw" else int(groups)
        block["groups"] = _largest_divisor(requested, cin, width)
        block["dilation"] = dilation
        block["residual"] = bool(residual and stride == 1 and cin == width)
    elif kind == "ds":
        block["dilation"] = opt("dilation")
        if opt("se"):
            block["se"] = _se(opt("se_ratio"), block["act"])
    elif kind == "mbconv":
        block["expand"] = float(opt("expand"))
        block["dilation"] = opt("dilation")
        if opt("se"):
            block["se"] = _se(opt("se_ratio"), block["act"])
    elif kind == "bottleneck":
        groups = opt("groups")
        block["dilation"] = opt("dilation")
        mid = min(MAX_CHANNELS, make_divisible(width * opt("mid_ratio"), div) if div > 1
                  else max(1, round(width * opt("mid_ratio"))))
        requested = mid if groups == "dw" else int(groups)
        block["mid_channels"] = mid
        block["groups"] = _largest_divisor(requested, mid)
    elif kind == "shuffle":
        groups = opt("groups")
        ratio = opt("mid_ratio")
        # stride 1 adds the input: the output width must equal it. Stride 2 concatenates
        # the pooled input: the output must be wider; double the input when it is not.
        out = cin if stride == 1 else (width if width > cin else min(MAX_CHANNELS, 2 * cin))
        mid = min(MAX_CHANNELS, make_divisible(out * ratio, div) if div > 1
                  else max(1, round(out * ratio)))
        requested = mid if groups == "dw" else int(groups)
        block["out_channels"] = out
        block["mid_channels"] = mid
        # one group count for both 1x1s; it must divide the input, mid and branch widths
        block["groups"] = _largest_divisor(requested, cin, mid, out)
    return block


def spec_summary(spec: ArchSpec) -> str:
    """A short human-readable line: resolution, stem, per-stage kind x repeats and width."""
    parts = [f"r{spec.resolution}", f"stem{spec.stem.out_channels}"]
    for st in spec.stages:
        b = st.block
        parts.append(f"{b.kind}x{st.repeats}:{b.out_channels}")
    return " ".join(parts)


__all__ = [
    "BUILTIN_SPACES",
    "KIND_OPTIONS",
    "DesignSpace",
    "LayerSpace",
    "Options",
    "SpaceError",
    "StageSpace",
    "StemSpace",
    "spec_summary",
]
