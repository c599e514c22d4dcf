"""Candidates per minute of the search loop, and whether fitnas's figure is what a
deployed process sees.

Part 1, throughput: the loop of ``fitnas search --space default --target cpu --threads 1
--signal synflow --max-latency-ratio 1.0`` (ask -> evaluate -> tell, SQLite storage,
random sampler so every mode gets the same candidates in the same order), in three modes
run interleaved candidate by candidate:

- ``one_shot``: a fresh child per candidate, fixed protocol (7 rounds, remeasure);
- ``warm``: the warm evaluator, fixed protocol;
- ``warm_budget``: the warm evaluator, rounds until the decision is clear;
- ``warm_screen``: as ``warm_budget``, with the latency predictor pre-screening: it
  starts from the measurements recorded by ``benchmarks/predictor_record.py`` (the
  same target: one thread, 224, the default reference) and goes on learning from the
  run's own; a candidate predicted over the budget is decided without measuring (a
  share is measured anyway, as in a search). Screened candidates count as decided, at
  their ask time; whether the one-shot mode measured them over the budget too is
  reported (``screened_over_per_one_shot``).

``--modes`` picks some of them; ``--max-latency-ratio`` moves the budget (1.0).

Per decided (measured) candidate: seconds in all and the breakdown: start-up (child
start, imports, pipe; what the child's own phases do not account for), build (and the
reference's when it is prepared), warm-up, timed rounds, load sampling, quality signal,
Optuna and database (ask + tell). Also the relative half-width of the ratio's 95 %
interval (the same distribution-free method in every mode: the reported precision) and
the share of feasibility decisions that agree with the one-shot mode's.

Part 2, deployment check: the exported TorchScript of MobileNetV2-0.5 (224, 1 thread) timed
in fresh plain processes (load, 20 warm-up calls, a plain loop for 1 s, the median call),
alternately with glibc's defaults and with fitnas's allocator environment, beside
fitnas's own figure for the same model (one-shot child, reference none).

    python3 benchmarks/throughput.py --trials 12 --deploy-procs 3

Prints tables; the last line is one JSON object of key figures (``median_candidate_s``
per mode among them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from search.evaluators.stats import median  # noqa: E402

MODES = ("one_shot", "warm", "warm_budget", "warm_screen")
PHASES = ("startup", "build", "warm_up", "timed", "load_sampling", "quality", "optuna_db")

DEPLOY_CHILD = r"""
import sys, time, torch
torch.set_num_threads(1)
m = torch.jit.load(sys.argv[1]).eval()
x = torch.randn(1, 3, 224, 224)
with torch.inference_mode():
    for _ in range(20):
        m(x)
    times = []
    t_end = time.perf_counter() + float(sys.argv[2])
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        m(x)
        times.append(time.perf_counter() - t0)
