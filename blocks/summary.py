"""A spec as a person reads it: one row per stage (kind, repeats, width, kernel,
expansion or groups, squeeze-and-excitation, stride). Used by ``fitnas trials show`` and
by the trial notes in optuna-dashboard, so that both show the same table.

Generic over block kinds: a row reads the fields a kind has and leaves the others blank,
so a new kind needs nothing here.
"""

from __future__ import annotations

from typing import Any

from blocks.spec import ArchSpec

COLUMNS = ("stage", "kind", "repeats", "width", "kernel", "expand/groups", "SE", "stride")


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def _expand_or_groups(block: Any) -> str:
    parts = []
    expand = getattr(block, "expand", None)
    mid = getattr(block, "mid_channels", None)
    if mid is not None:
        parts.append(f"mid {mid}")
    elif expand is not None:
        parts.append(f"e{_fmt_num(expand)}")
    groups = getattr(block, "groups", None)
    if groups not in (None, 1):
        parts.append(f"g{groups}")
    dilation = getattr(block, "dilation", None)
    if dilation not in (None, 1):
        parts.append(f"d{dilation}")
    return " ".join(parts)


def _se(block: Any) -> str:
    se = getattr(block, "se", None)
    if se is None:
        return ""
    ratio = getattr(se, "ratio", None)
    return f"{_fmt_num(ratio)}" if ratio is not None else "yes"


def stage_rows(spec: ArchSpec) -> list[dict[str, str]]:
    """The stem, each stage and the head as rows of :data:`COLUMNS` (strings)."""
    rows = [{"stage": "stem", "kind": "conv", "repeats": "1",
             "width": str(spec.stem.out_channels), "kernel": str(spec.stem.kernel),
             "expand/groups": "", "SE": "", "stride": str(spec.stem.stride)}]
    for i, stage in enumerate(spec.stages, 1):
        b = stage.block
        rows.append({"stage": str(i), "kind": b.kind, "repeats": str(stage.repeats),
                     "width": str(b.out_channels), "kernel": str(b.kernel),
                     "expand/groups": _expand_or_groups(b), "SE": _se(b),
                     "stride": str(b.stride)})
    if spec.head is not None:
        rows.append({"stage": "head", "kind": "conv", "repeats": "1",
                     "width": str(spec.head.out_channels), "kernel": str(spec.head.kernel),
                     "expand/groups": "", "SE": "", "stride": str(spec.head.stride)})
    return rows


def markdown_table(rows: list[dict[str, str]], columns: tuple[str, ...] = COLUMNS) -> str:
    """Rows as a Markdown table (optuna-dashboard renders notes as Markdown)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r.get(c, "") or " " for c in columns) + " |" for r in rows]
    return "\n".join(lines)
