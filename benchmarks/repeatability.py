"""Repeatability of fitnas latency measurements across fresh processes.

Each model is measured in ``--processes`` fresh processes (one "session" = one pass over
all models, each model in its own process), with the protocol of docs/measurement.md:
folded BatchNorm, fixed threads, warm-up, blocked rounds interleaved with the reference.
In the same process, right after, ``torch.utils.benchmark.Timer.blocked_autorange`` times
the same prepared model with the same threads, as an outside yardstick.

Printed per model: the median over processes of the absolute median and its coefficient
of variation across processes; the same for ``ratio_to_reference``; our median divided by
``torch.utils.benchmark``'s; how many processes ran contended. Then the Spearman rank
correlation of the models' order between sessions (session 1 vs 2, and the worst pair).

    python benchmarks/repeatability.py                  # defaults: ~5-10 min on 2 cores
    python benchmarks/repeatability.py --processes 3 --models preset:mobilenet_v2@0.35 ...
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from search.evaluators.stats import cv, mean, median, spearman  # noqa: E402

DEFAULT_MODELS = [  # well-spread latencies, so that their order is a fair test
    "preset:mobilenet_v1@0.25",
    "preset:mobilenet_v3_small@1",
    "preset:shufflenet_v1@0.5",
    "preset:mobilenet_v2@0.75",
    "preset:mobilenet_v2@1",
]


def child(args: argparse.Namespace) -> int:
    """One fresh process: our measurement, then torch.utils.benchmark on the same model."""
    import torch
    from torch.utils import benchmark

    from blocks.load import load_spec
    from search.evaluators.latency import measure_latency, prepare
    from search.evaluators.types import MeasureSettings

    spec = load_spec(args.child)
    settings = MeasureSettings(
        runtime=args.runtime, resolution=args.resolution, threads=args.threads,
        reference=None if args.reference == "none" else args.reference,
        min_run_time_s=args.min_run_time, rounds=args.rounds, max_cv=args.max_cv,
    )
    t0 = time.perf_counter()
    r = measure_latency(spec, settings)
    threads = r.device["threads"]
    resolution = args.resolution or spec.resolution
    with torch.no_grad():
        p = prepare(spec, settings, resolution, threads)
    with torch.inference_mode():
        timer = benchmark.Timer("call()", globals={"call": p.call}, num_threads=threads)
        m = timer.blocked_autorange(min_run_time=args.timer_min_run_time)
    out = {
        "model": args.child,
        "median_ms": r.latency_ms.median,
        "cv_within": r.latency_ms.cv,
        "ratio": r.ratio_to_reference.median if r.ratio_to_reference else None,
        "ratio_cv_within": r.ratio_to_reference.cv if r.ratio_to_reference else None,
        "timer_median_ms": m.median * 1e3,
        "threads": threads,
        "contended": r.contended,
        "remeasured": r.remeasured,
        "other_cores": r.load["during"].get("other_cores"),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(out))
    return 0


def run_one(model: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model,
           "--runtime", args.runtime, "--threads", str(args.threads),
           "--reference", args.reference, "--min-run-time", str(args.min_run_time),
           "--rounds", str(args.rounds), "--max-cv", str(args.max_cv),
           "--timer-min-run-time", str(args.timer_min_run_time)]
    if args.resolution:
        cmd += ["--resolution", str(args.resolution)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900,
                          check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: measuring {model} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--processes", type=int, default=5, help="fresh processes per model")
    ap.add_argument("--runtime", default="eager",
                    choices=["eager", "torchscript", "onnxruntime"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--reference", default="preset:mobilenet_v2@0.5")
    ap.add_argument("--min-run-time", type=float, default=0.2, help="seconds per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--max-cv", type=float, default=0.10, help="the protocol's remeasure "
                    "threshold")
    ap.add_argument("--timer-min-run-time", type=float, default=1.0,
                    help="torch.utils.benchmark's blocked_autorange min_run_time")
    ap.add_argument("--json", dest="json_out", help="also write every process's figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {m: [] for m in args.models}
    n = len(args.models)
    for session in range(args.processes):
        # rotate the order so no model always runs first (or right after the same one)
        order = args.models[session % n:] + args.models[:session % n]
        for model in order:
            results[model].append(run_one(model, args))
        print(f"session {session + 1}/{args.processes} done "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0

    has_ratio = args.reference != "none"
    print(f"repeatability: {n} models x {args.processes} fresh processes, runtime "
          f"{args.runtime}, {args.threads} thread(s), resolution {args.resolution}, "
          f"{args.rounds} rounds x {args.min_run_time:g} s, max_cv {args.max_cv:g}, "
          f"reference {args.reference}")
    header = (f"{'model':30s} {'median ms':>10s} {'CV abs':>7s} {'ratio':>7s} "
              f"{'CV ratio':>8s} {'ours/Timer':>10s} {'contended':>9s} {'remeasured':>10s}")
    print(header)
    print("-" * len(header))
    abs_cvs, ratio_cvs = [], []
    for model in args.models:
        rs = results[model]
        meds = [r["median_ms"] for r in rs]
        ratios = [r["ratio"] for r in rs if r["ratio"] is not None]
        vs_timer = median([r["median_ms"] / r["timer_median_ms"] for r in rs])
        abs_cvs.append(cv(meds))
        rcv = cv(ratios) if len(ratios) > 1 else None
        if rcv is not None:
            ratio_cvs.append(rcv)
        ratio_txt = f"{median(ratios):7.3f}" if ratios else f"{'-':>7s}"
        print(f"{model:30s} {median(meds):10.2f} {_pct(cv(meds)):>7s} {ratio_txt} "
              f"{_pct(rcv):>8s} {vs_timer:10.3f} "
              f"{sum(r['contended'] for r in rs):>6d}/{len(rs):<2d} "
              f"{sum(r['remeasured'] for r in rs):>7d}/{len(rs):<2d}")
    print("-" * len(header))
    print(f"{'mean CV across processes':30s} {'':10s} {_pct(mean(abs_cvs)):>7s} {'':7s} "
          f"{_pct(mean(ratio_cvs) if ratio_cvs else None):>8s}")
    print(f"{'worst CV across processes':30s} {'':10s} {_pct(max(abs_cvs)):>7s} {'':7s} "
          f"{_pct(max(ratio_cvs) if ratio_cvs else None):>8s}")

    def rank_line(key: str, label: str) -> None:
        per_session = [[results[m][s][key] for m in args.models]
                       for s in range(args.processes)]
        pairs = [spearman(a, b) for a, b in itertools.combinations(per_session, 2)]
        first = spearman(per_session[0], per_session[1])
        print(f"Spearman rank correlation, {label}: session 1 vs 2 = {first:.3f}; "
              f"all {len(pairs)} session pairs: mean {mean(pairs):.3f}, min {min(pairs):.3f}")

    if args.processes >= 2 and n >= 3:
        rank_line("median_ms", "absolute median")
        if has_ratio:
            rank_line("ratio", "ratio_to_reference")
    within = [r["ratio_cv_within"] for rs in results.values() for r in rs
              if r["ratio_cv_within"] is not None]
    if within:
        print(f"mean CV of the per-round ratios within a process: {_pct(mean(within))}")
    print(f"total wall time {wall:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
