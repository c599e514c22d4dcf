"""The search driver's own database cost per candidate: ``ask`` then ``tell`` of a
made-up measured outcome (nothing is evaluated), on any storage URL, for the default
space with a ratio budget. What is timed is what the scheduler pays per candidate in the
driver: Optuna's trial and parameter writes, fitnas's attributes and constraints, the
measurement cache and the latency predictor's bookkeeping.

    python benchmarks/driver_overhead.py --storage postgresql+psycopg://u@host/db --n 30
    python benchmarks/driver_overhead.py                      # a temporary SQLite file
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", default=None)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--sampler", default="random", help="random: the database cost alone")
    args = ap.parse_args(argv)
    import optuna
    import sqlalchemy as sa

    from search.evaluators.types import (
        EvalOutcome,
        LatencyResult,
        LatencyStats,
        QualityResult,
    )
    from search.study import Budgets, SearchConfig, SearchDriver, SQLMeasurementCache

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = args.storage or f"sqlite:///{tempfile.mkdtemp()}/overhead.db"
    extra = {"warm_start": False} if "warm_start" in SearchConfig.model_fields else {}
    config = SearchConfig(space="default", trials=args.n, seed=0, sampler=args.sampler,
                          budgets=Budgets(max_latency_ratio=1.0), **extra)
    cache = SQLMeasurementCache(url)
    import inspect

    kwargs = {}
    if "predictor" in inspect.signature(SearchDriver.open).parameters:
        from search.predictor import PredictorStore

        kwargs["predictor"] = PredictorStore(cache.engine)
    driver = SearchDriver.open(url, f"overhead-{uuid.uuid4().hex[:8]}", config, cache,
                               mode="service", **kwargs)
    engine = driver.study._storage._backend.engine
    writes = {"now": False, "n": 0, "statements": 0}

    def statement(conn, cursor, sql, *a):
        writes["statements"] += 1
        writes["now"] = writes["now"] or sql.lstrip().split()[0].upper() in ("INSERT",
                                                                              "UPDATE")

    def commit(conn):
        writes["n"] += int(writes["now"])
        writes["now"] = False

    sa.event.listen(engine, "before_cursor_execute", statement)
    sa.event.listen(engine, "commit", commit)

    def stats(x: float) -> LatencyStats:
        return LatencyStats(median=x, p90=x, iqr=0.0, cv=0.02, n=7, mean=x, min=x, max=x)

    times, per_writes, per_statements = [], [], []
    for i in range(args.n):
        w0, s0 = writes["n"], writes["statements"]
        t0 = time.perf_counter()
        p = driver.ask()
        if p.task is not None:
            ratio = 0.5 + (i % 7) / 10
            lat = LatencyResult(latency_ms=stats(8 * ratio), ratio_to_reference=stats(ratio),
                                reference=config.measure.reference,
                                reference_latency_ms=stats(8.0), runtime="eager",
                                settings=config.measure, device={"cpu": "bench"},
                                params=p.cost.params, macs=p.cost.macs)
            driver.tell(p.trial_number, EvalOutcome(
                ok=True, latency=lat, seconds=1.0,
                quality=QualityResult(signal="synflow", value=float(i), seconds=0.1)))
        times.append(time.perf_counter() - t0)
        per_writes.append(writes["n"] - w0)
        per_statements.append(writes["statements"] - s0)
    med = statistics.median(times) * 1e3
    print(f"{'storage':<12}{'candidates':>11}{'median ms':>11}{'p90 ms':>9}{'writes':>8}"
          f"{'statements':>12}")
    p90 = sorted(times)[int(0.9 * (len(times) - 1))] * 1e3
    kind = url.split(":")[0].split("+")[0]
    print(f"{kind:<12}{args.n:>11}{med:>11.1f}{p90:>9.1f}{statistics.median(per_writes):>8.0f}"
          f"{statistics.median(per_statements):>12.0f}")
    print(json.dumps({"storage": kind, "n": args.n, "median_ms": round(med, 2),
                      "p90_ms": round(p90, 2),
                      "write_transactions": statistics.median(per_writes),
                      "statements": statistics.median(per_statements)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
