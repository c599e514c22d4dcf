"""Record per-round values of the budget-aware protocol (short interleaved rounds) for a
few candidates against the reference, as the stopping rule sees them: per-round ratios
and per-round candidate medians. tests/test_stopping.py replays such a recording.

    python3 benchmarks/record_rounds.py --rounds 84 --out tests/data/rounds.json

Prints a table and ends with one JSON line of key figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch

from blocks import load_spec
from search.evaluators import allocator
from search.evaluators import fingerprint as fp
from search.evaluators.latency import calibrate, interleaved_round, prepare, warm_up
from search.evaluators.stats import median, robust_cv
from search.evaluators.types import LatencyBudget, MeasureSettings

CANDIDATES = ("mobilenet_v2@0.35", "mobilenet_v3_small@0.75", "mnasnet@0.5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=84)
    ap.add_argument("--round-s", type=float, default=LatencyBudget().round_s)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    allocator.apply()
    torch.set_num_threads(args.threads)
    settings = MeasureSettings(threads=args.threads)
    load0 = fp.sample_load(0.25)
    ref = prepare(load_spec("preset:mobilenet_v2@0.5"), settings, 224, args.threads, "reference")
    records = {}
    with torch.inference_mode():
        warm_up(ref, 0.2)
        calibrate(ref)
        for name in CANDIDATES:
            cand = prepare(load_spec(f"preset:{name}"), settings, 224, args.threads, name)
            warm_up(cand, 0.2)
            calibrate(cand)
            rng = random.Random(0)
            ratios, medians = [], []
            for _ in range(args.rounds):
                c, f = interleaved_round(cand, ref, args.round_s, rng)
                ratios.append(median(c) / median(f))
                medians.append(median(c))
            records[name] = {"ratio": ratios, "ms": medians}
    load1 = fp.sample_load(0.25)

    print(f"{'candidate':<26} {'rounds':>6} {'ratio median':>12} {'ratio rCV':>9} "
          f"{'ms median':>9} {'ms rCV':>7}")
    for name, r in records.items():
        print(f"{name:<26} {len(r['ratio']):>6} {median(r['ratio']):>12.4f} "
              f"{robust_cv(r['ratio']):>9.4f} {median(r['ms']):>9.3f} {robust_cv(r['ms']):>7.4f}")
    meta = {"command": "python3 benchmarks/record_rounds.py --rounds "
                       f"{args.rounds} --round-s {args.round_s} --threads {args.threads}",
            "cpu": fp.cpu_model(), "python": platform.python_version(),
            "torch": torch.__version__, "recorded": time.strftime("%Y-%m-%d"),
            "other_cores_before": load0.get("other_cores"),
            "other_cores_after": load1.get("other_cores")}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "records": records}, fh, indent=1)
            fh.write("\n")
    print(json.dumps({name: {"ratio_median": round(median(r["ratio"]), 4),
                             "ratio_robust_cv": round(robust_cv(r["ratio"]), 4)}
                      for name, r in records.items()} | {"meta": meta}))


if __name__ == "__main__":
    main()
