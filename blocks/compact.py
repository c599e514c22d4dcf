"""Compact one-line form of an :class:`~blocks.spec.ArchSpec` with exact round-trip.

Grammar (see docs/spec.md)::

    spec   := part ("," part)*
    part   := "net" tokens | "stem:" "cn" tokens | stage | "head:" "cn" tokens | "fc" tokens
    stage  := KIND tokens                      # KIND: a prefix of blocks.kinds.KINDS
    tokens := ("_" token)*
    token  := KEY NUMBER | KEY "-" WORD        # k3 s2 e6 c24 r2 se0.25 a-hswish seg-hsigmoid

Fields equal to their default are left out, so ``ir_r2_k3_s2_e6_c24_a-relu6`` reads as
it would in timm. Every field can be written, so every spec round-trips exactly.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote

from pydantic import BaseModel, ValidationError

from blocks.errors import validation_message
from blocks.kinds import KINDS
from blocks.spec import (
    ArchSpec,
    Classifier,
    ConvLayer,
    SESpec,
)


class CompactFormatError(ValueError):
    """A compact string that does not parse; the message names the offending part."""


KIND_PREFIX = {name: kind.prefix for name, kind in KINDS.items()}
PREFIX_KIND = {v: k for k, v in KIND_PREFIX.items()}

# field name -> token key, per model. Order is the order of writing. A block kind adds
# keys for the fields only it has (BlockKind.keys); they are written after these.
_BLOCK_KEYS = {
    "repeats": "r",
    "kernel": "k",
    "stride": "s",
    "dilation": "d",
    "expand": "e",
    "mid_channels": "m",
    "groups": "g",
    "first_groups": "fg",
    "out_channels": "c",
    "act": "a",
    "pw_act": "pwa",
    "residual": "res",
    "projection": "proj",
}
_SE_KEYS = {"ratio": "se", "base": "seb", "divisor": "sed", "act": "sea", "gate": "seg"}
_LAYER_KEYS = {"kernel": "k", "stride": "s", "out_channels": "c", "act": "a"}
_NET_KEYS = {
    "schema_version": "v",
    "in_channels": "in",
    "resolution": "r",
    "num_classes": "nc",
    "norm_eps": "eps",
    "stem_pool": "pool",
    "name": "n",
}
_FC_KEYS = {"hidden": "h", "hidden_act": "a", "dropout": "drop", "bias": "bias"}

_NUMBER = re.compile(r"^[0-9][0-9.eE+-]*$")


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return repr(value)
    return "-" + quote(str(value), safe="").replace("_", "%5F")


def _tokens(model: BaseModel, keys: dict[str, str], always: tuple[str, ...] = ()) -> list[str]:
    out = []
    for field, key in keys.items():
        if field not in type(model).model_fields:
            continue
        value = getattr(model, field)
        default = type(model).model_fields[field].default
        is_default = value == default and type(value) is type(default)
        if value is None or (is_default and field not in always):
            continue
        out.append(key + _fmt_value(value))
    return out


def _block_keys(kind: str) -> dict[str, str]:
    return {**_BLOCK_KEYS, **KINDS[kind].keys}


def _block_tokens(block: BaseModel, repeats: int) -> list[str]:
    toks = []
    if repeats != 1:
        toks.append(f"r{repeats}")
    toks += _tokens(block, {k: v for k, v in _block_keys(block.kind).items() if k != "repeats"},
                    always=("out_channels",))
    se = getattr(block, "se", None)
    if se is not None:
        toks.append("se" + repr(se.ratio))
        toks += _tokens(se, {k: v for k, v in _SE_KEYS.items() if k != "ratio"})
    return toks


def block_compact(block: BaseModel, repeats: int = 1) -> str:
    """One stage's part: its kind's prefix and tokens (``ir_r2_s2_c24_a-relu6``)."""
    return "_".join([KIND_PREFIX[block.kind], *_block_tokens(block, repeats)])


def layer_compact(layer: ConvLayer) -> str:
    """A stem or head layer's part, without its ``stem:`` / ``head:`` label (``cn_s2_c32``)."""
    return "_".join(["cn", *_tokens(layer, _LAYER_KEYS, always=("out_channels",))])


def to_compact(spec: ArchSpec) -> str:
    net = ["net", *_tokens(spec, _NET_KEYS, always=("schema_version", "resolution"))]
    parts = ["_".join(net)]
    parts.append("stem:" + layer_compact(spec.stem))
    parts += [block_compact(stage.block, stage.repeats) for stage in spec.stages]
    if spec.head is not None:
        parts.append("head:" + layer_compact(spec.head))
    fc = _tokens(spec.classifier, _FC_KEYS)
    if fc:
        parts.append("_".join(["fc", *fc]))
    return ",".join(parts)


