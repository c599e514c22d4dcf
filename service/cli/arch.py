"""``fitnas arch``: list presets, show a spec's exact cost, export a spec.

SPEC, wherever a command takes one, is ``preset:NAME`` or ``preset:NAME@WIDTH``, a compact
string (``net_v1_...``), inline JSON or a path to a JSON file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from service.cli.common import fail, load_spec_or_fail, print_json

arch_app = typer.Typer(
    name="arch",
    help="Architecture specs: presets, exact cost (params, MACs, memory), exports.",
    no_args_is_help=True,
    add_completion=False,
)

FORMATS = ("json", "pytorch", "torchscript", "onnx")
FORMAT_BY_SUFFIX = {".json": "json", ".py": "pytorch", ".pt": "torchscript",
                    ".ts": "torchscript", ".onnx": "onnx"}


def _human_count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _console():
    """A rich console; a wide one when the output is not a terminal (pipes, logs)."""
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(width=200, highlight=False)


def _cost_or_fail(spec, resolution: int | None, batch: int = 1, dtype_bytes: int = 4):
    from blocks.cost import estimate_cost
    from blocks.shapes import SpecError

    try:
        return estimate_cost(spec, resolution=resolution, batch=batch, dtype_bytes=dtype_bytes)
    except SpecError as exc:
        _spec_fail(exc)


def _spec_fail(exc) -> None:
    """One line for a SpecError: a bad option names the option, a bad spec its field."""
    if exc.field in ("resolution", "batch", "dtype_bytes") and "." not in exc.field:
        fail(f"--{exc.field.replace('_', '-')}: {exc.message}")
    fail(f"invalid spec: {exc}")


def _block_label(spec, name: str) -> str:
    """The compact form of one row (``ir_k3_s2_e6_c24_a-relu6``), for people."""
    from blocks.compact import _LAYER_KEYS as layer_keys
    from blocks.compact import KIND_PREFIX, _block_tokens, _tokens

    if name in ("stem", "head"):
        layer = getattr(spec, name)
        text = "_".join(["cn", *_tokens(layer, layer_keys, always=("out_channels",))])
        return text + (" + maxpool3x3/2" if name == "stem" and spec.stem_pool else "")
    if name == "classifier":
        clf = spec.classifier
        parts = ["avgpool"]
        if clf.hidden is not None:
            parts.append(f"fc{clf.hidden}-{clf.hidden_act}")
        parts.append(f"fc{spec.num_classes}")
        return " > ".join(parts)
    stage = spec.stages[int(name[len("stages["):name.index("]")])]
    repeat = int(name.split("#")[1])
    block = stage.block if repeat == 0 else stage.block.model_copy(update={"stride": 1})
    return "_".join([KIND_PREFIX[block.kind], *_block_tokens(block, 1)])


def _show_json(spec, report) -> dict[str, Any]:
    return {
        "name": spec.name,
        "hash": spec.hash,
        "compact": spec.to_compact(),
        "resolution": report.resolution,
        "batch": report.batch,
        "dtype_bytes": report.dtype_bytes,
        "in_channels": spec.in_channels,
        "num_classes": spec.num_classes,
        "params": report.params,
        "macs": report.macs,
        "flops": report.flops,
        "activation_bytes": report.activation_bytes,
        "activation_bytes_total": report.activation_bytes_total,
        "blocks": [b.model_dump(mode="json") for b in report.blocks],
    }


@arch_app.command("presets")
def presets_cmd(
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
) -> None:
    """List the built-in presets with their parameters and MACs at 224x224."""
    from blocks.cost import estimate_cost
    from blocks.presets import PRESETS, preset

    rows = []
    for name, factory in PRESETS.items():
        spec = preset(name)
        cost = estimate_cost(spec)
        doc = (factory.__doc__ or "").strip().splitlines()
        rows.append({"name": name, "params": cost.params, "macs": cost.macs,
                     "resolution": cost.resolution,
                     "description": doc[0].rstrip(":") if doc else ""})
    if as_json:
        print_json({"presets": rows})
        return
    from rich.table import Table

    table = Table(title="fitnas presets (width 1.0, 1000 classes, 224x224)")
    table.add_column("preset")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    table.add_column("description")
    for row in rows:
        table.add_row(row["name"], f"{row['params']:,}", _human_count(row["macs"]),
                      row["description"])
    _console().print(table)
    typer.echo("Use as SPEC: preset:NAME or preset:NAME@WIDTH (e.g. preset:mobilenet_v2@0.5)")


@arch_app.command("show")
def show_cmd(
    spec_arg: str = typer.Argument(..., metavar="SPEC",
                                   help="preset:NAME[@WIDTH], a compact string, or a JSON file"),
    resolution: int | None = typer.Option(None, "--resolution", "-r",
                                          help="Input resolution (default: the spec's)."),
    batch: int = typer.Option(1, "--batch", "-b", help="Batch size for MACs and memory."),
    dtype_bytes: int = typer.Option(4, "--dtype-bytes",
                                    help="Bytes per activation element (4 = float32)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
) -> None:
    """Exact parameters, MACs and activation memory, per block and in total."""
    spec = load_spec_or_fail(spec_arg)
    report = _cost_or_fail(spec, resolution, batch, dtype_bytes)
    if as_json:
        print_json(_show_json(spec, report))
        return
    from rich.table import Table

    title = f"{spec.name or 'spec'}  [{spec.short_hash}]  input {report.batch}x" \
            f"{spec.in_channels}x{report.resolution}x{report.resolution}"
    table = Table(title=title)
    for col, justify in (("block", "left"), ("layer", "left"), ("channels", "right"),
                         ("size", "right"), ("params", "right"), ("MACs", "right"),
                         ("peak memory", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for b in report.blocks:
        size = f"{b.in_hw[0]}x{b.in_hw[1]} > {b.out_hw[0]}x{b.out_hw[1]}"
        table.add_row(b.name, _block_label(spec, b.name), f"{b.in_channels} > {b.out_channels}",
                      size, f"{b.params:,}", _human_count(b.macs),
                      _human_bytes(b.activation_bytes))
    table.add_section()
    table.add_row("total", "", "", "", f"{report.params:,}", _human_count(report.macs),
                  _human_bytes(report.activation_bytes))
    console = _console()
    console.print(table)
    console.print(
        f"params {report.params:,}  |  MACs {report.macs:,} ({_human_count(report.macs)})  |  "
        f"peak activations {_human_bytes(report.activation_bytes)}  |  "
        f"all activations {_human_bytes(report.activation_bytes_total)}",
    )
    console.print(f"hash {spec.hash}", soft_wrap=True)
    console.print(f"compact {spec.to_compact()}", soft_wrap=True)


@arch_app.command("export")
def export_cmd(
    spec_arg: str = typer.Argument(..., metavar="SPEC",
                                   help="preset:NAME[@WIDTH], a compact string, or a JSON file"),
    fmt: str = typer.Option("", "--format", "-f", help="json, pytorch, torchscript or onnx."),
    output: str = typer.Option("", "--output", "-o", help="File to write."),
    resolution: int | None = typer.Option(
        None, "--resolution", "-r",
        help="Example input resolution for torchscript/onnx (default: the spec's)."),
) -> None:
    """Write SPEC as a JSON spec, standalone PyTorch source, TorchScript or ONNX (the
    format follows the file's extension unless --format names it)."""
    if not output:
        fail("--output/-o is required: the file to write")
    if not fmt:
        fmt = FORMAT_BY_SUFFIX.get(Path(output).suffix.lower(), "")
        if not fmt:
            fail(f"cannot tell the format from {output!r}: give --format ("
                 f"{', '.join(FORMATS)}) or a file ending in "
                 f"{', '.join(sorted(FORMAT_BY_SUFFIX))}")
    if fmt not in FORMATS:
        fail(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    spec = load_spec_or_fail(spec_arg)
    from blocks.cost import estimate_cost
    from blocks.export import ExportError, export
    from blocks.shapes import SpecError

    try:
        if resolution is not None:
            estimate_cost(spec, resolution=resolution)  # checks the bounds, names the field
        path = export(spec, fmt, output, resolution=resolution)  # type: ignore[arg-type]
    except SpecError as exc:
        _spec_fail(exc)
    except ExportError as exc:
        fail(str(exc))
    typer.echo(f"wrote {fmt} export of {spec.name or spec.short_hash} to {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(arch_app, name="arch")
