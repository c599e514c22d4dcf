"""Signal-quality benchmark: how well does each zero-cost proxy rank architectures by
the accuracy they reach after short training?

By default it reads the recorded table of benchmarks/table.py (every network of the
compact32 space, measured once) and prints, against the shapes32 accuracy at every rung of
the multi-fidelity recipe (30, 60 and 120 steps), the Spearman correlation of every
signal: synflow, NASWOT, grad_norm, ZiCo, MeCo, params and MACs, with 95% bootstrap
intervals and the seed-noise ceiling (the correlation between two training seeds of the
same networks), then the spread of accuracy over the networks on shapes32 and on digits
against the seed noise. Nothing is computed:

    python benchmarks/signal_quality.py                 # the recorded table, seconds

``--compute`` runs the older self-contained version instead:

Samples random small networks (MBConv, depthwise-separable, plain conv and ShuffleNet
stages) at resolution 32 for the 10 digit classes, computes every proxy and a short
seeded training run on the built-in digits data for each, and prints the Spearman rank
correlation of each signal with the trained validation accuracy, beside the correlation
of plain parameter count and MACs (the baseline proxies often fail to beat), with 95%
bootstrap intervals.

    python benchmarks/signal_quality.py --compute            # 32 networks, ~10 min, 2 cores
    python benchmarks/signal_quality.py --compute --archs 12 --steps 100   # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from blocks.cost import estimate_cost  # noqa: E402
from blocks.shapes import SpecError  # noqa: E402
from blocks.spec import ArchSpec  # noqa: E402

ACTS = ["relu", "relu6", "hswish", "swish"]
WIDTHS = [8, 16, 24, 32, 48, 64]
MAX_MACS = 4_000_000  # per image; keeps the default run inside its time budget


def _block(rng: np.random.Generator, kind: str, cin: int, stride: int) -> dict[str, Any]:
    k = int(rng.choice([3, 5]))
    act = str(rng.choice(ACTS))
    if kind == "shuffle":
        g = int(rng.choice([2, 4]))
        branch = int(rng.choice([16, 24, 32, 48]))
        out = cin + branch if stride == 2 else cin
        mid = max(g, (out // 4) // g * g)
        return {"kind": "shuffle", "out_channels": out, "mid_channels": mid, "groups": g,
                "kernel": k, "stride": stride, "act": act}
    out = int(rng.choice(WIDTHS))
    if kind == "mbconv":
        se = {"ratio": 0.25} if rng.random() < 0.3 else None
        return {"kind": "mbconv", "out_channels": out, "expand": float(rng.choice([2, 3, 4, 6])),
                "kernel": k, "stride": stride, "act": act, "se": se}
    if kind == "ds":
        return {"kind": "ds", "out_channels": out, "kernel": k, "stride": stride, "act": act}
    return {"kind": "conv", "out_channels": out, "kernel": 3, "stride": stride, "act": act}


def random_spec(rng: np.random.Generator, index: int) -> ArchSpec:
    """One random valid network from the small design space."""
    while True:
        stem_c = int(rng.choice([8, 16, 24]))
        stem = {"out_channels": stem_c, "kernel": 3, "stride": 2,
                "act": str(rng.choice(ACTS))}
        stages, cin = [], stem_c
        for si in range(int(rng.integers(2, 5))):
            kind = str(rng.choice(["mbconv", "ds", "conv", "shuffle"]))
            stride = 2 if (si > 0 and rng.random() < 0.6) or kind == "shuffle" else 1
            block = _block(rng, kind, cin, stride)
            stages.append({"block": block, "repeats": int(rng.integers(1, 4))})
            cin = block["out_channels"]
        head = ({"out_channels": int(rng.choice([64, 128])), "kernel": 1, "act": "relu"}
                if rng.random() < 0.5 else None)
        try:
            spec = ArchSpec.model_validate({
                "name": f"random-{index}", "in_channels": 1, "resolution": 32,
                "num_classes": 10, "stem": stem, "stages": stages, "head": head,
            })
            macs = estimate_cost(spec).macs
        except (SpecError, ValueError):
            continue
        if macs <= MAX_MACS:
            return spec


PROXIES = ("synflow", "naswot", "grad_norm", "zico", "meco")


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def evaluate_one(job: tuple[int, dict, int, int, int, int, tuple[int, ...]]) -> dict[str, Any]:
    """All signals for one network (runs in a pool process)."""
    from search.evaluators.quality import evaluate_quality
    from search.evaluators.types import QualitySettings

    index, spec_dict, steps, batch, proxy_batch, seed, extra_seeds = job
    spec = ArchSpec.model_validate(spec_dict)
    cost = estimate_cost(spec)
    row: dict[str, Any] = {"index": index, "compact": spec.to_compact(), "params": cost.params,
                           "macs": cost.macs, "cpu_s": {}}
    for signal in PROXIES:
        t = time.process_time()
        try:
            r = evaluate_quality(spec, QualitySettings(signal=signal, batch=proxy_batch,
                                                       seed=seed))
            row[signal] = r.value
        except ValueError as exc:  # a proxy with no value for this network
            row[signal] = None
            row.setdefault("errors", {})[signal] = str(exc)
        row["cpu_s"][signal] = time.process_time() - t
    for k, s in enumerate((seed, *extra_seeds)):
        t = time.process_time()
        r = evaluate_quality(spec, QualitySettings(signal="train", steps=steps, batch=batch,
                                                   seed=s))
        row["train" if k == 0 else f"train_seed{s}"] = r.value
        row["cpu_s"]["train" if k == 0 else f"train_seed{s}"] = time.process_time() - t
    return row


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


def bootstrap_ci(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0
                 ) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(a), len(a))
        v = spearman(a[idx], b[idx])
        if not math.isnan(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def table(rows: list[dict[str, Any]], extra_seeds: tuple[int, ...]) -> str:
    signals: list[tuple[str, str]] = [
        ("synflow", "synflow (log)"),
        ("naswot", "naswot (log det)"),
        ("grad_norm", "grad_norm"),
        ("zico", "zico"),
        ("meco", "meco"),
        ("params", "params (baseline)"),
        ("macs", "MACs (baseline)"),
    ]
    signals += [(f"train_seed{s}", f"train, seed {s} (noise ceiling)") for s in extra_seeds]
    lines = [f"{'signal':<32} {'Spearman rho':>12}  {'95% bootstrap CI':>17}  {'n':>3}  "
             f"{'CPU s/net':>9}"]
    lines.append("-" * len(lines[0]))
    for key, label in signals:
        pairs = [(r[key], r["train"]) for r in rows if r.get(key) is not None]
        x = np.array([p[0] for p in pairs], dtype=float)
        y = np.array([p[1] for p in pairs], dtype=float)
        rho = spearman(x, y)
        lo, hi = bootstrap_ci(x, y)
        cpu = np.mean([r["cpu_s"][key] for r in rows]) if key in rows[0]["cpu_s"] else 0.0
        lines.append(f"{label:<32} {rho:>12.3f}  [{lo:>6.3f}, {hi:>6.3f}]  {len(x):>3}  "
                     f"{cpu:>9.2f}")
    train_cpu = np.mean([r["cpu_s"]["train"] for r in rows])
    lines.append(f"{'(short training itself)':<32} {'':>12}  {'':>17}  {len(rows):>3}  "
                 f"{train_cpu:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", type=int, default=32, help="random networks (default 32)")
    ap.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    ap.add_argument("--batch", type=int, default=64, help="training batch (default 64)")
    ap.add_argument("--proxy-batch", type=int, default=64,
                    help="minibatch for naswot / grad_norm (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="design-space sampling seed")
    ap.add_argument("--train-seed", type=int, default=0, help="initialization/training seed")
    ap.add_argument("--noise-seeds", type=int, default=1,
                    help="extra training seeds per network; their correlation with the "
                         "first seed is about the best any signal can reach (default 1; "
                         "0 halves the run time)")
    ap.add_argument("--workers", type=int, default=2,
                    help="processes, one thread each (default 2: one per core)")
    ap.add_argument("--json", type=Path, default=None, help="also write every row here")
    ap.add_argument("--from-json", type=Path, nargs="+", default=None, metavar="FILE",
                    help="print the table for rows saved by earlier runs (pooled), "
                         "computing nothing")
    ap.add_argument("--compute", action="store_true",
                    help="sample and evaluate networks here instead of reading the table")
    ap.add_argument("--table", type=Path, default=None,
                    help="the recorded table (default benchmarks/data/compact32_shapes32.jsonl)")
    args = ap.parse_args(argv)
    if not args.compute and not args.from_json:
        return table_report(args.table)
    if args.from_json:
        rows = []
        for path in args.from_json:
            rows += json.loads(path.read_text())
        seeds = sorted({int(k[len("train_seed"):]) for k in rows[0] if
                        k.startswith("train_seed")})
        _report(rows, tuple(seeds), f"{len(args.from_json)} saved run(s)")
        return 0
    if args.archs < 5:
        ap.error("--archs must be at least 5")

    rng = np.random.default_rng(args.seed)
    specs = [random_spec(rng, i) for i in range(args.archs)]
    extra = tuple(args.train_seed + 1 + k for k in range(args.noise_seeds))
    jobs = [(i, s.model_dump(mode="json"), args.steps, args.batch, args.proxy_batch,
             args.train_seed, extra) for i, s in enumerate(specs)]
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.workers <= 1:
        _init_worker(1)
        for job in jobs:
            rows.append(evaluate_one(job))
            print(f"  {len(rows)}/{len(jobs)}", file=sys.stderr, flush=True)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(args.workers, initializer=_init_worker, initargs=(1,)) as pool:
            for row in pool.imap_unordered(evaluate_one, jobs):
                rows.append(row)
                print(f"  {len(rows)}/{len(jobs)}", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: r["index"])
    wall = time.perf_counter() - start
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    _report(rows, extra, f"training: {args.steps} steps, batch {args.batch}, seed "
                         f"{args.train_seed}; proxies: minibatch {args.proxy_batch}")
    cpu = sum(sum(r["cpu_s"].values()) for r in rows)
    print(f"wall time {wall:.0f} s with {args.workers} worker process(es); {cpu:.0f} CPU s "
          f"in the evaluations")
    return 0


def _report(rows: list[dict[str, Any]], extra: tuple[int, ...], setup: str) -> None:
    acc = np.array([r["train"] for r in rows])
    params = np.array([r["params"] for r in rows])
    macs = np.array([r["macs"] for r in rows])
    print(f"signal quality on digits: {len(rows)} random networks (MBConv / ds / conv / "
          f"shuffle, resolution 32, 10 classes)")
    print(setup)
    print(f"params {params.min():,}..{params.max():,}; MACs {macs.min():,}..{macs.max():,}; "
          f"val accuracy {acc.min():.3f}..{acc.max():.3f} (median {np.median(acc):.3f})")
    print()
    print(table(rows, extra))
    errors = [(r["index"], s, e) for r in rows for s, e in r.get("errors", {}).items()]
    for i, s, e in errors:
        print(f"note: network {i}: {s} has no value ({e})")
    print()


# ---- the recorded table ----------------------------------------------------------------

SIGNALS = (("synflow", "synflow (log)"), ("naswot", "naswot (log det)"),
           ("grad_norm", "grad_norm"), ("zico", "zico"), ("meco", "meco"),
           ("params", "params (baseline)"), ("macs", "MACs (baseline)"))


def _rho_row(label: str, x: np.ndarray, y: np.ndarray) -> tuple[str, float]:
    rho = spearman(x, y)
    lo, hi = bootstrap_ci(x, y, n=1000)
    return f"{label:<24} {rho:>7.3f} [{lo:>6.3f}, {hi:>6.3f}]", rho


def table_report(path: Path | None) -> int:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import table as tbl

    rows = tbl.read_table(path or tbl.TABLE)
    nets = {n: r for n, r in rows.items() if n.startswith("c") and "proxies" in r
            and tbl.accuracy(r, "shapes32/seed0") is not None}
    if len(nets) < 5:
        print(f"error: the table has {len(nets)} networks with proxies and training; record "
              "it with: python benchmarks/table.py record", file=sys.stderr)
        return 1
    rungs = [int(s) for s, _ in next(iter(nets.values()))["shapes32/seed0"]["rungs"]]
    seed1 = [n for n, r in nets.items() if tbl.accuracy(r, "shapes32/seed1") is not None]
    print(f"signal quality on shapes32: {len(nets)} networks of the compact32 space (every "
          f"member recorded: {len(nets)}/128); recipe {tbl.RECIPE}")
    print(f"Spearman rho with the validation accuracy at each rung (seed 0), 95% bootstrap "
          f"CI; the noise ceiling is rho(seed 0, seed 1) over the {len(seed1)} networks "
          f"trained twice")
    header = f"{'signal':<24} " + "  ".join(f"{f'{s} steps':>23}" for s in rungs)
    header += f"  {'CPU s/net':>9}"
    print(header)
    print("-" * len(header))
    summary: dict[str, dict[str, float]] = {}
    cpu_of = {}
    for key, label in SIGNALS:
        cells = []
        for step in rungs:
            pairs = [(r["proxies"]["values"].get(key), tbl.accuracy(r, "shapes32/seed0", step))
                     for r in nets.values()]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            x = np.array([p[0] for p in pairs], dtype=float)
            y = np.array([p[1] for p in pairs], dtype=float)
            text, rho = _rho_row("", x, y)
            cells.append(text.strip())
            summary.setdefault(key, {})[str(step)] = round(rho, 4)
        cpu_of[key] = float(np.mean([r["proxies"]["cpu_s"][key] for r in nets.values()]))
        print(f"{label:<24} " + "  ".join(f"{c:>23}" for c in cells)
              + f"  {cpu_of[key]:>9.2f}")
    cells = []
    for step in rungs if len(seed1) >= 3 else []:
        x = np.array([tbl.accuracy(nets[n], "shapes32/seed1", step) for n in seed1])
        y = np.array([tbl.accuracy(nets[n], "shapes32/seed0", step) for n in seed1])
        text, rho = _rho_row("", x, y)
        cells.append(text.strip())
        summary.setdefault("noise_ceiling", {})[str(step)] = round(rho, 4)
    train_s = float(np.mean([nets[n]["shapes32/seed0"]["rung_seconds"][-1] for n in nets]))
    print(f"{'train, seed 1 (ceiling)':<24} " + "  ".join(f"{c:>23}" for c in cells)
          + f"  {train_s:>9.2f}")
    early = {}
    for step in rungs[:-1]:
        x = np.array([tbl.accuracy(r, "shapes32/seed0", step) for r in nets.values()])
        y = np.array([tbl.accuracy(r, "shapes32/seed0") for r in nets.values()])
        early[str(step)] = round(spearman(x, y), 4)
    print("rung accuracy vs the last rung's (same seed): "
          + ", ".join(f"{k} steps rho {v:.3f}" for k, v in early.items()))
    cheap = {k: v[str(rungs[-1])] for k, v in summary.items() if k != "noise_ceiling"}
    best = max(cheap, key=lambda k: cheap[k])
    ceiling = summary.get("noise_ceiling", {}).get(str(rungs[-1]), float("nan"))
    print(f"best cheap signal against the last rung: {best} (rho {cheap[best]:.3f}; "
          f"ceiling {ceiling:.3f})")
    print()
    spread = spread_table(tbl, rows)
    print(json.dumps({"networks": len(nets), "noise_networks": len(seed1), "rho": summary,
                      "rung_vs_last": early, "best_cheap_signal": best,
                      "cpu_s_per_net": {k: round(v, 3) for k, v in cpu_of.items()},
                      "train_s_per_net": round(train_s, 2), "spread": spread},
                     separators=(",", ":")))
    return 0


def spread_table(tbl, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Accuracy over the networks trained on each data set against the seed noise."""
    print("accuracy after the last rung over networks of the compact32 space, against the "
          "seed noise (networks trained with seeds 0 and 1)")
    head = (f"{'data':<9} {'nets':>4} {'mean':>6} {'std':>6} {'best':>6} {'worst':>6}  "
            f"{'seed-noise std':>14}  {'spread/noise':>12}  {'rho(seed0, seed1)':>17}")
    print(head)
    print("-" * len(head))
    out = {}
    for data in ("shapes32", "digits"):
        both = [r for n, r in rows.items() if n.startswith("c")
                and tbl.accuracy(r, f"{data}/seed0") is not None
                and tbl.accuracy(r, f"{data}/seed1") is not None]
        if len(both) < 3:
            print(f"{data:<9} {len(both):>4}  (not recorded)")
            continue
        a = np.array([tbl.accuracy(r, f"{data}/seed0") for r in both])
        b = np.array([tbl.accuracy(r, f"{data}/seed1") for r in both])
        noise = float(np.std(a - b, ddof=1) / math.sqrt(2))  # one run's seed noise
        rho = spearman(a, b)
        print(f"{data:<9} {len(a):>4} {a.mean():>6.3f} {a.std(ddof=1):>6.3f} {a.max():>6.3f} "
              f"{a.min():>6.3f}  {noise:>14.3f}  {a.std(ddof=1) / noise:>12.2f}  {rho:>17.3f}")
        out[data] = {"networks": len(a), "mean": round(float(a.mean()), 4),
                     "std": round(float(a.std(ddof=1)), 4), "best": float(a.max()),
                     "worst": float(a.min()), "seed_noise_std": round(noise, 4),
                     "rho_seeds": round(rho, 4)}
    print()
    return out


if __name__ == "__main__":
    sys.exit(main())