def _parse_tokens(tokens: list[str], keys: dict[str, str], where: str) -> dict[str, Any]:
    by_key = sorted(((k, f) for f, k in keys.items()), key=lambda kf: -len(kf[0]))
    out: dict[str, Any] = {}
    for tok in tokens:
        for key, field in by_key:
            if not tok.startswith(key):
                continue
            rest = tok[len(key):]
            if rest.startswith("-"):  # a word; "-" alone is the empty string
                out[field] = unquote(rest[1:])
                break
            if _NUMBER.match(rest):
                try:
                    out[field] = float(rest) if any(c in rest for c in ".eE") else int(rest)
                except ValueError:
                    continue
                break
        else:
            raise CompactFormatError(f"{where}: unknown token {tok!r}")
    return out


def _block_from(part: str, where: str) -> dict[str, Any]:
    prefix, *tokens = part.split("_")
    if prefix not in PREFIX_KIND:
        raise CompactFormatError(
            f"{where}: unknown block kind {prefix!r} (expected one of {', '.join(PREFIX_KIND)})"
        )
    kind = PREFIX_KIND[prefix]
    keys = _block_keys(kind)
    keys.update({f"se.{k}": v for k, v in _SE_KEYS.items()})
    fields = _parse_tokens(tokens, keys, where)
    se = {k[3:]: fields.pop(k) for k in list(fields) if k.startswith("se.")}
    repeats = fields.pop("repeats", 1)
    model_fields = KINDS[kind].spec.model_fields
    for name in fields:
        if name in model_fields and model_fields[name].annotation is bool:
            fields[name] = bool(fields[name])
    block: dict[str, Any] = {"kind": kind, **fields}
    if se:
        if "ratio" not in se:
            raise CompactFormatError(f"{where}: SE options given without an se<ratio> token")
        block["se"] = se
    return {"block": block, "repeats": repeats}


def _layer_from(part: str, where: str) -> dict[str, Any]:
    prefix, *tokens = part.split("_")
    if prefix != "cn":
        raise CompactFormatError(f"{where}: expected 'cn_...', got {prefix!r}")
    return _parse_tokens(tokens, _LAYER_KEYS, where)


def from_compact(text: str) -> ArchSpec:
    """Parse and validate; a ``CompactFormatError`` names the part, the field and the
    reason."""
    data, wheres = _parse(text)
    try:
        return ArchSpec.model_validate(data)
    except ValidationError as exc:
        raise CompactFormatError(_located(exc, wheres)) from exc


def compact_dict(text: str) -> dict[str, Any]:
    """The spec data a compact string stands for, not validated."""
    return _parse(text)[0]


def _parse(text: str) -> tuple[dict[str, Any], dict[str, str]]:
    text = text.strip()
    if not text.startswith("net"):
        raise CompactFormatError("compact spec must start with 'net_v1_...'")
    data: dict[str, Any] = {"stages": []}
    wheres: dict[str, str] = {}  # top-level field (or "stages.N") -> the part that set it
    for i, part in enumerate(p for p in text.split(",")):
        where = f"part {i + 1} ({part[:40]!r})"
        if not part:
            raise CompactFormatError(f"{where}: empty part")
        if i == 0:
            head, *tokens = part.split("_")
            if head != "net":
                raise CompactFormatError(f"{where}: must be 'net_...'")
            data.update(_parse_tokens(tokens, _NET_KEYS, where))
            wheres["net"] = where
        elif part.startswith("stem:"):
            data["stem"] = _layer_from(part[5:], where)
            wheres["stem"] = where
        elif part.startswith("head:"):
            data["head"] = _layer_from(part[5:], where)
            wheres["head"] = where
        elif part.split("_")[0] == "fc":
            data["classifier"] = _parse_tokens(part.split("_")[1:], _FC_KEYS, where)
            wheres["classifier"] = where
            if "bias" in data["classifier"]:
                data["classifier"]["bias"] = bool(data["classifier"]["bias"])
        else:
            wheres[f"stages.{len(data['stages'])}"] = where
            data["stages"].append(_block_from(part, where))
    if "stem" not in data:
        raise CompactFormatError("compact spec has no 'stem:cn_...' part")
    for key in ("stem_pool",):
        if key in data:
            data[key] = bool(data[key])
    return data, wheres


def _located(exc: ValidationError, wheres: dict[str, str]) -> str:
    """The first error as the JSON form reports it (field path and reason), prefixed with
    the compact part that holds the field."""
    errors = exc.errors()
    loc = errors[0]["loc"]
    key = f"{loc[0]}.{loc[1]}" if loc[:1] == ("stages",) and len(loc) > 1 else str(loc[0])
    where = wheres.get(key, wheres.get("net", "spec"))
    return f"invalid spec: {where}: {validation_message(errors, exc.error_count())}"


__all__ = ["Classifier", "CompactFormatError", "ConvLayer", "SESpec", "block_compact",
           "compact_dict", "from_compact", "layer_compact", "to_compact"]