times.sort()
print(times[len(times) // 2] * 1e3)
"""


def _config(trials: int, seed: int, ratio: float = 1.0):
    from search.evaluators.types import MeasureSettings, QualitySettings
    from search.study import Budgets, SearchConfig

    return SearchConfig(space="default", target="cpu", trials=trials, seed=seed,
                        sampler="random", measure=MeasureSettings(threads=1),
                        budgets=Budgets(max_latency_ratio=ratio),
                        quality=QualitySettings(signal="synflow"))


def _breakdown(outcome, eval_s: float, optuna_s: float) -> dict[str, float]:
    lat = outcome.latency
    ph = dict(lat.phases) if lat is not None else {}
    q = outcome.quality.seconds if outcome.quality is not None else 0.0
    work = sum(ph.values()) + q
    return {"startup": max(0.0, eval_s - work), "build": ph.get("build", 0.0),
            "warm_up": ph.get("warm_up", 0.0), "timed": ph.get("timed", 0.0),
            "load_sampling": ph.get("load_sampling", 0.0), "quality": q,
            "optuna_db": optuna_s}


def _seeded_predictor(url: str, config, table: Path):
    """A predictor store holding the recorded measurements of ``table`` for the
    config's target (those recorded with the same settings)."""
    from predictor_record import SETTINGS, read_records

    from blocks import parse_spec
    from search.predictor import PredictorStore, spec_features, target_key

    store = PredictorStore(url)
    key = target_key(config.target, config.measure)
    n = 0
    for r in read_records(table):
        if r.get("settings", {}).get("threads") != SETTINGS["threads"] or not r.get("ratio"):
            continue
        spec = parse_spec(r["spec"])
        store.add(key, config.target, spec.hash, spec_features(spec), r["ratio"], r["ms"])
        n += 1
    return store, n


def throughput(args: argparse.Namespace) -> dict:
    from predictor_record import DEFAULT_OUT

    from search.evaluators.runner import evaluate
    from search.evaluators.warm import WarmEvaluator
    from search.study import SearchDriver

    modes = args.modes
    config = _config(args.trials, args.seed, args.max_latency_ratio)
    tmp = Path(tempfile.mkdtemp(prefix="fitnas-throughput-"))
    warm_fixed, warm_budget, warm_screen = WarmEvaluator(), WarmEvaluator(), WarmEvaluator()
    evaluators = {"one_shot": evaluate, "warm": warm_fixed, "warm_budget": warm_budget,
                  "warm_screen": warm_screen}
    store, seeded = _seeded_predictor(f"sqlite:///{tmp}/predictor.db",
                                      config.model_copy(update={"predictor": True}),
                                      args.predictor_data or DEFAULT_OUT)
    print(f"warm_screen: the predictor starts from {seeded} recorded measurements")
    drivers = {m: SearchDriver.open(
        f"sqlite:///{tmp}/{m}.db", f"throughput-{m}",
        config.model_copy(update={"predictor": m == "warm_screen"}),
        predictor=store if m == "warm_screen" else None) for m in modes}
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    wall = {m: 0.0 for m in modes}
    try:
        for i in range(args.trials):
            for mode in modes:
                d = drivers[mode]
                t0 = time.perf_counter()
                p = d.ask()
                t_ask = time.perf_counter() - t0
                if p.task is None:
                    wall[mode] += t_ask
                    if p.reason == "predicted_over_budget":
                        rows[mode].append({"i": i, "ok": True, "total": t_ask,
                                           "screened": True, "feasible": False,
                                           **dict.fromkeys(PHASES, 0.0),
                                           "optuna_db": t_ask})
                        print(f"  #{i:<3} {mode:<12} {t_ask:6.2f} s  predicted over the "
                              "budget, not measured", flush=True)
                    continue
                task = p.task if mode in ("warm_budget", "warm_screen") else \
                    p.task.model_copy(update={"budget": None})
                t1 = time.perf_counter()
                out = evaluators[mode](task)
                eval_s = time.perf_counter() - t1
                t2 = time.perf_counter()
                d.tell(p.trial_number, out)
                t_tell = time.perf_counter() - t2
                total = t_ask + eval_s + t_tell
                wall[mode] += total
                row = {"i": i, "ok": out.ok, "total": total,
                       **_breakdown(out, eval_s, t_ask + t_tell)}
                if out.ok and out.latency.ratio_to_reference is not None:
                    r = out.latency.ratio_to_reference
                    row["ratio"] = r.median
                    row["feasible"] = r.median <= args.max_latency_ratio
                    st = out.latency.stopping
                    if "ratio" in out.latency.intervals:  # 95 %, the same method both ways
                        lo, hi = out.latency.intervals["ratio"]
                        row["halfwidth"] = (hi - lo) / 2 / r.median
                    row["rounds"] = r.n
                    if st is not None:
                        row["stop"] = st.reason
                else:
                    row["failure"] = out.failure.reason if out.failure else "?"
                rows[mode].append(row)
                print(f"  #{i:<3} {mode:<12} {total:6.2f} s  " + (
                    f"ratio {row['ratio']:.3f} rounds {row['rounds']}" if "ratio" in row
                    else f"failed: {row.get('failure')}"), flush=True)
    finally:
        warm_fixed.close()
        warm_budget.close()
        warm_screen.close()
        store.close()

    summary = {}
    print()
    head = f"{'mode':<12} {'n':>3} {'median s':>8} {'cand/min':>8} " + " ".join(
        f"{p:>9}" for p in PHASES) + f" {'halfwidth':>9} {'agree':>5}"
    print(head)
    # the decisions each mode is compared with: the one-shot mode's, or the first mode's
    # that measured every candidate
    first = next((m for m in ("one_shot", "warm", "warm_budget") if m in modes), None)
    base = {r["i"]: r.get("feasible") for r in rows[first]} if first else {}
    for mode in modes:
        rs = rows[mode]
        if not rs:
            continue
        med = median([r["total"] for r in rs])
        phases = {p: median([r[p] for r in rs]) for p in PHASES}
        hw = [r["halfwidth"] for r in rs if "halfwidth" in r]
        same = [r.get("feasible") == base.get(r["i"]) for r in rs if r["i"] in base]
        per_min = 60.0 * len(rs) / wall[mode] if wall[mode] else 0.0
        summary[mode] = {"n": len(rs), "median_candidate_s": round(med, 3),
                         "candidates_per_min": round(per_min, 2),
                         "phases_median_s": {k: round(v, 3) for k, v in phases.items()},
                         "median_ratio_halfwidth": round(median(hw), 4) if hw else None,
                         f"decisions_agree_with_{first}": round(sum(same) / len(same), 3)
                         if same else None,
                         "stops": {s: sum(1 for r in rs if r.get("stop") == s)
                                   for s in ("below_budget", "above_budget", "max_rounds")}
                         if mode in ("warm_budget", "warm_screen") else None}
        if mode == "warm_screen":
            screened = [r["i"] for r in rs if r.get("screened")]
            over = {i for i, feasible in base.items() if feasible is False}
            summary[mode]["screened"] = len(screened)
            summary[mode][f"screened_over_per_{first}"] = sum(i in over for i in screened)
        print(f"{mode:<12} {len(rs):>3} {med:>8.2f} {per_min:>8.1f} " + " ".join(
            f"{phases[p]:>9.3f}" for p in PHASES)
            + f" {summary[mode]['median_ratio_halfwidth'] or 0:>9.4f} "
              f"{summary[mode][f'decisions_agree_with_{first}'] or 0:>5.2f}")
    return summary


def deployment(args: argparse.Namespace) -> dict:
    from blocks import load_spec
    from blocks.export import export
    from search.evaluators import allocator
    from search.evaluators.runner import evaluate
    from search.evaluators.types import EvalTask, MeasureSettings

    spec = load_spec("preset:mobilenet_v2@0.5")
    tmp = Path(tempfile.mkdtemp(prefix="fitnas-deploy-"))
    path = export(spec, "torchscript", tmp / "model.pt")
    plain = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    configured = {**plain, **allocator.DEPLOY_ENV}
    reads: dict[str, list[float]] = {"glibc_default": [], "fitnas_env": []}
    for _ in range(args.deploy_procs):
        for name, env in (("glibc_default", plain), ("fitnas_env", configured)):
            out = subprocess.run([sys.executable, "-c", DEPLOY_CHILD, str(path),
                                  str(args.deploy_seconds)], env=env, capture_output=True,
                                 text=True, check=True)
            reads[name].append(float(out.stdout.strip().splitlines()[-1]))
    ours = []
    for _ in range(args.deploy_procs):
        o = evaluate(EvalTask(spec=spec.canonical_dict(), measure=MeasureSettings(
            runtime="torchscript", threads=1, reference=None)))
        ours.append(o.latency.latency_ms.median if o.ok else float("nan"))
    print()
    print(f"{'MobileNetV2-0.5, TorchScript, 1 thread, 224':<46} {'reads (ms, one per process)'}")
    for name, vals in (*reads.items(), ("fitnas (one-shot child)", ours)):
        print(f"{name:<46} " + "  ".join(f"{v:6.2f}" for v in vals)
              + f"   median {median(vals):6.2f}")
    return {"glibc_default_ms": [round(v, 3) for v in reads["glibc_default"]],
            "fitnas_env_ms": [round(v, 3) for v in reads["fitnas_env"]],
            "fitnas_ms": [round(v, 3) for v in ours]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--deploy-procs", type=int, default=3, help="0: skip part 2")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--max-latency-ratio", type=float, default=1.0)
    ap.add_argument("--predictor-data", type=Path, default=None,
                    help="recorded measurements the warm_screen predictor starts from "
                         "(default: benchmarks/data/predictor_cpu.jsonl)")
    ap.add_argument("--deploy-seconds", type=float, default=1.0)
    args = ap.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown or not args.modes or args.max_latency_ratio <= 0:
        ap.exit(2, f"error: --modes takes {', '.join(MODES)} and --max-latency-ratio a "
                   f"positive number (got {', '.join(unknown) or args.max_latency_ratio})\n")
    from search.evaluators import fingerprint as fp

    load0 = fp.sample_load(0.5)
    t0 = time.perf_counter()
    result: dict = {"modes": throughput(args) if args.trials > 0 else {}}
    if args.deploy_procs > 0:
        result["deployment"] = deployment(args)
    load1 = fp.sample_load(0.5)
    result["load_other_cores"] = [load0.get("other_cores"), load1.get("other_cores")]
    result["cores"] = fp.logical_cores()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
