"""What a finished search leaves behind: the Pareto table, the Pareto plot (quality
against latency, the budget line, reference networks measured on the same device), the
recommended architecture in every export format and ``result.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from search.study import SearchConfig, SearchDriver, named_constraints


def trial_row(t: FrozenTrial, objective: str = "latency_ms") -> dict[str, Any]:
    """A JSON-able summary of one trial made by the driver. ``latency`` is the latency
    objective's value (``objective`` names it); both figures are there as well."""
    ua = t.user_attrs
    row: dict[str, Any] = {
        "number": t.number,
        "state": t.state.name,
        "status": ua.get("status"),
        "feasible": bool(SearchDriver.is_feasible(t)),
        "quality": t.values[0] if t.values else ua.get("quality"),
        "latency": t.values[1] if t.values else ua.get(objective),
        "latency_objective": objective,
        "latency_ms": ua.get("latency_ms"),
        "constraints": named_constraints(t),
    }
    for key in ("latency_p90_ms", "latency_iqr_ms", "latency_cv", "latency_n",
                "latency_ratio", "latency_ratio_cv", "reference", "reference_latency_ms",
                "params", "macs", "activation_bytes", "resolution", "quality_signal",
                "spec_hash", "spec_compact", "summary", "contended", "remeasured", "wide",
                "warm_start", "fail_reason", "fail_message", "over_budget",
                "predicted_latency_ratio", "predicted_latency_ratio_lo",
                "predicted_latency_ratio_hi", "predicted_latency_ms",
                "predicted_latency_ms_lo", "predicted_latency_ms_hi", "predictor_error",
                "predictor_audit"):
        if key in ua:
            row[key] = ua[key]
    if "spec" in ua:
        row["spec"] = json.loads(ua["spec"])
    return row


def _fmt_int(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _fmt(x: Any, digits: int = 3) -> str:
    if not isinstance(x, int | float) or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) >= 1e4 or abs(x) < 1e-3 else f"{x:.{digits}f}"


def measurement_flags(row_or_attrs: dict[str, Any]) -> str:
    """'contended' / 'wide' (spread still over max_cv after remeasuring), comma-joined."""
    flags = [name for name in ("contended", "wide") if row_or_attrs.get(name)]
    return ",".join(flags)


# Columns left out, in this order, when the terminal is narrower than the full table.
_OPTIONAL_COLUMNS = ("architecture", "p90 ms", "MACs", "act. mem")
_FULL_WIDTH = 150


