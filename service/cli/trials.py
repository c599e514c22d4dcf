"""``fitnas trials``: the trials of a search study, without a browser. ``fitnas trials``
lists them (number, status, quality, latency, ratio, params, feasible); ``fitnas trials
show N`` prints one trial's architecture per stage and its figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from service.cli.common import fail, print_json

trials_app = typer.Typer(help="List a study's trials, or show one (fitnas trials show N).",
                         no_args_is_help=False, invoke_without_command=True)

STORAGE_HELP = "SQLAlchemy URL of the search storage (default: sqlite:///OUT/fitnas.db)"


def _open(storage: str | None, out: str, study: str | None):
    import optuna

    from search.study import SearchError, make_storage
    from service.cli.common import check_storage_or_fail

    url = storage or f"sqlite:///{Path(out)}/fitnas.db"
    check_storage_or_fail(url, must_exist=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        rdb = make_storage(url)
    except SearchError as exc:
        fail(str(exc))
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(rdb))
    if not names:
        fail(f"no study in {url}")
    if study is None:
        if len(names) > 1:
            fail(f"{len(names)} studies in {url}; choose one with --study: {', '.join(names)}")
        study = names[0]
    elif study not in names:
        fail(f"no study {study!r} in {url}; studies there: {', '.join(names)}")
    return optuna.load_study(study_name=study, storage=rdb)


def _num(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def trial_row(t) -> dict[str, Any]:
    ua = t.user_attrs
    return {
        "number": t.number,
        "state": t.state.name,
        "status": ua.get("status", ""),
        "quality": ua.get("quality"),
        "latency_ms": ua.get("latency_ms"),
        "latency_ratio": ua.get("latency_ratio"),
        "params": ua.get("params"),
        "feasible": bool(ua.get("feasible", 0)),
        "contended": bool(ua.get("contended", 0)),
    }


@trials_app.callback()
def list_trials(
    ctx: typer.Context,
    storage: str | None = typer.Option(None, "--storage", help=STORAGE_HELP),
    out: str = typer.Option("fitnas-out", "--out", help="the search's output folder"),
    study: str | None = typer.Option(None, "--study", help="study name (when several)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON list instead of a table"),
) -> None:
    """List the study's trials."""
    ctx.obj = {"storage": storage, "out": out, "study": study, "json": as_json}
    if ctx.invoked_subcommand is not None:
        return
    st = _open(storage, out, study)
    rows = [trial_row(t) for t in st.get_trials(deepcopy=False)]
    if as_json:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{st.study_name}: {len(rows)} trials", title_justify="left")
    for col in ("#", "status", "quality", "latency ms", "ratio", "params", "feasible"):
        table.add_column(col, justify="left" if col == "status" else "right")
    for r in rows:
        table.add_row(str(r["number"]), r["status"] or r["state"].lower(),
                      _num(r["quality"], ".4g"), _num(r["latency_ms"], ".3f")
                      + (" *" if r["contended"] else ""),
                      _num(r["latency_ratio"], ".3f"), _num(r["params"], ","),
                      "yes" if r["feasible"] else "no")
    console = Console()
    console.print(table)
    if any(r["contended"] for r in rows):
        console.print("* measured while other work loaded the machine")


@trials_app.command("show")
def show_trial(
    ctx: typer.Context,
    number: int = typer.Argument(..., help="trial number"),
) -> None:
    """One trial: its architecture per stage and every figure recorded for it."""
    o = ctx.obj or {}
    st = _open(o.get("storage"), o.get("out", "fitnas-out"), o.get("study"))
    found = [t for t in st.get_trials(deepcopy=False) if t.number == number]
    if not found:
        fail(f"no trial {number} in {st.study_name} (it has {len(st.trials)} trials)")
    t = found[0]
    ua = t.user_attrs
    if o.get("json"):
        print_json({**trial_row(t), "user_attrs": ua})
        return
    from rich.console import Console
    from rich.table import Table

    from blocks.spec import ArchSpec
    from blocks.summary import COLUMNS, stage_rows

    console = Console()
    console.print(f"trial {t.number} of {st.study_name}: {ua.get('status') or t.state.name}",
                  highlight=False)
    if "spec" in ua:
        spec = ArchSpec.model_validate_json(ua["spec"])
        table = Table(title="architecture", title_justify="left")
        for col in COLUMNS:
            table.add_column(col, justify="left" if col in ("stage", "kind") else "right")
        for r in stage_rows(spec):
            table.add_row(*(r[c] for c in COLUMNS))
        console.print(table)
        console.print(f"compact {ua.get('spec_compact', spec.to_compact())}", soft_wrap=True,
                      highlight=False)
    figures = Table(title="figures", title_justify="left", show_header=False)
    figures.add_column("name")
    figures.add_column("value", justify="right")
    for key in ("quality", "quality_signal", "latency_ms", "latency_p90_ms", "latency_cv",
                "latency_ratio", "latency_ratio_cv", "reference", "params", "macs",
                "activation_mb", "feasible", "contended", "over_budget", "fail_reason",
                "fail_message", "eval_seconds"):
        if key in ua:
            v = ua[key]
            figures.add_row(key, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool)
                            else f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(figures)


def register(app: typer.Typer) -> None:
    app.add_typer(trials_app, name="trials")
