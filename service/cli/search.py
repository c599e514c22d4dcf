"""``fitnas search`` (the embedded local search) and ``fitnas dashboard``
(optuna-dashboard on the same storage)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from service.cli.common import fail, load_config_defaults, print_json

DEFAULT_OUT = "fitnas-out"
DEFAULT_REFERENCE = "preset:mobilenet_v2@0.5"


def _default_storage(out: str | Path) -> str:
    return f"sqlite:///{Path(out)}/fitnas.db"


def _first_error(exc) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def search(
    config_file: str | None = typer.Option(
        None, "--config", help="YAML file with any of these options (flags override it)",
        is_eager=True, callback=load_config_defaults),
    space: str = typer.Option("default", "--space",
                              help="a built-in space (default, mobilenet_v2) or a YAML/JSON "
                                   "file"),
    target: str = typer.Option("cpu", "--target",
                               help="name of the target recorded with the results"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N] (this machine)"),
    max_latency_ms: float | None = typer.Option(None, "--max-latency-ms",
                                                help="latency budget in ms (median)"),
    max_latency_ratio: float | None = typer.Option(
        None, "--max-latency-ratio",
        help="latency budget relative to the reference network, timed interleaved in the "
             "same process (robust to machine noise and drift)"),
    reference: str = typer.Option(DEFAULT_REFERENCE, "--reference",
                                  help="SPEC of the reference network"),
    max_params: int | None = typer.Option(None, "--max-params", help="parameter budget"),
    max_macs: int | None = typer.Option(None, "--max-macs",
                                        help="multiply-accumulates per image"),
    max_memory_mb: float | None = typer.Option(
        None, "--max-memory-mb", help="peak activation memory budget (MiB)"),
    trials: int = typer.Option(30, "--trials",
                               help="finished trials in the study in total (a resumed "
                                    "search does the remainder)"),
    signal: str = typer.Option(
        "params", "--signal",
        help="quality signal: params (default: no proxy ranks networks better, see the "
             "README), macs, synflow, naswot, grad_norm, zico, meco, train, none"),
    data: str = typer.Option("digits", "--data", help="data set for --signal train "
                             "(digits, shapes32, or a name your data sources define)"),
    steps: int = typer.Option(200, "--steps", help="--signal train: optimizer steps"),
    rungs: str | None = typer.Option(
        None, "--rungs", help="--signal train: steps at which the accuracy is reported and "
        "the pruner may stop a candidate, comma-separated (default: half the steps)"),
    pruner: str = typer.Option(
        "successive_halving", "--pruner",
        help="--signal train: successive_halving, hyperband, median or none"),
    reduction_factor: int = typer.Option(
        2, "--reduction-factor", help="successive halving and hyperband: the best "
        "1/FACTOR of each rung go on"),
    storage: str | None = typer.Option(
        None, "--storage", help="SQLAlchemy URL (default sqlite:///OUT/fitnas.db)"),
    study: str | None = typer.Option(
        None, "--study", help="study name (default: derived from the configuration)"),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe, nsga2 or random"),
    seed: int | None = typer.Option(0, "--seed", help="sampler seed"),
    runtime: str = typer.Option("eager", "--runtime",
                                help="eager, torchscript or onnxruntime"),
    threads: int | None = typer.Option(None, "--threads",
                                       help="CPU threads (default: free cores, at most 4)"),
    resolution: int | None = typer.Option(
        None, "--resolution", help="fix the input resolution (overrides the space's choices)"),
    batch: int = typer.Option(1, "--batch", help="batch size for latency"),
    rounds: int = typer.Option(7, "--rounds", help="timed rounds per latency measurement"),
    min_run_time: float = typer.Option(0.2, "--min-run-time",
                                       help="seconds per timed round"),
    timeout: float = typer.Option(300.0, "--timeout", help="seconds per evaluation"),
    memory_mb: int = typer.Option(4096, "--memory-mb",
                                  help="memory ceiling per evaluation (MiB)"),
    presets: str = typer.Option(
        "mobilenet_v2@0.5,mobilenet_v3_small@0.75,mnasnet@0.5", "--presets",
        help="reference networks for the plot (comma-separated NAME@WIDTH, or 'none')"),
    seed_spec: list[str] = typer.Option(
        [], "--seed-spec", metavar="SPEC",
        help="a network to try first (repeatable; preset:NAME@W, compact, JSON or a file); "
             "it must be a point of the space"),
    out: str = typer.Option(DEFAULT_OUT, "--out", help="output folder"),
    as_json: bool = typer.Option(False, "--json",
                                 help="print the Pareto set and the winner as JSON"),
) -> None:
    """Search a design space for the best CNNs under hard budgets on this machine:
    Optuna multi-objective (quality up, latency down), exact params/MACs/memory before
    anything runs, real latency in an isolated child process. Ctrl-C, then the same
    command again, resumes."""
    from pydantic import ValidationError

    from search.evaluators.types import MeasureSettings, QualitySettings
    from search.local import SearchInterrupted, exit_on_next_interrupt, run_search
    from search.space import DesignSpace, SpaceError
    from search.study import Budgets, SearchConfig, SearchError
    from service.cli.common import check_storage_or_fail, load_spec_or_fail, spec_text_or_fail

    if (max_latency_ms is None) == (max_latency_ratio is None):
        fail("give exactly one latency budget: --max-latency-ms X or --max-latency-ratio R")
    if sampler not in ("tpe", "nsga2", "random"):
        fail(f"--sampler must be tpe, nsga2 or random (got {sampler!r})")
    if pruner not in ("successive_halving", "hyperband", "median", "none"):
        fail(f"--pruner must be successive_halving, hyperband, median or none (got {pruner!r})")
    rung_list = None
    if rungs is not None and rungs.strip():
        try:
            rung_list = [int(r) for r in rungs.replace(" ", "").split(",") if r]
        except ValueError:
            fail(f"--rungs takes step counts separated by commas, e.g. 50,100 (got {rungs!r})")
    ref = reference.strip()
    if ref.lower() in ("", "none"):
        if max_latency_ratio is not None:
            fail("--max-latency-ratio needs a --reference network")
        ref = None
    else:
        ref = spec_text_or_fail(ref)
    try:
        space_obj = DesignSpace.load(space)
    except SpaceError as exc:
        fail(str(exc))
    if resolution is not None:
        if not 8 <= resolution <= 1024:
            fail(f"--resolution must be in [8, 1024] (got {resolution})")
        space_obj = space_obj.model_copy(update={"resolution": [resolution]})
    preset_list = [p.strip().removeprefix("preset:") for p in presets.split(",")
                   if p.strip() and p.strip().lower() != "none"]
    try:
        config = SearchConfig(
            space=space_obj,
            target=target,
            budgets=Budgets(
                max_latency_ms=max_latency_ms, max_latency_ratio=max_latency_ratio,
                max_params=max_params, max_macs=max_macs,
                max_activation_bytes=None if max_memory_mb is None
                else int(max_memory_mb * 2**20)),
            trials=trials,
            measure=MeasureSettings(device=device, runtime=runtime, threads=threads,
                                    batch=batch, reference=ref, rounds=rounds,
                                    min_run_time_s=min_run_time),
            quality=QualitySettings(signal=signal, data=data, steps=steps, rungs=rung_list),
            pruner=pruner,
            pruner_reduction_factor=reduction_factor,
            sampler=sampler,
            seed=seed,
            timeout_s=timeout,
            memory_mb=memory_mb,
            seed_specs=[load_spec_or_fail(s) for s in seed_spec],
        )
    except ValidationError as exc:
        fail(f"bad option {_first_error(exc)}")
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    from search.feasibility import unreachable_budgets

    impossible = unreachable_budgets(
        config.space, config.budgets.cost_limits(), resolution=config.measure.resolution,
        batch=config.measure.batch, dtype=config.measure.dtype, seed=config.seed or 0)
    if impossible:
        fail(impossible)
    storage_url = storage or _default_storage(out)
    check_storage_or_fail(storage_url, make_folder=storage is None)
    _check_device_or_fail(device)
    study_name = study or config.default_study_name()
    from rich.console import Console

    err = Console(stderr=True)
    if not as_json:
        err.print(f"study {study_name!r} in {storage_url}  (dashboard: fitnas dashboard "
                  f"--storage {storage_url})", highlight=False)
    try:
        result = run_search(config, storage_url, study_name, out, progress=True,
                            presets=preset_list, console=err)
    except SearchInterrupted as exc:
        exit_on_next_interrupt()
        typer.echo(str(exc), err=True)
        raise typer.Exit(130) from None
    except (SearchError, SpaceError) as exc:
        fail(str(exc))
    if as_json:
        print_json(result.to_json())
        return
    _print_summary(result)


def _check_device_or_fail(device: str) -> None:
    """A CUDA device that this machine does not have is an error before the first trial,
    not a search whose every trial fails."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA GPU is usable here (torch {torch.__version__}); "
             "use --device cpu or run on a machine with a GPU")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        fail(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
             "device(s)")


