"""``fitnas measure``: measure one architecture's latency with the honest protocol
(docs/measurement.md), isolated in a child process by default."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import typer

from service.cli.common import fail, load_spec_or_fail, print_json, spec_text_or_fail

DEFAULT_REFERENCE = "preset:mobilenet_v2@0.5"


def _fmt_count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _fmt_stats(s, unit: str = " ms", digits: int = 3) -> str:
    return (f"{s.median:.{digits}f}{unit}  (p90 {s.p90:.{digits}f}, IQR {s.iqr:.{digits}f}, "
            f"CV {s.cv * 100:.1f}%, n={s.n})")


def _table(spec, lat) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(width=160, highlight=False)
    d = lat.device
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model", f"{spec.name or spec.short_hash}  ({_fmt_count(lat.params)} params, "
              f"{_fmt_count(lat.macs)} MACs)")
    layout = ", channels_last" if lat.settings.channels_last else ""
    t.add_row("runtime", f"{lat.runtime} on {lat.settings.device}, {lat.settings.dtype}{layout}, "
              f"input {'x'.join(str(v) for v in d.get('input_shape', []))}")
    thr = f"{d.get('threads')}"
    if d.get("threads_requested") not in (None, d.get("threads")):
        thr += f" (asked {d['threads_requested']})"
    t.add_row("threads", f"{thr} of {d.get('logical_cores')} cores, "
              f"{lat.load.get('free_cores')} free before")
    t.add_row("latency", _fmt_stats(lat.latency_ms))
    if lat.ratio_to_reference is not None:
        t.add_row("vs reference", _fmt_stats(lat.ratio_to_reference, unit="x", digits=4))
        t.add_row("reference", f"{lat.reference}: " + _fmt_stats(lat.reference_latency_ms))
    gpu = d.get("gpu")
    t.add_row("device", f"{d.get('cpu_model')} [{d.get('cpu_capability')}]"
              + (f"; {gpu['name']} (driver {gpu.get('driver')})" if gpu else "")
              + f"; torch {d.get('torch')}"
              + (f", onnxruntime {d.get('onnxruntime')}" if lat.runtime == "onnxruntime" else ""))
    during = lat.load.get("during", {})
    status = "CONTENDED" if lat.contended else "ok"
    if during.get("other_cores") is not None:
        status += f" (other processes used {during['other_cores']:.2f} cores while timing)"
    t.add_row("load", status)
    if lat.remeasured:
        t.add_row("remeasured", f"yes ({lat.load.get('attempts')} attempts)")
    for i, note in enumerate(lat.notes):
        t.add_row("notes" if i == 0 else "", note)
    console.print(t)


def measure(
    spec_arg: str = typer.Argument(..., metavar="SPEC",
                                   help="preset:NAME or preset:NAME@WIDTH, a compact string, "
                                        "inline JSON or a JSON file"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N"),
    runtime: str = typer.Option("eager", "--runtime",
                                help="eager, torchscript or onnxruntime"),
    batch: int = typer.Option(1, "--batch", help="batch size"),
    resolution: int | None = typer.Option(None, "--resolution", "-r",
                                          help="input resolution (default: the spec's)"),
    dtype: str = typer.Option("float32", "--dtype",
                              help="float32; float16 / bfloat16 on CUDA"),
    channels_last: bool = typer.Option(False, "--channels-last", help="NHWC memory layout"),
    threads: int | None = typer.Option(None, "--threads", "-t",
                                       help="CPU threads (default: free cores, at most 4; "
                                            "never more than the free cores)"),
    reference: str = typer.Option(DEFAULT_REFERENCE, "--reference",
                                  help="SPEC of the reference timed interleaved with the "
                                       "model, or 'none'"),
    min_run_time: float = typer.Option(0.2, "--min-run-time",
                                       help="seconds per timed round"),
    rounds: int = typer.Option(7, "--rounds", help="timed rounds"),
    max_cv: float = typer.Option(0.10, "--max-cv",
                                 help="measure again when the spread is above this"),
    timeout: float = typer.Option(300.0, "--timeout", help="seconds before giving up"),
    memory_mb: int = typer.Option(4096, "--memory-mb", help="memory ceiling (MiB)"),
    in_process: bool = typer.Option(False, "--in-process",
                                    help="measure in this process (no timeout, no memory "
                                         "ceiling)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object"),
) -> None:
    """Measure a model's latency: folded BatchNorm, fixed threads, warm-up, repeated timed
    rounds interleaved with a reference; median, p90, IQR, CV, and the ratio to the
    reference."""
    from pydantic import ValidationError

    from search.evaluators.runner import evaluate
    from search.evaluators.types import EvalTask, MeasureSettings

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        fail(f"bad option device: {device!r}; expected cpu, cuda or cuda:N")
    spec = load_spec_or_fail(spec_arg)
    ref = None if reference.strip().lower() in ("none", "") else reference.strip()
    if ref is not None:
        ref = spec_text_or_fail(ref)
    try:
        settings = MeasureSettings(
            device=device, runtime=runtime, batch=batch, resolution=resolution, dtype=dtype,
            channels_last=channels_last, threads=threads, reference=ref,
            min_run_time_s=min_run_time, rounds=rounds, max_cv=max_cv,
        )
        task = EvalTask(spec=spec.canonical_dict(), measure=settings, quality=None,
                        timeout_s=timeout, memory_mb=memory_mb)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        fail(f"bad option {where}: {first['msg']}")
    outcome = evaluate(task, isolated=not in_process)
    if not outcome.ok or outcome.latency is None:
        failure = outcome.failure
        reason = failure.reason if failure else "runtime_error"
        message = failure.message if failure else "no result"
        if as_json:
            sys.stdout.write(json.dumps({"ok": False, "failure": {"reason": reason,
                                                                  "message": message}}) + "\n")
        fail(f"{reason}: {message}", code=1)
    lat = outcome.latency
    if as_json:
        data: dict[str, Any] = lat.model_dump(mode="json")
        data["spec"] = {"name": spec.name, "hash": spec.hash, "compact": spec.to_compact()}
        data["seconds"] = round(outcome.seconds, 3)
        print_json(data)
        return
    _table(spec, lat)


def register(app: typer.Typer) -> None:
    app.command("measure")(measure)
