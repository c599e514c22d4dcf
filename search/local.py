"""The embedded search behind ``fitnas search``: ask -> evaluate in an isolated child
process -> tell, with a progress bar, Ctrl-C handling and resume.

Resume: the study lives in the storage (SQLite file by default); running the same command
again loads it, tells FAIL (reason ``interrupted``) to RUNNING trials whose process is
gone, and does the remaining trials (``config.trials`` counts finished trials of the
study in total; interrupted ones do not count).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from search.evaluators.types import EvalOutcome, EvalTask
from search.predictor import PredictorStore
from search.study import (
    REFERENCE_PRESETS,
    STATUS_PREDICTED,
    SearchConfig,
    SearchDriver,
    SQLMeasurementCache,
    process_owner,
)

# Reference networks measured on the same device with the same settings (cached), drawn
# as points on the Pareto plot. Small widths: cheap to measure, in the range of budgets.
DEFAULT_PRESETS = REFERENCE_PRESETS

Evaluator = Callable[[EvalTask], EvalOutcome]


class SearchInterrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped the search; the study is consistent and resumable."""

    def __init__(self, study_name: str, finished: int, trials: int):
        super().__init__(
            f"interrupted after {finished}/{trials} trials of study {study_name!r}; "
            "run the same command again to resume")
        self.study_name = study_name
        self.finished = finished
        self.trials = trials


@dataclass
class SearchResult:
    result: dict[str, Any]
    out_dir: Path
    result_json: Path
    plot: Path | None
    exports: dict[str, str] = field(default_factory=dict)
    export_errors: dict[str, str] = field(default_factory=dict)
    resumed: bool = False
    marked_interrupted: list[int] = field(default_factory=list)

    @property
    def pareto(self) -> list[dict[str, Any]]:
        return self.result["pareto"]

    @property
    def winner(self) -> dict[str, Any] | None:
        return self.result["winner"]

    def to_json(self) -> dict[str, Any]:
        return {
            "study": self.result["study"],
            "storage": self.result["storage"],
            "counts": self.result["counts"],
            "budgets": self.result["budgets"],
            "objectives": self.result["objectives"],
            **{k: self.result.get(k) for k in ("wall_s", "decided", "median_candidate_s",
                                               "measured", "cached", "prescreened_cost",
                                               "prescreened_predictor", "predictor")},
            "pareto": self.pareto,
            "winner": self.winner,
            "references": self.result["references"],
            "out_dir": str(self.out_dir),
            "result_json": str(self.result_json),
            "plot": str(self.plot) if self.plot else None,
            "exports": self.exports,
            "export_errors": self.export_errors,
        }


def default_evaluator(data_sources: dict[str, str] | None = None):
    """The search's evaluator for its lifetime: a warm child process (imports and the
    reference paid once, recycled every N tasks; the caller closes it)."""
    from search.evaluators.warm import WarmEvaluator

    return _LocalEvaluator(WarmEvaluator(data_sources), data_sources)


class _LocalEvaluator:
    """The warm child for every task; a one-shot child for a multi-fidelity quality task
    whose rungs go to the pruner (``on_progress``), which the warm pipe does not carry."""

    def __init__(self, warm, data_sources: dict[str, str] | None):
        self.warm = warm
        self.data_sources = data_sources

    def __call__(self, task: EvalTask, on_progress=None) -> EvalOutcome:
        if on_progress is not None and task.quality is not None \
                and task.quality.signal == "train":
            from search.evaluators.runner import evaluate

            return evaluate(task, isolated=True, data_sources=self.data_sources,
                            on_progress=on_progress)
        return self.warm(task)

    def close(self) -> None:
        self.warm.close()