def _print_summary(result) -> None:
    from rich.console import Console

    from search.report import pareto_table

    # Fit a terminal; output to a file or a pipe gets the whole table.
    console = Console() if Console().is_terminal else Console(width=160)
    r = result.result
    c = r["counts"]
    winner = r["winner"]
    console.print(pareto_table(r["pareto"], winner["number"] if winner else None,
                               width=console.width))
    console.print(
        f"{c['trials']} trials: {c['measured']} measured, {c['cached']} from the cache, "
        f"{c.get('interrupted', 0)} interrupted (done again on resume), "
        f"{c.get('pruned', 0)} stopped by the pruner, "
        f"{c['over_budget']} over a params/MACs/memory budget (not measured), "
        f"{c.get('predicted_over_budget', 0)} predicted over the latency budget (not "
        f"measured), {c['failed']} failed; {c['feasible']} feasible; median "
        f"{r.get('median_candidate_s') or 0:.2f} s per candidate", highlight=False)
    refs = [x for x in r["references"] if x.get("ok")]
    if refs:
        console.print("reference networks: " + ", ".join(
            f"{x['name']} {x['latency_ms']:.3f} ms q={x.get('quality', 0):.4g}" for x in refs),
            highlight=False)
    if winner is None:
        console.print("no feasible architecture found: loosen the budgets or run more trials",
                      highlight=False)
        for line in reference_notes(r, None):
            console.print(line, highlight=False)
        console.print(f"plot: {result.plot}\nresult: {result.result_json}", highlight=False)
        raise typer.Exit(1)
    else:
        ratio = winner.get("latency_ratio")
        rtxt = f" ({ratio:.3f}x ref)" if isinstance(ratio, int | float) else ""
        console.print(f"recommended: #{winner['number']} quality {winner['quality']:.4g}, "
                      f"{winner['latency_ms']:.3f} ms{rtxt}, {winner.get('params', 0):,} "
                      "params", highlight=False)
        console.print(f"  {winner.get('spec_compact', '')}", highlight=False, soft_wrap=True)
        for fmt, path in result.exports.items():
            console.print(f"  {fmt:<12} {path}", highlight=False)
        for fmt, msg in result.export_errors.items():
            console.print(f"  {fmt:<12} export failed: {msg}", highlight=False)
        for line in reference_notes(r, winner):
            console.print(line, highlight=False)
    console.print(f"plot: {result.plot}\nresult: {result.result_json}", highlight=False)


