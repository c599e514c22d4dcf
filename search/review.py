"""What a reviewer sees in optuna-dashboard: a study note (target, device, space,
budgets, reference, signal, sampler), a note on every finished trial (the architecture per
stage and its figures, or one line saying why it was not measured), and artifacts (each
Pareto member's JSON spec, PyTorch code and ONNX, and the Pareto plot on the study).

Written once, when a search or a job finishes: a note is a handful of study system
attributes, so writing them per trial while the search runs would add commits to the hot
path for nothing the sampler reads.

Artifacts need a trial that is still open in Optuna's public API (``upload_artifact``
refuses finished trials), and the Pareto set is known only at the end. So an artifact's
record is written the way Optuna writes it (a ``artifacts:<id>`` system attribute holding
its metadata) through the storage's own session, and the file goes to the artifact store
with the store's own ``write``. Where that is not possible (another storage type), the
files are attached to the study instead, named by trial.
"""

from __future__ import annotations

import json
import math
import tempfile
import uuid
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from blocks.summary import markdown_table, stage_rows
from search.study import STATUS_CACHED, STATUS_MEASURED, SearchDriver, named_constraints

ARTIFACT_FORMATS = ("json", "pytorch", "onnx")


def _n(x: Any, fmt: str = ".4g") -> str:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return "-"
    return format(x, fmt)


# ---- notes ---------------------------------------------------------------------------------


def study_note(driver: SearchDriver, references: list[dict[str, Any]] | None = None) -> str:
    c = driver.config
    measured = driver.measured()
    device = measured[0].user_attrs.get("device") if measured else None
    ref_ms = next((t.user_attrs.get("reference_latency_ms") for t in measured
                   if "reference_latency_ms" in t.user_attrs), None)
    budgets = c.budgets.model_dump(exclude_none=True)
    lines = [
        f"## {driver.study.study_name}",
        "",
        f"* **target** `{c.target}`, {c.measure.device}, runtime {c.measure.runtime}, batch "
        f"{c.measure.batch}, {c.measure.dtype}, threads {c.measure.threads or 'auto'}",
        f"* **space** `{c.space.name}` ({c.space.n_configurations():.3g} configurations)",
        "* **budgets** " + (", ".join(f"{k} = {v:g}" for k, v in budgets.items()) or "none"),
        f"* **latency objective** `{c.latency_objective}`",
        f"* **reference** `{c.measure.reference}`"
        + (f", measured at {ref_ms:.3f} ms (median)" if isinstance(ref_ms, float) else ""),
        f"* **quality signal** `{c.quality.signal}` (data `{c.quality.data}`)",
        f"* **sampler** {c.sampler}, seed {c.seed}",
    ]
    if device:
        text = json.dumps(device, sort_keys=True) if not isinstance(device, str) else device
        lines += ["", "**device fingerprint**", "", f"```\n{text[:3000]}\n```"]
    refs = [r for r in references or [] if r.get("ok")]
    if refs:
        lines += ["", "| reference network | latency ms | x ref | quality |",
                  "|---|---|---|---|"]
        lines += [f"| {r['name']} | {_n(r.get('latency_ms'), '.3f')} | "
                  f"{_n(r.get('latency_ratio'), '.3f')} | {_n(r.get('quality'))} |"
                  for r in refs]
    return "\n".join(lines)


def trial_note(driver: SearchDriver, t: FrozenTrial) -> str:
    ua = t.user_attrs
    status = ua.get("status", t.state.name.lower())
    if status not in (STATUS_MEASURED, STATUS_CACHED) or "spec" not in ua:
        if status == "over_budget":
            why = f"over the {ua.get('over_budget', '')} budget by the exact cost model"
        elif status == "predicted_over_budget":
            obj = driver.config.latency_objective
            why = (f"predicted over the latency budget: {_n(ua.get(f'predicted_{obj}'))} "
                   f"[{_n(ua.get(f'predicted_{obj}_lo'))}, "
                   f"{_n(ua.get(f'predicted_{obj}_hi'))}]")
        elif status == "pruned":
            why = (f"stopped by the pruner at step {ua.get('pruned_at_step')} of "
                   f"{ua.get('planned_steps')} (quality {_n(ua.get('quality'))})")
        else:
            why = f"{ua.get('fail_reason', status)}: {ua.get('fail_message', '')}"[:500]
        return f"**{status}**: {why}; not measured."
    from blocks.spec import ArchSpec

    spec = ArchSpec.model_validate_json(ua["spec"])
    feasible = bool(ua.get("feasible"))
    flags = [f for f in ("contended", "wide", "remeasured") if ua.get(f)]
    constraints = ", ".join(f"{k} {v:+.3f}" for k, v in named_constraints(t).items())
    lines = [
        f"**{status}**, {'feasible' if feasible else 'over a budget'}"
        + (f" ({', '.join(flags)})" if flags else ""),
        "",
        markdown_table(stage_rows(spec)),
        "",
        "| figure | value |", "|---|---|",
        f"| quality ({ua.get('quality_signal', driver.config.quality.signal)}) | "
        f"{_n(ua.get('quality'))} |",
        f"| latency median / p90 | {_n(ua.get('latency_ms'), '.3f')} / "
        f"{_n(ua.get('latency_p90_ms'), '.3f')} ms (CV {_n(ua.get('latency_cv'), '.3f')}, "
        f"n {ua.get('latency_n', '-')}) |",
        f"| ratio to the reference | {_n(ua.get('latency_ratio'), '.3f')}x "
        f"(CV {_n(ua.get('latency_ratio_cv'), '.3f')}) |",
        f"| params | {_n(ua.get('params'), ',')} |",
        f"| MACs | {_n(ua.get('macs'), ',')} |",
        f"| activation memory | {_n(ua.get('activation_mb'), '.3f')} MiB |",
        f"| constraints | {constraints or 'none'} |",
        "",
        f"`{ua.get('spec_compact', spec.to_compact())}`",
    ]
    return "\n".join(lines)


