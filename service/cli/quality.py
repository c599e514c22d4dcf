"""``fitnas evaluate``: one architecture's quality signal (a zero-cost proxy or a short
seeded training run), in this process. See docs/quality.md."""

from __future__ import annotations

from typing import Any

import typer

from service.cli.common import fail, load_spec_or_fail, print_json

SIGNALS = ("params", "macs", "synflow", "naswot", "grad_norm", "zico", "meco", "train")


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _describe_value(signal: str, value: float, d: dict[str, Any]) -> str:
    if signal == "train":
        return (f"validation accuracy {value:.4f} (chance {d.get('chance_accuracy', 0):.3f}) "
                f"after {d.get('steps')} steps of batch {d.get('batch')}; final train loss "
                f"{d.get('train_loss', float('nan')):.3f}")
    if signal == "synflow":
        return f"log synflow {value:.4f}"
    if signal == "naswot":
        return f"NASWOT log|K| {value:.4f} over a minibatch of {d.get('batch')}"
    return f"grad_norm {value:.4f} over a minibatch of {d.get('batch')}"


def evaluate(
    spec_arg: str = typer.Argument(..., metavar="SPEC",
                                   help="preset:NAME[@WIDTH], a compact string, inline JSON "
                                        "or a JSON file"),
    signal: str = typer.Option(..., "--signal", "-s",
                               help="synflow, naswot, grad_norm or train"),
    data: str = typer.Option("digits", "--data", "-d",
                             help="'digits' (built in) or a name configured in "
                                  "FITNAS_DATA_SOURCES / FITNAS_DATA_SOURCES_FILE"),
    steps: int = typer.Option(200, "--steps", help="optimizer steps for 'train'"),
    resolution: int | None = typer.Option(None, "--resolution", "-r",
                                          help="input resolution (default 32)"),
    batch: int = typer.Option(32, "--batch", "-b",
                              help="minibatch for the proxies and for training"),
    seed: int = typer.Option(0, "--seed", help="seed for initialization, minibatch, order"),
    data_sources: str | None = typer.Option(
        None, "--data-sources", metavar="FILE",
        help='JSON {"name": "/path"} of ImageFolder directories / .npz files (default: '
             "FITNAS_DATA_SOURCES_FILE and FITNAS_DATA_SOURCES, as for a worker)"),
    threads: int = typer.Option(1, "--threads", "-t",
                                help="CPU threads; values depend on the count, so keep it "
                                     "fixed to compare (default 1)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object"),
) -> None:
    """Compute a quality signal for one architecture (higher is better for every signal).

    The spec is adapted to the data first: its class count, and its input channels unless
    the data is single-channel (then repeated to the spec's channels)."""
    from pydantic import ValidationError

    if signal not in SIGNALS:
        fail(f"--signal must be one of {', '.join(SIGNALS)} (got {signal!r})")
    spec = load_spec_or_fail(spec_arg)

    from search.evaluators.types import QualitySettings

    try:
        settings = QualitySettings(signal=signal, data=data, steps=steps, batch=batch,
                                   resolution=resolution, seed=seed, threads=threads)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        fail(f"--{where.replace('_', '-')}: {first['msg']}")
    from search.evaluators.datasets import DataError, resolve_source
    from service.worker.config import WorkerError, load_data_sources

    try:  # configuration errors first, before the heavy imports
        sources = load_data_sources(data_sources)  # the same reader a worker uses
        resolve_source(data, sources)
    except (DataError, WorkerError) as exc:
        fail(str(exc))

    from blocks.shapes import SpecError
    from search.evaluators.proxies import ProxyError
    from search.evaluators.quality import QualityError, evaluate_quality

    try:
        result = evaluate_quality(spec, settings, sources)
    except DataError as exc:
        fail(str(exc))
    except (QualityError, ProxyError) as exc:
        fail(f"{signal}: {exc}", code=1)
    except SpecError as exc:
        fail(f"invalid spec: {exc}")
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"spec cannot be adapted to data {data!r}: "
             f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
    except (RuntimeError, MemoryError) as exc:
        lines = str(exc).strip().splitlines()
        fail(f"{signal} failed: {type(exc).__name__}: {lines[0] if lines else ''}", code=1)

    if as_json:
        out: dict[str, Any] = result.model_dump(mode="json")
        out["spec"] = {"name": spec.name, "hash": spec.hash, "compact": spec.to_compact()}
        print_json(out)
        return
    d = result.details
    name = spec.name or spec.short_hash
    channels = (f"{d['data_channels']} channel repeated to {d['in_channels']}"
                if d["data_channels"] != d["in_channels"] else f"{d['in_channels']} channel(s)")
    lines = [
        ("model", f"{name}: {_count(d['params'])} params, {_count(d.get('macs', 0))} MACs as "
                  f"evaluated ({d['num_classes']} classes, {d['resolution']}x{d['resolution']})"),
        ("data", f"{d['data']} ({d['source']}): {d['n_train']} train / {d['n_val']} validation, "
                 f"{channels}"),
        ("signal", f"{signal}: " + _describe_value(signal, result.value, d)),
        ("run", f"{result.seconds:.2f} s, {d['threads']} thread(s), seed {d['seed']}"),
    ]
    for note in d.get("data_notes", []):
        lines.append(("note", note))
    for key, text in lines:
        typer.echo(f"{key:<8}{text}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
