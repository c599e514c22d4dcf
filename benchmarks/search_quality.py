"""Search-quality benchmark: does the search find networks better than the references,
and how many trials does each sampler need?

One device, one recipe: every member of the compact32 space (128 networks for 32x32
inputs, benchmarks/spaces/compact32.yaml) and three references (MobileNetV2-0.35,
MobileNetV2-0.5, MobileNetV3-Small-0.75, built for 10 classes at 32x32) were measured
once by benchmarks/table.py: latency ratio to MobileNetV2-0.5 (interleaved, one thread)
and shapes32 validation accuracy after 30, 60 and 120 steps of the multi-fidelity recipe.
This script only reads that table (benchmarks/data/compact32_shapes32.jsonl):

1. References: the table's Pareto front (accuracy up, latency ratio down) against each
   reference at the reference's own latency ratio: is the reference dominated, and by
   how much accuracy does the best front member no slower than it beat it?
2. Replay: TPE, NSGA-II and random search, each over ``--seeds`` seeds, run through the
   real ``SearchDriver`` (same samplers, same space sampling) with the table as the
   evaluator: no measuring, no training. Hypervolume (reference point: accuracy 0.1 =
   chance, latency ratio 1.1 x the table's largest) against trials, and the number of
   trials each sampler needs to reach random search's median hypervolume at 200 trials
   (each replay runs 300 trials).
   TPE is also replayed with successive-halving pruning on the recorded rungs (from the
   first rung, 30 steps, and from the second, 60 steps), counting the training seconds
   it spends.

    python benchmarks/search_quality.py --quick          # replay the recorded table
    python benchmarks/search_quality.py                  # record what is missing first

The last line is one JSON object of key figures (``hv_ratio_vs_random`` per sampler).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import table as tbl  # noqa: E402

CHANCE = 0.1
BUDGET = 300  # trials per replay
TARGET_AT = 200  # random search's median hypervolume after this many trials is the target
COMPARE_AT = 50  # hv_ratio_vs_random is taken at this many trials


# ---- the table ---------------------------------------------------------------------------


def load(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(candidates by spec hash, references by name): ratio, accuracy at every rung and
    the training seconds to reach each rung."""
    rows = tbl.read_table(path)
    cands: dict[str, dict[str, Any]] = {}
    refs: dict[str, dict[str, Any]] = {}
    for net, recs in rows.items():
        lat, train = recs.get("latency"), recs.get("shapes32/seed0")
        if not lat or not train or not lat.get("ok") or not train.get("ok"):
            continue
        entry = {"id": net, "ratio": lat["latency_ratio"], "compact": lat["compact"],
                 "rungs": {int(s): float(a) for s, a in train["rungs"]},
                 "rung_seconds": dict(zip([int(s) for s, _ in train["rungs"]],
                                          train["rung_seconds"], strict=True)),
                 "acc": float(train["rungs"][-1][1])}
        if net.startswith("c"):
            cands[lat["spec_hash"]] = entry
        else:
            refs[net] = entry
    return cands, refs


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (accuracy up, ratio down) points, sorted by ratio."""
    front: list[tuple[float, float]] = []
    best = -1.0
    for acc, ratio in sorted(points, key=lambda p: (p[1], -p[0])):
        if acc > best:
            front.append((acc, ratio))
            best = acc
    return front


def hypervolume(points: list[tuple[float, float]], ref_ratio: float) -> float:
    hv, prev_acc = 0.0, CHANCE
    for acc, ratio in sorted(pareto(points), key=lambda p: p[0]):  # by accuracy, ratio up
        if acc <= prev_acc or ratio >= ref_ratio:
            continue
        hv += (acc - prev_acc) * (ref_ratio - ratio)
        prev_acc = acc
    return hv


# ---- replay through the real driver ------------------------------------------------------


def replay(cands: dict[str, dict[str, Any]], sampler: str, seed: int, trials: int,
           ref_ratio: float, prune: bool = False, rungs: list[int] | None = None
           ) -> dict[str, Any]:
    """One search over the table; hypervolume after every trial and training seconds.
    ``rungs``: the recorded rungs the pruner sees (default: all of the recipe's)."""
    import optuna

    from search.evaluators.types import (
        EvalOutcome,
        LatencyResult,
        LatencyStats,
        MeasureSettings,
        QualityResult,
        QualitySettings,
    )
    from search.study import SearchConfig, SearchDriver

    def stats(v: float) -> LatencyStats:
        return LatencyStats(median=v, p90=v, iqr=0.0, cv=0.0, n=1, mean=v, min=v, max=v)

    measure = MeasureSettings(resolution=32, threads=1, reference=tbl.LATENCY_REFERENCE)
    recipe = {**tbl.RECIPE, "rungs": rungs or tbl.RECIPE["rungs"]}
    config = SearchConfig(space=tbl.load_space(), trials=trials, sampler=sampler, seed=seed,
                          measure=measure, pruner="successive_halving" if prune else "none",
                          quality=QualitySettings(data="shapes32", **recipe))
    driver = SearchDriver.open(optuna.storages.InMemoryStorage(), "replay", config)
    rungs = config.quality.rung_steps()
    points: list[tuple[float, float]] = []
    hv: list[float] = []
    seconds = 0.0
    for _ in range(trials):
        proposal = driver.ask()
        row = cands[proposal.spec.hash]
        reached = []
        pruned = False
        for step in rungs:
            reached.append([step, row["rungs"][step]])
            if step != rungs[-1] and not driver.report_rung(proposal.trial_number, step,
                                                            row["rungs"][step]):
                pruned = True
                break
        seconds += row["rung_seconds"][reached[-1][0]]
        lat = LatencyResult(latency_ms=stats(row["ratio"]), ratio_to_reference=stats(
            row["ratio"]), runtime="eager", settings=measure, device={}, params=0, macs=0)
        quality = QualityResult(signal="train", value=reached[-1][1], seconds=0.0,
                                pruned=pruned, details={"rungs": reached,
                                                        "steps": reached[-1][0]})
        driver.tell(proposal.trial_number, EvalOutcome(ok=True, latency=lat,
                                                       quality=quality))
        if not pruned:
            points.append((row["acc"], row["ratio"]))
        hv.append(hypervolume(points, ref_ratio))
    return {"hv": hv, "train_seconds": seconds, "front": pareto(points)}


def trials_to_reach(hv: list[float], target: float) -> int | None:
    for i, v in enumerate(hv):
        if v >= target - 1e-12:
            return i + 1
    return None


# ---- report ------------------------------------------------------------------------------


def reference_table(front: list[tuple[float, float]], refs: dict[str, dict[str, Any]],
                    label: str) -> tuple[list[str], dict[str, Any]]:
    head = "best front acc at <= ratio"
    lines = [label, f"{'reference':<26} {'ratio':>6} {'acc':>6}  {head:>26}  {'delta':>6}  "
             "dominated"]
    out: dict[str, Any] = {}
    for name, ref in refs.items():
        faster = [a for a, r in front if r <= ref["ratio"]]
        best = max(faster) if faster else None
        dominated = best is not None and best > ref["acc"]
        delta = None if best is None else best - ref["acc"]
        lines.append(f"{name:<26} {ref['ratio']:>6.3f} {ref['acc']:>6.3f}  "
                     f"{'-' if best is None else f'{best:.3f}':>26}  "
                     f"{'-' if delta is None else f'{delta:+.3f}':>6}  "
                     f"{'yes' if dominated else 'no'}")
        out[name] = {"ratio": round(ref["ratio"], 4), "acc": ref["acc"],
                     "front_acc": best, "delta_acc": None if delta is None else round(delta, 4),
                     "dominated": dominated}
    return lines, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="replay the recorded table only (no measuring, no training)")
    ap.add_argument("--seeds", type=int, default=10, help="seeds per sampler (default 10)")
    ap.add_argument("--trials", type=int, default=BUDGET, help="trials per replay (300)")
    ap.add_argument("--table", type=Path, default=tbl.TABLE)
    ap.add_argument("--workers", type=int, default=2, help="recording processes (full run)")
    args = ap.parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if not args.quick:
        tbl.record(args.workers, None, args.table, None)
    t0 = time.perf_counter()
    cands, refs = load(args.table)
    space_size = len(tbl.enumerate_space(tbl.load_space()))
    if len(cands) < space_size:
        print(f"error: the table has {len(cands)} of the space's {space_size} networks; "
              f"record the rest with: python benchmarks/table.py record", file=sys.stderr)
        return 1
    ratios = [c["ratio"] for c in cands.values()]
    ref_ratio = 1.1 * max(ratios + [r["ratio"] for r in refs.values()])
    accs = np.array([c["acc"] for c in cands.values()])
    print(f"table: {len(cands)} networks of compact32 + {len(refs)} references; accuracy "
          f"{accs.min():.3f}..{accs.max():.3f} (median {np.median(accs):.3f}); latency ratio "
          f"{min(ratios):.3f}..{max(ratios):.3f}")
    full_front = pareto([(c["acc"], c["ratio"]) for c in cands.values()])
    full_hv = hypervolume([(c["acc"], c["ratio"]) for c in cands.values()], ref_ratio)
    print()
    lines, ref_summary = reference_table(full_front, refs, "the space's Pareto front (every "
                                         "network measured) against the references:")
    print("\n".join(lines))

    runs: dict[str, list[dict[str, Any]]] = {}
    # successive halving from the first rung (30 steps), and from the second (60)
    variants = [("random", False, None), ("tpe", False, None), ("nsga2", False, None),
                ("tpe", True, None), ("tpe", True, [60, 120])]
    for sampler, prune, rungs in variants:
        name = sampler + ("" if not prune else f"+sha{(rungs or tbl.RECIPE['rungs'])[0]}")
        runs[name] = [replay(cands, sampler, seed, args.trials, ref_ratio, prune, rungs)
                      for seed in range(args.seeds)]
        print(f"  replayed {name}: {args.seeds} seeds x {args.trials} trials "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    hv = {k: np.array([r["hv"] for r in v]) for k, v in runs.items()}
    target_at = min(TARGET_AT, args.trials)
    target = float(np.median(hv["random"][:, target_at - 1]))
    print()
    print(f"hypervolume (median over {args.seeds} seeds; the whole table: {full_hv:.4f}; "
          f"target = random search's median at {target_at} trials: {target:.4f})")
    marks = [t for t in (10, 20, 30, 50, 100, 200, 300) if t <= args.trials]
    print(f"{'sampler':<10} " + " ".join(f"{f'@{t}':>7}" for t in marks)
          + f"  {'trials to target':>17}  {'train s/run':>11}")
    summary: dict[str, Any] = {}
    for name, arr in hv.items():
        med = np.median(arr, axis=0)
        reach = [trials_to_reach(list(row), target) for row in arr]
        got = sorted(r for r in reach if r is not None)
        reach_txt = (f"{int(np.median(got))} ({len(got)}/{len(reach)} seeds)" if got
                     else "never")
        secs = float(np.mean([r["train_seconds"] for r in runs[name]]))
        print(f"{name:<10} " + " ".join(f"{med[t - 1]:>7.4f}" for t in marks)
              + f"  {reach_txt:>17}  {secs:>11.0f}")
        summary[name] = {
            "hv_ratio_vs_random": round(float(med[COMPARE_AT - 1] / np.median(
                hv["random"][:, COMPARE_AT - 1])), 4) if args.trials >= COMPARE_AT else None,
            "trials_to_random_200": int(np.median(got)) if got else None,
            "seeds_reaching": len(got), "train_seconds_per_run": round(secs, 1)}
    # the front TPE finds in COMPARE_AT trials (its median-hypervolume seed)
    tpe_runs = runs["tpe"]
    at = [r["hv"][min(COMPARE_AT, args.trials) - 1] for r in tpe_runs]
    median_seed = int(np.argsort(at)[len(at) // 2])
    tpe_front = replay(cands, "tpe", median_seed, min(COMPARE_AT, args.trials), ref_ratio)
    print()
    lines, tpe_refs = reference_table(tpe_front["front"], refs, f"the front TPE finds in "
                                      f"{min(COMPARE_AT, args.trials)} trials (median seed "
                                      f"{median_seed}) against the references:")
    print("\n".join(lines))
    print(f"\nhv_ratio_vs_random: median hypervolume at {COMPARE_AT} trials / random "
          f"search's; replay took {time.perf_counter() - t0:.0f} s")
    print(json.dumps({
        "networks": len(cands), "seeds": args.seeds, "trials": args.trials,
        "compare_at": COMPARE_AT, "target_at": target_at, "target_hv": round(target, 5),
        "space_hv": round(full_hv, 5),
        "hv_ratio_vs_random": {k: v["hv_ratio_vs_random"] for k, v in summary.items()},
        "trials_to_random_200": {k: v["trials_to_random_200"] for k, v in summary.items()},
        "train_seconds_per_run": {k: v["train_seconds_per_run"] for k, v in summary.items()},
        "references_vs_space_front": ref_summary,
        "references_vs_tpe_front": tpe_refs,
    }, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
