"""Record latency measurements of random candidates from two design spaces, for
``benchmarks/predictor.py``.

Each line of the output file (JSON lines) is one measured candidate: the space, the spec
in compact form, its ratio to the reference (median and spread), its milliseconds and the
reference's, whether the machine was contended, and the settings. The file is appended
to and candidates already in it are skipped, so recording can run in bounded batches and
be resumed; the benchmark reads the same file and measures nothing when it is complete.

    python benchmarks/predictor_record.py --n 300 --out benchmarks/data/predictor_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "data" / "predictor_cpu.jsonl"
SPACES = ("default", "mobilenet_v2")
# One thread, short rounds: ~1-3 s a candidate; the ratio is interleaved with the
# reference, so it stands up to a shared machine better than milliseconds.
SETTINGS = {"threads": 1, "min_run_time_s": 0.05, "rounds": 5, "max_cv": 0.15}


def settings():
    from search.evaluators.types import MeasureSettings

    return MeasureSettings(**SETTINGS)


def sample_specs(space_name: str, n: int, seed: int):
    """``n`` specs of a built-in space from Optuna's random sampler (seeded)."""
    import optuna

    from search.space import DesignSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = DesignSpace.load(space_name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n):
        trial = study.ask()
        yield space.sample(trial)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            out.append(json.loads(line))
    return out


def record(n: int, out: Path, seed: int, max_seconds: float | None = None) -> int:
    """Measure up to ``n`` new candidates (alternating the spaces); returns how many."""
    from blocks.spec import ArchSpec
    from search.evaluators.latency import measure_latency

    done = {(r["space"], ArchSpec.from_compact(r["spec"]).hash) for r in read_records(out)}
    out.parent.mkdir(parents=True, exist_ok=True)
    s = settings()
    gens = {name: sample_specs(name, 100_000, seed + i) for i, name in enumerate(SPACES)}
    t0 = time.perf_counter()
    made = 0
    i = 0
    while made < n:
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
        space = SPACES[i % len(SPACES)]
        i += 1
        spec = next(gens[space])
        if (space, spec.hash) in done:
            continue
        done.add((space, spec.hash))
        t1 = time.perf_counter()
        try:
            r = measure_latency(spec, s)
        except Exception as exc:  # a candidate the runtime cannot run: skip it
            print(f"skip {spec.short_hash}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        row = {
            "space": space,
            "spec": spec.to_compact(),
            "ratio": r.ratio_to_reference.median,
            "ratio_cv": r.ratio_to_reference.cv,
            "ms": r.latency_ms.median,
            "ref_ms": r.reference_latency_ms.median,
            "contended": bool(r.contended),
            "settings": SETTINGS,
            "reference": s.reference,
            "seconds": round(time.perf_counter() - t1, 2),
            "recorded_at": round(time.time(), 1),
        }
        with out.open("a") as fh:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
        made += 1
        print(f"{made:4d} {space:<13} ratio {row['ratio']:.3f} {row['ms']:8.2f} ms "
              f"{row['seconds']:.1f} s", flush=True)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="new candidates to measure")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=None)
    args = ap.parse_args(argv)
    record(args.n, args.out, args.seed, args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