def _meets(ref: dict, budgets: dict) -> bool:
    checks = {"max_latency_ms": "latency_ms", "max_latency_ratio": "latency_ratio",
              "max_params": "params", "max_macs": "macs"}
    for budget, key in checks.items():
        limit = budgets.get(budget)
        if limit is None:
            continue
        value = ref.get(key)
        if not isinstance(value, int | float) or value > limit:
            return False
    return not budgets.get("max_activation_bytes")  # not measured for references


def reference_notes(r: dict, winner: dict | None) -> list[str]:
    """Plain lines for each reference network that meets the budgets and has a better
    quality than the winner (or than nothing, when nothing was feasible)."""
    out = []
    budgets = r.get("budgets") or {}
    best = winner.get("quality") if winner else None
    for ref in r.get("references") or []:
        if not ref.get("ok") or not _meets(ref, budgets):
            continue
        q = ref.get("quality")
        if not isinstance(q, int | float):
            continue
        if best is None:
            out.append(f"note: the reference {ref['name']} meets the budgets (quality "
                       f"{q:.4g}); no searched network did")
        elif q > best:
            out.append(f"note: the reference {ref['name']} meets the budgets with a higher "
                       f"quality ({q:.4g}) than the recommended network ({best:.4g}): the "
                       "search did not beat it; run more trials or seed it with "
                       f"--seed-spec preset:{ref['name']}")
    return out