def _takes_progress(evaluate: Evaluator) -> bool:
    """Whether an evaluator accepts ``on_progress`` (multi-fidelity pruning)."""
    import inspect

    try:
        return "on_progress" in inspect.signature(evaluate).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (docker stop, kill) stops the search the way Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_on_next_interrupt() -> tuple[Any, Any] | None:
    """From now on a Ctrl-C (or SIGTERM) ends the process at once with 130, instead of a
    traceback from some library's exit handler: for the time a first interrupt is being
    handled (the running trial told, the cache closed) and the command is exiting. A
    trial left RUNNING is marked interrupted on resume. Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def now(signum, frame):
        sys.stderr.write("interrupted again: exiting now (resume with the same command)\n")
        sys.stderr.flush()
        os._exit(130)

    return signal.signal(signal.SIGINT, now), signal.signal(signal.SIGTERM, now)


class _Progress:
    """A rich progress bar on stderr: trials finished / total and the best feasible."""

    def __init__(self, enabled: bool, total: int, done: int, console=None):
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console or Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[best]}"),
            console=self.console, transient=False)
        self.task = self.bar.add_task("search", total=total, completed=done, best="")

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def log(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, highlight=False, soft_wrap=True)

    def update(self, done: int, best: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, best=best)


def _latency_text(config: SearchConfig, ua: dict[str, Any]) -> str:
    """Both figures, the objective's first: '0.953x ref (6.12 ms)' or '6.12 ms (0.95x)'."""
    ms, ratio = ua.get("latency_ms"), ua.get("latency_ratio")
    ms_txt = f"{ms:.3f} ms" if isinstance(ms, int | float) else "- ms"
    if not isinstance(ratio, int | float):
        return ms_txt
    if config.latency_objective == "latency_ratio":
        return f"{ratio:.3f}x ref ({ms_txt})"
    return f"{ms_txt} ({ratio:.2f}x ref)"


def _best_text(driver: SearchDriver) -> str:
    best = driver.best_feasible()
    if best is None:
        return "best feasible: none yet"
    return (f"best feasible #{best.number}: quality {best.values[0]:.4g}, "
            f"{_latency_text(driver.config, best.user_attrs)}")


def _trial_line(driver: SearchDriver, number: int) -> str:
    from search.report import measurement_flags

    t = driver._frozen(number)
    ua = t.user_attrs
    status = ua.get("status", t.state.name.lower())
    head = f"#{number:<4} {status:<11}"
    if t.state == TrialState.COMPLETE or (
            t.state == TrialState.PRUNED and status in ("measured", "cached")):
        feas = "feasible" if driver.is_feasible(t) else "over budget"
        flags = measurement_flags(ua)
        note = f"  [{flags}]" if flags else ""
        seed = f"  (warm start: {ua['warm_start']})" if "warm_start" in ua else ""
        return (f"{head} quality {ua.get('quality', 0.0):<10.4g} "
                f"{_latency_text(driver.config, ua)}  "
                f"{ua.get('params', 0) / 1e6:.2f}M params  {feas}{note}{seed}  "
                f"{ua.get('summary', '')}")
    if t.state == TrialState.PRUNED and status == STATUS_PREDICTED:
        obj = driver.config.latency_objective
        unit = "x ref" if obj == "latency_ratio" else " ms"
        p, lo, hi = (ua.get(f"predicted_{obj}{s}") for s in ("", "_lo", "_hi"))
        return (f"{head} predicted {p:.3f}{unit} [{lo:.3f}, {hi:.3f}] over the "
                f"{ua.get('over_budget', '')} budget (not measured)  {ua.get('summary', '')}")
    if t.state == TrialState.PRUNED and status == "pruned":
        ratio = ua.get("latency_ratio")
        rtxt = f" ({ratio:.2f}x ref)" if isinstance(ratio, float) else ""
        return (f"{head} quality {ua.get('quality', 0.0):<10.4g} at step "
                f"{ua.get('pruned_at_step')} of {ua.get('planned_steps')} (pruned)  "
                f"{ua.get('latency_ms', 0.0):8.3f} ms{rtxt}  {ua.get('summary', '')}")
    if t.state == TrialState.PRUNED:
        return (f"{head} over the {ua.get('over_budget', '')} budget (not measured)  "
                f"{ua.get('params', 0) / 1e6:.2f}M params  {ua.get('summary', '')}")
    return f"{head} {ua.get('fail_reason', '')}: {ua.get('fail_message', '')}"