def pareto_table(rows: list[dict[str, Any]], winner: int | None = None, title: str = "",
                 width: int | None = None):
    """A rich table of Pareto members, sorted by the latency objective (marked with an
    arrow in the header); the ``note`` column flags contended or too-wide measurements.
    Given the terminal's ``width``, it leaves out the columns a narrow terminal cannot
    hold instead of wrapping cells mid-number."""
    from rich.table import Table

    objective = rows[0].get("latency_objective", "latency_ms") if rows else "latency_ms"
    ms_head = "latency ms" + (" <" if objective == "latency_ms" else "")
    ratio_head = "x ref" + (" <" if objective == "latency_ratio" else "")
    table = Table(title=title or "Pareto set (feasible, non-dominated)", title_justify="left")
    for col, justify in (("#", "right"), ("quality", "right"), (ratio_head, "right"),
                         (ms_head, "right"), ("p90 ms", "right"), ("params", "right"),
                         ("MACs", "right"), ("act. mem", "right"), ("note", "left"),
                         ("architecture", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "architecture")
    for r in rows:
        mark = " *" if r["number"] == winner else ""
        mem = r.get("activation_bytes")
        table.add_row(
            f"{r['number']}{mark}", _fmt(r.get("quality"), 4), _fmt(r.get("latency_ratio")),
            _fmt(r.get("latency_ms")), _fmt(r.get("latency_p90_ms")),
            _fmt_int(r.get("params")), _fmt_int(r.get("macs")),
            f"{mem / 2**20:.2f} MiB" if isinstance(mem, int | float) else "-",
            measurement_flags(r) or "", str(r.get("summary", "")),
        )
    if width is not None:
        _fit(table, width)
    return table


def _fit(table, width: int) -> None:
    """Drop optional columns until the table's natural width fits ``width``."""
    from rich.console import Console

    def natural() -> int:
        return Console(width=10_000).measure(table).maximum

    for name in _OPTIONAL_COLUMNS:
        if natural() <= width:
            return
        index = next((i for i, c in enumerate(table.columns) if c.header == name), None)
        if index is not None:
            table.columns.pop(index)


# Signals whose value is a logarithm (the plot's y label says so).
LOG_SIGNALS = {"synflow": "log SynFlow", "naswot": "log det of the NASWOT kernel",
               "zico": "ZiCo (sum of logs)"}


def _budget_text(budgets: Any) -> str:
    parts = []
    if budgets.max_latency_ratio is not None:
        parts.append(f"<= {budgets.max_latency_ratio:g}x ref")
    if budgets.max_latency_ms is not None:
        parts.append(f"<= {budgets.max_latency_ms:g} ms")
    if budgets.max_params is not None:
        parts.append(f"<= {budgets.max_params:,} params")
    if budgets.max_macs is not None:
        parts.append(f"<= {budgets.max_macs:,} MACs")
    if budgets.max_activation_bytes is not None:
        parts.append(f"<= {budgets.max_activation_bytes / 2**20:.3g} MiB activations")
    return ", ".join(parts) or "no budget"


def plot_pareto(driver: SearchDriver, path: Path, references: list[dict[str, Any]],
                title: str = "") -> Path:
    """:func:`pareto_figure` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(driver, references, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def pareto_figure(driver: SearchDriver, references: list[dict[str, Any]], title: str = ""):
    """Quality against latency: measured trials (feasible / over a budget), the Pareto
    front, the latency budget line and reference networks; PNG via the Agg backend.
    The title names the space, target and budget, the x label the reference network.
    With ``--signal none`` (no quality) it plots parameters against latency, with the
    parameter budget as a line; with nothing measured it says why instead of drawing
    empty axes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    config = driver.config
    budgets = config.budgets
    use_ratio = config.latency_objective == "latency_ratio"
    signal = config.quality.signal
    by_params = signal == "none"

    def x_of(ua_or_row: dict[str, Any], latency: float | None = None) -> float | None:
        return ua_or_row.get("latency_ratio") if use_ratio else ua_or_row.get("latency_ms")

    def y_of(ua: dict[str, Any], value: float | None) -> float | None:
        return ua.get("params") if by_params else value

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    head = title or (f"{config.space.name} on {config.target}: {_budget_text(budgets)}")
    feas_x, feas_y, inf_x, inf_y = [], [], [], []
    for t in driver.measured():
        x = x_of(t.user_attrs)
        if x is None:
            continue
        if driver.is_feasible(t):
            feas_x.append(x)
            feas_y.append(y_of(t.user_attrs, t.values[0]))
        else:
            inf_x.append(x)
            inf_y.append(y_of(t.user_attrs, t.user_attrs["quality"]))
    ref_pts = [r for r in references if r.get("ok")]
    if not (feas_x or inf_x or ref_pts):
        counts = summary_counts(driver)
        ax.axis("off")
        ax.text(0.5, 0.5, "nothing to plot: no trial was measured\n"
                f"({counts['over_budget']} over a params/MACs/memory budget, "
                f"{counts['predicted_over_budget']} predicted over the latency budget, "
                f"{counts['failed']} failed)", ha="center", va="center", fontsize=11,
                wrap=True)
        ax.set_title(head, fontsize=10)
        return fig
    if inf_x:
        ax.scatter(inf_x, inf_y, marker="x", color="0.6", s=28, label="over a budget")
    if feas_x:
        ax.scatter(feas_x, feas_y, color="tab:blue", s=22, alpha=0.7, label="feasible")
    front = driver.pareto()
    if front and not by_params:
        fx = [x_of(t.user_attrs, t.values[1]) for t in front]
        fy = [t.values[0] for t in front]
        ax.step(fx, fy, where="post", color="tab:red", lw=1.5)
        ax.scatter(fx, fy, color="tab:red", s=40, zorder=3, label="Pareto set")
    rec = driver.recommend()
    if rec is not None:
        ax.scatter([x_of(rec.user_attrs, rec.values[1])], [y_of(rec.user_attrs, rec.values[0])],
                   s=220, facecolors="none", edgecolors="black", lw=1.5, zorder=4,
                   label=f"recommended (#{rec.number})")
    budget = budgets.max_latency_ratio if use_ratio else budgets.max_latency_ms
    if budget is not None:
        ax.axvline(budget, color="tab:green", ls="--", lw=1.2,
                   label=f"budget {budget:g}{'x ref' if use_ratio else ' ms'}")
    if budgets.max_params is not None:
        if by_params:
            ax.axhline(budgets.max_params, color="tab:purple", ls=":", lw=1.2,
                       label=f"params budget {budgets.max_params:,}")
        else:
            ax.text(0.01, 0.01, f"params budget {budgets.max_params:,} (networks over it "
                    "were never measured)", transform=ax.transAxes, fontsize=7,
                    color="tab:purple", va="bottom")
    if ref_pts:
        keep = []
        for r in ref_pts:
            x = x_of(r, r.get("latency_ms"))
            y = r.get("params") if by_params else r.get("quality")
            if x is not None and y is not None:
                keep.append((x, y, r["name"]))
        if keep:
            ax.scatter([k[0] for k in keep], [k[1] for k in keep], marker="*", s=140,
                       color="tab:orange", edgecolors="black", lw=0.5, zorder=5,
                       label="reference networks")
            for x, y, name in keep:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4),
                            fontsize=8)
    reference = config.measure.reference or "the reference"
    reference = reference if len(reference) <= 40 else "the reference network"
    ax.set_xlabel(f"latency relative to {reference} (timed interleaved)" if use_ratio
                  else "latency, median (ms)")
    if by_params:
        ax.set_ylabel("parameters (no quality signal)")
    elif signal in LOG_SIGNALS:
        ax.set_ylabel(f"quality: {LOG_SIGNALS[signal]} (a log value)")
    else:
        ax.set_ylabel(f"quality ({signal})")
    ax.set_title(head, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def export_winner(spec, out_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Every export format; a format that fails is reported, the others still written."""
    from blocks.builder import build_model
    from blocks.export import FORMATS, export, export_all

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return {k: str(v) for k, v in export_all(spec, out_dir).items()}, {}
    except Exception:  # one format failed: write the others one by one, say which
        pass
    written, errors = {}, {}
    model = build_model(spec)
    from blocks.export import FILE_NAMES

    for fmt in FORMATS:
        try:
            written[fmt] = str(export(spec, fmt, out_dir / FILE_NAMES[fmt], model=model))
        except Exception as exc:
            errors[fmt] = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return written, errors


def summary_counts(driver: SearchDriver) -> dict[str, int]:
    """Trials by what happened to them. ``over_budget``: pre-screened by the exact cost
    model; ``predicted_over_budget``: by the latency predictor; ``audited``: measured
    although the predictor would have screened them."""
    trials = driver.trials()
    counts = {"trials": sum(1 for t in trials if driver.counts_as_finished(t)),
              "measured": 0, "cached": 0, "over_budget": 0, "predicted_over_budget": 0,
              "audited": 0, "warm_start": 0, "failed": 0, "interrupted": 0, "feasible": 0,
              "running": 0}
    for t in trials:
        ua = t.user_attrs
        status = ua.get("status")
        if t.state == TrialState.RUNNING:
            counts["running"] += 1
        elif status in counts:
            counts[status] += 1
        counts["audited"] += int(bool(ua.get("predictor_audit")))
        counts["warm_start"] += int("warm_start" in ua)
        if driver.is_feasible(t):
            counts["feasible"] += 1
    return counts


def timing(driver: SearchDriver, seconds: float | None) -> dict[str, Any]:
    """Wall time, decided candidates (finished, not interrupted) and the median seconds
    per decided candidate, from each trial's start to its end (ask to tell)."""
    decided = [t for t in driver.trials() if driver.counts_as_finished(t)]
    durations = sorted(t.duration.total_seconds() for t in decided if t.duration is not None)
    median = None
    if durations:
        mid = len(durations) // 2
        median = (durations[mid] if len(durations) % 2
                  else (durations[mid - 1] + durations[mid]) / 2)
    return {"wall_s": seconds, "decided": len(decided),
            "median_candidate_s": None if median is None else round(median, 4)}


def predictor_summary(driver: SearchDriver) -> dict[str, Any]:
    """The predictor's state for this search's target and its measured-vs-predicted error
    on the candidates that were predicted before being measured."""
    from search.predictor import summarize_errors

    obj = driver.config.latency_objective
    pairs = []
    for t in driver.measured():
        ua = t.user_attrs
        if ua.get("status") == "measured" and isinstance(ua.get(f"predicted_{obj}"),
                                                          int | float):
            pairs.append((ua[f"predicted_{obj}"], ua.get(obj) or 0.0))
    out: dict[str, Any] = {"figure": obj, "measured_vs_predicted": summarize_errors(pairs)}
    st = None
    if driver.predictor is not None:
        st = driver.predictor.load(driver.predictor_key)
    if st is not None:
        on, why = driver.policy.enabled(st)
        out.update(n=st.n, refit_at=st.refit_at, heldout_error=st.heldout_error,
                   recent_error=st.recent_error, screening=on, screening_note=why)
    return out


def build_result(driver: SearchDriver, storage: str, references: list[dict[str, Any]],
                 seconds: float | None = None) -> dict[str, Any]:
    config: SearchConfig = driver.config
    front = driver.pareto()
    rec = driver.recommend()
    obj = config.latency_objective
    counts = summary_counts(driver)
    from search.study import redact_url

    return {
        "study": driver.study.study_name,
        "storage": redact_url(storage),
        "target": config.target,
        "space": config.space.name,
        "budgets": config.budgets.model_dump(exclude_none=True),
        "objectives": {"quality": "maximize", obj: "minimize"},
        "signal": config.quality.signal,
        "sampler": config.sampler,
        "seed": config.seed,
        "counts": counts,
        "seconds": seconds,
        **timing(driver, seconds),
        "measured": counts["measured"],
        "cached": counts["cached"],
        "prescreened_cost": counts["over_budget"],
        "prescreened_predictor": counts["predicted_over_budget"],
        "predictor": predictor_summary(driver),
        "pareto": [trial_row(t, obj) for t in front],
        "winner": trial_row(rec, obj) if rec is not None else None,
        "references": references,
        "config": config.model_dump(mode="json"),
    }


__all__ = ["build_result", "export_winner", "measurement_flags", "pareto_figure",
           "pareto_table", "plot_pareto", "predictor_summary", "summary_counts", "timing",
           "trial_row"]
