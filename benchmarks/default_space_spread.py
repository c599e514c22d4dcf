"""Does architecture matter on the bundled data, for the `default` space?

Random members of the `default` design space (seeded), at 32x32, trained with the
default `train` recipe (200 steps, batch 32, cosine schedule) with two seeds, on shapes32
and on digits. Per data set: the accuracy over the networks (mean, spread, best, worst)
against one run's seed noise (the standard deviation of seed 0 minus seed 1, divided by
the square root of 2), and the rank correlation between the two seeds.

    python3 benchmarks/default_space_spread.py --archs 32 --workers 2

Accuracies do not depend on the machine's load (training is seeded and deterministic on
the CPU for a fixed thread count); only the time does. Prints a table; the last line is
one JSON object of the key figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

DATASETS = ("shapes32", "digits")
SEEDS = (0, 1)


def sample_specs(n: int, seed: int) -> list[str]:
    """``n`` members of the default space at 32x32, as compact strings (seeded)."""
    import optuna

    from search.space import DesignSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = DesignSpace.load("default").model_copy(update={"resolution": [32]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.sample(trial).to_compact())
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return out


def train_one(job: tuple[int, str, str, int]) -> tuple[int, str, int, float, float]:
    index, compact, data, seed = job
    import torch

    torch.set_num_threads(1)
    from blocks.load import parse_spec
    from search.evaluators.quality import evaluate_quality
    from search.evaluators.types import QualitySettings

    t0 = time.perf_counter()
    r = evaluate_quality(parse_spec(compact),
                         QualitySettings(signal="train", data=data, seed=seed))
    return index, data, seed, float(r.value), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="which networks are drawn")
    args = ap.parse_args(argv)
    if args.archs < 3 or args.workers < 1:
        ap.exit(2, "error: --archs >= 3 and --workers >= 1\n")
    import numpy as np
    from signal_quality import spearman

    t0 = time.perf_counter()
    specs = sample_specs(args.archs, args.seed)
    jobs = [(i, s, d, seed) for i, s in enumerate(specs) for d in DATASETS for seed in SEEDS]
    acc: dict[tuple[int, str, int], float] = {}
    secs: list[float] = []
    with ProcessPoolExecutor(args.workers) as pool:
        for n, (i, d, seed, value, s) in enumerate(pool.map(train_one, jobs), 1):
            acc[(i, d, seed)] = value
            secs.append(s)
            print(f"  {n:>4}/{len(jobs)}  net {i:>3} {d:<9} seed {seed}  "
                  f"accuracy {value:.3f}  {s:5.1f} s", flush=True)
    print()
    head = (f"{'data':<9} {'nets':>4} {'mean':>6} {'std':>6} {'best':>6} {'worst':>6}  "
            f"{'seed-noise std':>14}  {'spread/noise':>12}  {'rho(seed0, seed1)':>17}  "
            f"{'chance':>6}")
    print(head)
    print("-" * len(head))
    out: dict = {}
    for d in DATASETS:
        a = np.array([acc[(i, d, 0)] for i in range(len(specs))])
        b = np.array([acc[(i, d, 1)] for i in range(len(specs))])
        noise = float(np.std(a - b, ddof=1) / math.sqrt(2))
        rho = spearman(a, b)
        ratio = float(a.std(ddof=1) / noise) if noise > 0 else float("inf")
        print(f"{d:<9} {len(a):>4} {a.mean():>6.3f} {a.std(ddof=1):>6.3f} {a.max():>6.3f} "
              f"{a.min():>6.3f}  {noise:>14.3f}  {ratio:>12.2f}  {rho:>17.3f}  {0.1:>6.2f}")
        out[d] = {"networks": len(a), "mean": round(float(a.mean()), 4),
                  "std": round(float(a.std(ddof=1)), 4), "best": round(float(a.max()), 4),
                  "worst": round(float(a.min()), 4), "seed_noise_std": round(noise, 4),
                  "spread_over_noise": round(ratio, 2), "rho_seeds": round(rho, 4),
                  "within_0.1_of_chance": int(np.sum(a < 0.2))}
    out["median_train_s"] = round(float(np.median(secs)), 2)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
