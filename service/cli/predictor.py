"""``fitnas predictor show``: the state of a target's latency predictor (search/predictor.py)
in a search storage or the service's database: how many measurements it learned from,
its held-out error, its recent error on candidates predicted before being measured, and
when it last refit."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import typer

from service.cli.common import fail, print_json

app = typer.Typer(help="The per-target latency predictor.", no_args_is_help=True)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    ago = max(0.0, time.time() - ts)
    stamp = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    unit = f"{ago / 60:.0f} min" if ago < 7200 else f"{ago / 3600:.1f} h"
    return f"{stamp} ({unit} ago)"


@app.command("show")
def show(
    target: str = typer.Option(..., "--target", help="target name (as given to the search)"),
    storage: str | None = typer.Option(
        None, "--storage", help="SQLAlchemy URL of the search storage or the service's "
                                "database (default sqlite:///fitnas-out/fitnas.db)"),
    as_json: bool = typer.Option(False, "--json", help="print the state as JSON"),
) -> None:
    """How many measurements the target's predictor learned from, its held-out error,
    and when it last refit (one block per measurement setting of the target)."""
    from search.predictor import PredictorPolicy, PredictorStore
    from search.study import redact_url, sqlite_path

    url = storage or "sqlite:///fitnas-out/fitnas.db"
    path = sqlite_path(url)
    if path is not None and not Path(path).is_file():
        fail(f"no database at {path} (give --storage)")
    try:
        store = PredictorStore(url, create=False)
        states = store.states(target)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        if "no such table" in str(exc) or "does not exist" in str(exc):
            fail(f"no latency predictor in {redact_url(url)} yet")
        fail(f"cannot read {redact_url(url)}: {text[0] if text else type(exc).__name__}")
    if not states:
        fail(f"no latency predictor for target {target!r} in {redact_url(url)} (a search on "
             "it makes one once it has measured a few candidates)")
    policy = PredictorPolicy()
    out = []
    for st in states:
        on, why = policy.enabled(st)
        entry = {
            "target": st.target, "target_key": st.target_key, "settings": st.settings,
            "n": st.n, "refit_at": st.refit_at, "coverage": st.coverage,
            "heldout_error": st.heldout_error, "recent_error": st.recent_error,
            "recent_checks": len(st.recent), "screening": on, "screening_note": why,
        }
        for name, model in (("ratio", st.ratio), ("ms", st.ms)):
            if model is not None:
                entry[name] = {"within_10pct": model.within_10pct,
                               "within_5pct": model.within_5pct,
                               "median_abs_error": model.median_abs_error}
        out.append(entry)
    if as_json:
        print_json(out)
        return
    for e in out:
        s = e["settings"]
        setting = ", ".join(f"{k} {s[k]}" for k in ("device", "runtime", "threads", "batch",
                                                    "resolution", "dtype", "reference")
                            if s.get(k) is not None)
        typer.echo(f"target {e['target']} [{e['target_key'][:12]}] {setting}")
        typer.echo(f"  learned from      {e['n']} measurements")
        for name, label in (("ratio", "ratio to reference"), ("ms", "milliseconds")):
            if name in e:
                m = e[name]
                typer.echo(f"  held-out error    {label}: median {_pct(m['median_abs_error'])}, "
                           f"{_pct(m['within_10pct'])} within ±10%, "
                           f"{_pct(m['within_5pct'])} within ±5% (out of fold)")
        typer.echo(f"  recent error      {_pct(e['recent_error'])} median over "
                   f"{e['recent_checks']} candidates predicted, then measured")
        typer.echo(f"  last refit        {_when(e['refit_at'])}")
        typer.echo(f"  screening         {'on' if e['screening'] else 'off'}"
                   + ("" if e["screening"] else f" ({e['screening_note']})"))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="predictor")