def dashboard(
    storage: str | None = typer.Option(
        None, "--storage", help=f"SQLAlchemy URL (default sqlite:///{DEFAULT_OUT}/fitnas.db)"),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="bind address (the dashboard has no authentication)"),
    port: int = typer.Option(8080, "--port", help="port"),
    artifact_dir: str | None = typer.Option(
        None, "--artifact-dir",
        help="artifacts to serve (default: the artifacts folder beside a SQLite storage; "
             "the service's FITNAS_ARTIFACT_DIR)"),
) -> None:
    """Open optuna-dashboard on a search storage (every trial, its constraints and cost
    figures as user attributes). It has no authentication: keep it on localhost or behind
    a proxy. The storage may also come from FITNAS_DASHBOARD_STORAGE_URL or
    FITNAS_DASHBOARD_STORAGE_URL_FILE, so that no password is on a command line."""
    from search.study import SearchError, make_storage, redact_url
    from service.cli.common import check_storage_or_fail

    url = storage or _storage_from_environment() or _default_storage(DEFAULT_OUT)
    check_storage_or_fail(url, must_exist=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: optuna-dashboard has no authentication; on {host} anyone who "
                   "can reach this port can read and change the studies (keep it on "
                   "127.0.0.1, or behind a proxy that authenticates)", err=True)
    try:
        rdb = make_storage(url)
    except SearchError as exc:
        fail(str(exc))
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    from search.review import artifact_dir_for

    artifacts = Path(artifact_dir) if artifact_dir else artifact_dir_for(url)
    store = FileSystemArtifactStore(str(artifacts)) if artifacts and artifacts.is_dir() \
        else None

    typer.echo(f"optuna-dashboard on http://{host}:{port}/ for {redact_url(url)}", err=True)
    sys.stderr.flush()
    try:
        run_server(rdb, host=host, port=port, artifact_store=store)
    except OSError as exc:
        fail(f"cannot serve on {host}:{port}: {exc}")


def _storage_from_environment() -> str | None:
    import os

    from service.secrets import read_secret_file

    if os.environ.get("FITNAS_DASHBOARD_STORAGE_URL"):
        return os.environ["FITNAS_DASHBOARD_STORAGE_URL"]
    path = os.environ.get("FITNAS_DASHBOARD_STORAGE_URL_FILE")
    if not path:
        return None
    try:
        return read_secret_file("FITNAS_DASHBOARD_STORAGE_URL_FILE", path)
    except ValueError as exc:
        fail(str(exc))


def register(app: typer.Typer) -> None:
    app.command("search")(search)
    app.command("dashboard")(dashboard)