def write_notes(driver: SearchDriver, references: list[dict[str, Any]] | None = None) -> int:
    """The study note and a note on every finished trial; returns the notes written."""
    from optuna_dashboard import save_note

    study = driver.study
    save_note(study, study_note(driver, references))
    n = 1
    for t in driver.trials(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        save_note(optuna.trial.Trial(study, t._trial_id), trial_note(driver, t))
        n += 1
    return n


# ---- artifacts -------------------------------------------------------------------------------


def artifact_dir_for(storage_url: str, out_dir: str | Path | None = None) -> Path | None:
    """Where a local search keeps its artifacts: ``OUT/artifacts`` (beside the SQLite
    file by default); ``fitnas dashboard`` looks there too."""
    from search.study import sqlite_path

    if out_dir is not None:
        return Path(out_dir) / "artifacts"
    path = sqlite_path(storage_url)
    return Path(path).parent / "artifacts" if path else None


def _attach(study: optuna.Study, store: Any, trial: FrozenTrial | None, path: Path) -> str:
    """Record ``path`` as an artifact of ``trial`` (or of the study) and store the file."""
    import mimetypes

    from optuna.artifacts import upload_artifact

    if trial is None:
        return upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study)
    storage = study._storage
    backend = getattr(storage, "_backend", storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        named = path.with_name(f"trial-{trial.number}-{path.name}")
        path.rename(named)
        return upload_artifact(artifact_store=store, file_path=str(named),
                               study_or_trial=study)
    from search.study import write_finished_trial_system_attrs

    artifact_id = str(uuid.uuid4())
    mimetype, encoding = mimetypes.guess_type(path.name)
    meta = {"artifact_id": artifact_id, "filename": path.name,
            "mimetype": mimetype or "application/octet-stream", "encoding": encoding}
    with path.open("rb") as fh:
        store.write(artifact_id, fh)
    write_finished_trial_system_attrs(backend, trial._trial_id,
                                      {f"artifacts:{artifact_id}": json.dumps(meta)})
    return artifact_id


def write_artifacts(driver: SearchDriver, store: Any, plot: Path | None = None) -> dict:
    """Each Pareto member's JSON spec, PyTorch code and ONNX as its trial's artifacts,
    and the Pareto plot on the study. Returns {"<trial number>": {format: artifact id}}."""
    from blocks.builder import build_model
    from blocks.export import FILE_NAMES, export

    out: dict[Any, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fitnas-artifacts-") as tmp:
        for t in driver.pareto():
            spec = driver.spec_of(t)
            model = build_model(spec)
            ids = {}
            for fmt in ARTIFACT_FORMATS:
                folder = Path(tmp) / str(t.number)
                folder.mkdir(exist_ok=True)
                path = export(spec, fmt, folder / FILE_NAMES[fmt], model=model)
                ids[fmt] = _attach(driver.study, store, t, Path(path))
            out[str(t.number)] = ids
    if plot is not None and Path(plot).is_file():
        out["study"] = {"plot": _attach(driver.study, store, None, Path(plot))}
    return out


def write_review(driver: SearchDriver, references: list[dict[str, Any]] | None,
                 artifact_dir: Path | None, plot: Path | None = None) -> dict[str, Any]:
    """Notes and artifacts for a finished search (see the module docstring)."""
    notes = write_notes(driver, references)
    artifacts: dict = {}
    if artifact_dir is not None:
        from optuna.artifacts import FileSystemArtifactStore

        artifact_dir.mkdir(parents=True, exist_ok=True)
        artifacts = write_artifacts(driver, FileSystemArtifactStore(str(artifact_dir)), plot)
    return {"notes": notes, "artifacts": artifacts,
            "artifact_dir": str(artifact_dir) if artifact_dir else None}
