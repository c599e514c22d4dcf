"""How well the per-target latency predictor (search/predictor.py) predicts the ratio to
the reference network of candidates it has not seen, by how many measurements it learned
from; beside it a MACs-only linear fit (what a user would try first) and gradient boosting
on the same features (the alternative model we weighed).

Candidates come from two design spaces (default and mobilenet_v2), measured once on this
machine by benchmarks/predictor_record.py into a JSON-lines file that every run reuses
(benchmarks/data/predictor_cpu.jsonl is committed: ``--quick`` measures nothing). A fixed
share of the candidates, drawn at random from both spaces, is held out; the models learn
from the first 50, 100, 200 and 500 of the others.

Printed per training size and model: the share of held-out predictions within +-10% and
+-5% of the measured ratio, Kendall's tau between predicted and measured, and (for the
predictor) the share of measured ratios inside the predicted 90% interval. The last line
is one JSON object of key figures.

    python benchmarks/predictor.py --quick          # the recorded file only (seconds)
    python benchmarks/predictor.py --record 100     # measure 100 more first (~2-5 min)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))
from predictor_record import DEFAULT_OUT, read_records, record, settings  # noqa: E402

SIZES = (50, 100, 200, 500)


def _scores(pred: list[float], meas: list[float]) -> dict[str, float]:
    from scipy.stats import kendalltau

    rel = [abs(p / m - 1.0) for p, m in zip(pred, meas, strict=True)]
    tau = kendalltau(pred, meas).statistic
    return {"within_10pct": sum(r <= 0.10 for r in rel) / len(rel),
            "within_5pct": sum(r <= 0.05 for r in rel) / len(rel),
            "kendall_tau": float(tau) if tau == tau else 0.0,
            "median_abs_error": sorted(rel)[len(rel) // 2]}


def evaluate(rows: list[dict], n_test: int, sizes: tuple[int, ...], seed: int = 0
             ) -> list[dict]:
    import numpy as np

    from blocks.cost import estimate_cost
    from blocks.spec import ArchSpec
    from search.predictor import feature_vector, fit_macs_baseline, fit_state, spec_features

    rows = list(rows)
    random.Random(seed).shuffle(rows)
    for r in rows:
        spec = ArchSpec.from_compact(r["spec"])
        r["features"] = spec_features(spec)
        r["macs"] = estimate_cost(spec).macs / 1e6
    test, train = rows[:n_test], rows[n_test:]
    meas = [r["ratio"] for r in test]
    out = []
    for n in sizes:
        if n > len(train):
            continue
        tr = train[:n]
        t0 = time.perf_counter()
        st = fit_state("bench", "cpu", tr)
        fit_s = time.perf_counter() - t0
        preds = [st.ratio.predict(feature_vector(r["features"])) for r in test]
        ours = _scores([p.value for p in preds], meas)
        ours["coverage"] = sum(p.lo <= m <= p.hi for p, m in zip(preds, meas, strict=True)
                               ) / len(meas)
        ours["fit_s"] = fit_s
        a, b = fit_macs_baseline([r["macs"] for r in tr], [r["ratio"] for r in tr])
        base = _scores([max(a * r["macs"] + b, 1e-6) for r in test], meas)
        from sklearn.ensemble import HistGradientBoostingRegressor

        gbm = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05,
                                            min_samples_leaf=5, random_state=0)
        gbm.fit(np.array([feature_vector(r["features"]) for r in tr]),
                np.log([r["ratio"] for r in tr]))
        g = np.exp(gbm.predict(np.array([feature_vector(r["features"]) for r in test])))
        out.append({"n_train": n, "n_test": len(test), "predictor": ours,
                    "baseline_macs": base, "gbm": _scores(list(g), meas),
                    "cv_within_10pct": st.ratio.within_10pct})
    return out


def repeat_ceiling(rows: list[dict], k: int, seed: int = 1) -> dict[str, float]:
    """Measure ``k`` recorded candidates again: the share of repeats within +-10% / +-5%
    of the recorded ratio is the ceiling any predictor can reach against these records."""
    from blocks.spec import ArchSpec
    from search.evaluators.latency import measure_latency

    pick = random.Random(seed).sample(rows, min(k, len(rows)))
    rel = []
    for r in pick:
        again = measure_latency(ArchSpec.from_compact(r["spec"]), settings())
        rel.append(abs(again.ratio_to_reference.median / r["ratio"] - 1.0))
    return {"n": len(rel), "within_10pct": sum(x <= 0.10 for x in rel) / len(rel),
            "within_5pct": sum(x <= 0.05 for x in rel) / len(rel),
            "median_abs_error": sorted(rel)[len(rel) // 2]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="use the recorded measurements only; sizes up to 200")
    ap.add_argument("--record", type=int, default=0, help="measure this many more first")
    ap.add_argument("--data", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--test", type=int, default=150, help="held-out candidates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=0,
                    help="measure this many recorded candidates again (the noise ceiling)")
    args = ap.parse_args(argv)
    if args.record and not args.quick:
        record(args.record, args.data, seed=len(read_records(args.data)) + 1)
    rows = [r for r in read_records(args.data) if r.get("ratio")]
    if len(rows) < args.test + SIZES[0]:
        print(f"error: {len(rows)} recorded candidates in {args.data}; need at least "
              f"{args.test + SIZES[0]} (run with --record N)", file=sys.stderr)
        return 2
    sizes = tuple(s for s in SIZES if not args.quick or s <= 200)
    results = evaluate(rows, args.test, sizes, args.seed)
    spaces = sorted({r["space"] for r in rows})
    contended = sum(bool(r.get("contended")) for r in rows)
    print(f"{len(rows)} recorded candidates from {', '.join(spaces)} ({contended} measured "
          f"contended); {args.test} held out")
    head = (f"{'n_train':>7}  {'model':<14}{'±10%':>7}{'±5%':>7}{'tau':>7}{'med err':>9}"
            f"{'cover':>7}")
    print(head)
    print("-" * len(head))
    for r in results:
        for name, key in (("predictor", "predictor"), ("MACs linear", "baseline_macs"),
                          ("gradient boost", "gbm")):
            s = r[key]
            cover = f"{s['coverage']:7.2f}" if "coverage" in s else f"{'':7}"
            print(f"{r['n_train']:>7}  {name:<14}{s['within_10pct']:7.2f}"
                  f"{s['within_5pct']:7.2f}{s['kendall_tau']:7.3f}"
                  f"{s['median_abs_error']:9.3f}{cover}")
    ceiling = repeat_ceiling(rows, args.repeat) if args.repeat else None
    if ceiling:
        print(f"repeat measurements of {ceiling['n']} recorded candidates: "
              f"{ceiling['within_10pct']:.2f} within ±10%, {ceiling['within_5pct']:.2f} within "
              f"±5% of the recorded ratio (median error {ceiling['median_abs_error']:.3f})")
    at = next((r for r in results if r["n_train"] == 200), results[-1])
    key = {
        "n_train": at["n_train"], "n_test": at["n_test"],
        "within_10pct": round(at["predictor"]["within_10pct"], 4),
        "within_5pct": round(at["predictor"]["within_5pct"], 4),
        "kendall_tau": round(at["predictor"]["kendall_tau"], 4),
        "coverage": round(at["predictor"]["coverage"], 4),
        "baseline_within_10pct": round(at["baseline_macs"]["within_10pct"], 4),
        "baseline_kendall_tau": round(at["baseline_macs"]["kendall_tau"], 4),
        "gbm_within_10pct": round(at["gbm"]["within_10pct"], 4),
        "by_n_train": {r["n_train"]: round(r["predictor"]["within_10pct"], 4)
                       for r in results},
        "recorded": len(rows),
        "repeat_within_10pct": ceiling["within_10pct"] if ceiling else None,
    }
    print(json.dumps(key, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