def measure_references(config: SearchConfig, presets: tuple[str, ...] | list[str],
                       evaluate: Evaluator, cache: SQLMeasurementCache | None,
                       log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Measure reference networks through the same runner and settings as the trials
    (cached like trials). Presets are built for the space's classes and at the measured
    resolution (``measure.resolution``, else the space's largest)."""
    from blocks.cost import estimate_cost
    from blocks.presets import preset

    resolution = config.measure.resolution or max(config.space.resolution)
    out = []
    for item in presets:
        name, _, width = item.partition("@")
        entry: dict[str, Any] = {"name": item}
        try:
            spec = preset(name, float(width) if width else 1.0,
                          num_classes=config.space.num_classes, resolution=resolution)
        except (ValueError, TypeError) as exc:
            entry.update(ok=False, failure=str(exc).splitlines()[0])
            out.append(entry)
            continue
        key = config.cache_key(spec)
        outcome = cache.get(key) if cache is not None else None
        cached = outcome is not None and outcome.ok
        if not cached:
            log(f"reference {item}: measuring at {resolution}x{resolution}")
            outcome = evaluate(config.eval_task(spec))
            if outcome.ok and cache is not None:
                cache.put(key, outcome)
        cost = estimate_cost(spec)
        entry.update(spec_hash=spec.hash, resolution=resolution, params=cost.params,
                     macs=cost.macs, cached=cached, ok=bool(outcome.ok))
        if outcome.ok and outcome.latency is not None:
            lat = outcome.latency
            entry["latency_ms"] = lat.latency_ms.median
            entry["latency_p90_ms"] = lat.latency_ms.p90
            if lat.ratio_to_reference is not None:
                entry["latency_ratio"] = lat.ratio_to_reference.median
            entry["quality"] = outcome.quality.value if outcome.quality else 0.0
        elif outcome.failure is not None:
            entry["failure"] = f"{outcome.failure.reason}: {outcome.failure.message}"
        out.append(entry)
    return out


def _latency_then_quality(driver, evaluate: Evaluator, proposal) -> EvalOutcome:
    """The service's order in this process (``SearchDriver.split_task``): the latency
    first; the training only for a candidate within every latency budget, its rungs
    going to the pruner."""
    number = proposal.trial_number
    latency_task, quality_task = driver.split_task(proposal.task)
    latency = _evaluate_safely(evaluate, latency_task)
    if quality_task is None or not driver.worth_training(latency):
        return latency
    quality = _evaluate_safely(
        evaluate, quality_task, lambda step, value: driver.report_rung(number, step, value))
    return driver.combine_outcomes(latency, quality)


def _evaluate_safely(evaluate: Evaluator, task: EvalTask,
                     on_progress: Callable[[int, float], bool] | None = None) -> EvalOutcome:
    """The runner never raises for a model's failure; should it raise anyway, the trial
    fails with the reason instead of staying RUNNING and the search goes on."""
    t0 = time.perf_counter()
    try:
        if on_progress is not None and _takes_progress(evaluate):
            return evaluate(task, on_progress=on_progress)
        return evaluate(task)
    except Exception as exc:
        from search.evaluators.types import Failure

        text = str(exc).strip().splitlines()
        message = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        return EvalOutcome(ok=False, failure=Failure(reason="crashed", message=message),
                           seconds=time.perf_counter() - t0)


def run_search(config: SearchConfig, storage: str, study_name: str, out_dir: str | Path,
               progress: bool = True, *, presets: tuple[str, ...] | list[str] = DEFAULT_PRESETS,
               evaluate: Evaluator | None = None, data_sources: dict[str, str] | None = None,
               console=None, export: bool = True) -> SearchResult:
    """Run (or resume) a local search; write the report into ``out_dir``.

    Raises :class:`SearchInterrupted` on Ctrl-C / SIGTERM after telling FAIL (reason
    ``interrupted``) to this process's running trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    owned = None
    if evaluate is None:
        evaluate = owned = default_evaluator(data_sources)
    try:
        return _run_search(config, storage, study_name, out, progress, presets, evaluate,
                           console, export, t0)
    finally:
        if owned is not None:
            owned.close()


def _run_search(config: SearchConfig, storage: str, study_name: str, out: Path,
                progress: bool, presets: tuple[str, ...] | list[str], evaluate: Evaluator,
                console, export: bool, t0: float) -> SearchResult:
    from search import report

    cache = SQLMeasurementCache(storage)
    predictor = PredictorStore(cache.engine)
    driver = SearchDriver.open(storage, study_name, config, cache, mode="local",
                               owner=process_owner(), predictor=predictor)
    resumed = any(t.state != TrialState.WAITING for t in driver.trials())  # not enqueued
    stale = driver.fail_stale(driver.stale_local_trials(), reason="interrupted",
                              message="the search process stopped before this trial finished")
    bar = _Progress(progress, config.trials, driver.n_finished(), console)
    if resumed and progress:
        bar_console = bar.console if bar.enabled else None
        if bar_console is not None:
            bar_console.print(
                f"resuming study {study_name!r}: {driver.n_finished()}/{config.trials} trials "
                f"done" + (f", {len(stale)} interrupted trial(s) marked failed" if stale else ""),
                highlight=False)

    with _sigterm_as_interrupt():
        try:
            with bar:
                bar.update(driver.n_finished(), _best_text(driver))
                while driver.n_finished() < config.trials:
                    proposal = driver.ask()
                    if proposal.task is not None:
                        driver.tell(proposal.trial_number,
                                    _latency_then_quality(driver, evaluate, proposal))
                    bar.log(_trial_line(driver, proposal.trial_number))
                    bar.update(driver.n_finished(), _best_text(driver))
                references = measure_references(config, presets, evaluate, cache, bar.log)
        except KeyboardInterrupt:
            previous = exit_on_next_interrupt()
            mine = [t.number for t in driver.trials(TrialState.RUNNING)
                    if t.user_attrs.get("owner") == driver.owner]
            with contextlib.suppress(Exception):
                driver.fail_stale(mine, reason="interrupted",
                                  message="interrupted (Ctrl-C / SIGTERM)")
            with contextlib.suppress(Exception):
                cache.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous[0])
                signal.signal(signal.SIGTERM, previous[1])
            raise SearchInterrupted(study_name, driver.n_finished(), config.trials) from None

    result = report.build_result(driver, storage, references,
                                 seconds=round(time.perf_counter() - t0, 2))
    result["counts"].setdefault("pruned", sum(
        1 for t in driver.trials(TrialState.PRUNED) if t.user_attrs.get("status") == "pruned"))
    plot = report.plot_pareto(driver, out / "pareto.png", references)
    exports: dict[str, str] = {}
    errors: dict[str, str] = {}
    rec = driver.recommend()
    if rec is not None and export:
        exports, errors = report.export_winner(driver.spec_of(rec), out / "winner")
    result["exports"] = exports
    result["export_errors"] = errors
    result["plot"] = str(plot)
    from search.review import artifact_dir_for, write_review

    try:
        result["review"] = write_review(driver, references, artifact_dir_for(storage, out)
                                        if export else None, plot)
    except Exception as exc:  # the search's own results stand without the notes
        result["review"] = {"error": (str(exc).strip().splitlines() or [repr(exc)])[0]}
    result_json = out / "result.json"
    result_json.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    cache.close()
    return SearchResult(result=result, out_dir=out, result_json=result_json, plot=plot,
                        exports=exports, export_errors=errors, resumed=resumed,
                        marked_interrupted=stale)


__all__ = ["DEFAULT_PRESETS", "SearchInterrupted", "SearchResult", "measure_references",
           "run_search"]
