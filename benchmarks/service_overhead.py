"""What the service adds per candidate: API + scheduler + PostgreSQL, nothing measured.

A real ``fitnas serve`` (its scheduler included) runs on a fresh PostgreSQL database made
for the run (and dropped after it). A worker in this process speaks the real protocol
(``service.worker.client.ApiClient``): it leases a task, spends ``--task-s`` seconds
(1 s) as if measuring, reports a plausible result, and leases the next. Jobs of
``--trials`` trials on the default space (TPE, a latency-ratio budget) at parallelism 2
(a job's default) and 1. Per candidate:

- ``result_ms``: the result POST, from sending it to its 200;
- ``next_lease_ms``: from the result's 200 to the next task leased;
- ``overhead_ms``: from one lease to the next minus ``--task-s`` (median, p90, mean):
  everything the service adds (the result, the scheduler's tell and ask, the lease,
  the database).

    python3 benchmarks/service_overhead.py --trials 40
    python3 benchmarks/service_overhead.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test

Prints a table; the last line is one JSON object of the key figures.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from search.evaluators.stats import median  # noqa: E402

DEFAULT_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TARGET = "bench-cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _p90(values: list[float]) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))]


@contextlib.contextmanager
def fresh_database(server_url: str):
    """A new database on the server of ``server_url``; dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"fitnas_bench_{uuid.uuid4().hex[:8]}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _fitnas(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", "service.cli", *args], env=env,
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"error: fitnas {' '.join(args[:2])} failed: "
                         f"{(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    return out.stdout.strip()


@contextlib.contextmanager
def server(database_url: str, log: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FITNAS_")}
    env.update(FITNAS_DATABASE_URL=database_url, PYTHONUNBUFFERED="1",
               FITNAS_ARTIFACT_DIR=str(log.parent / "artifacts"))
    _fitnas(["db", "upgrade"], env)
    key = _fitnas(["admin", "create-key", "--name", "bench"], env).splitlines()[-1]
    port = _free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host",
                                 "127.0.0.1", "--port", str(port)], env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: fitnas serve did not become ready (log: {log})")
            time.sleep(0.2)
        yield base, key, env
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _outcome(task, task_s: float):
    """A plausible successful result: latency from the spec's MACs, ratio against a
    made-up reference, quality from its parameters (a pure function of the spec)."""
    from blocks.cost import estimate_cost
    from blocks.spec import ArchSpec
    from search.evaluators.types import EvalOutcome, EvalTask

    task = EvalTask.model_validate(task)
    spec = ArchSpec.model_validate(task.spec)
    cost = estimate_cost(spec)
    ms = 0.5 + cost.macs / 2e7

    def stats(x: float) -> dict:
        return {"median": x, "p90": x * 1.05, "iqr": x * 0.02, "cv": 0.01, "n": 9,
                "mean": x, "min": x * 0.97, "max": x * 1.1}

    return EvalOutcome.model_validate({
        "ok": True, "seconds": task_s,
        "latency": {"latency_ms": stats(ms), "ratio_to_reference": stats(ms / 5.0),
                    "reference": task.measure.reference, "reference_latency_ms": stats(5.0),
                    "runtime": task.measure.runtime,
                    "settings": task.measure.model_dump(mode="json"),
                    "device": {"cpu": "bench"}, "params": cost.params, "macs": cost.macs},
        "quality": {"signal": "synflow", "value": cost.params / 1e5, "seconds": 0.0},
    })


def run_job(base: str, key: str, env: dict[str, str], trials: int, parallelism: int,
            task_s: float) -> dict:
    import httpx

    from service.protocol import REGISTER_PATH, WorkerRegister
    from service.worker.client import ApiClient

    # a target of its own per job: neither the measurement cache nor the target's latency
    # predictor (both shared by a target's jobs) answer for one job from another's results
    target = f"{TARGET}-p{parallelism}-{uuid.uuid4().hex[:4]}"
    token = _fitnas(["admin", "create-worker-token", "--target", target], env).splitlines()[-1]
    user = {"Authorization": f"Bearer {key}"}
    api = ApiClient(base, token)
    r = api.send(REGISTER_PATH, WorkerRegister(target=target, name="bench", device="cpu",
                                               runtimes=["eager"], fingerprint={}))
    r.raise_for_status()
    worker_id = r.json()["worker_id"]
    body = {"name": f"overhead p{parallelism}", "target": target, "space": "default",
            "trials": trials, "parallelism": parallelism, "sampler": "tpe", "seed": 0,
            "quality": {"signal": "synflow"},
            "measure": {"threads": 1},
            "budgets": {"max_latency_ratio": 1.0}}
    job = httpx.post(f"{base}/v1/jobs", json=body, headers=user, timeout=30)
    if job.status_code != 201 and job.status_code != 200:
        raise SystemExit(f"error: the job was refused: {job.status_code} {job.text[:300]}")
    job_id = job.json()["id"]
    result_ms: list[float] = []
    next_ms: list[float] = []
    leased_at: list[float] = []
    done = 0
    t_reported = None
    while True:
        lease = api.lease(worker_id, target, 5.0)
        now = time.perf_counter()
        if lease is None:
            state = httpx.get(f"{base}/v1/jobs/{job_id}", headers=user, timeout=30).json()
            if state["status"] not in ("queued", "running"):
                break
            continue
        leased_at.append(now)
        if t_reported is not None:
            next_ms.append((now - t_reported) * 1e3)
        outcome = _outcome(lease.task, task_s)  # the worker's own time: inside task_s
        time.sleep(max(0.0, task_s - (time.perf_counter() - now)))
        t0 = time.perf_counter()
        api.result(lease.task_id, lease.lease_token, outcome)
        t_reported = time.perf_counter()
        result_ms.append((t_reported - t0) * 1e3)
        done += 1
        print(f"  p{parallelism} #{done:<3} result {result_ms[-1]:6.1f} ms"
              + (f"  next lease {next_ms[-1]:6.1f} ms" if next_ms else ""), flush=True)
    # a candidate's cycle: from its lease to the next lease (the worker's own seconds, the
    # result, the tell and the next ask); what is over task_s is the service's
    over = [(b - a - task_s) * 1e3 for a, b in itertools.pairwise(leased_at)]
    return {"parallelism": parallelism, "candidates": done,
            "overhead_ms": round(median(over), 1) if over else None,
            "overhead_p90_ms": round(_p90(over), 1) if over else None,
            "overhead_mean_ms": round(sum(over) / len(over), 1) if over else None,
            "result_ms": round(median(result_ms), 1), "result_p90_ms": round(_p90(result_ms), 1),
            "next_lease_ms": round(median(next_ms), 1) if next_ms else None,
            "next_lease_p90_ms": round(_p90(next_ms), 1) if next_ms else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--task-s", type=float, default=1.0, help="seconds a task 'measures'")
    ap.add_argument("--parallelism", default="2,1", help="comma-separated (2,1)")
    ap.add_argument("--database-url", default=os.environ.get("FITNAS_TEST_POSTGRES_URL",
                                                             DEFAULT_SERVER),
                    help="a PostgreSQL server URL; a fresh database is made on it")
    args = ap.parse_args()
    try:
        levels = [int(p) for p in args.parallelism.split(",") if p.strip()]
    except ValueError:
        ap.exit(2, f"error: --parallelism takes integers, got {args.parallelism!r}\n")
    if args.trials < 2 or args.task_s < 0 or not levels or min(levels) < 1:
        ap.exit(2, "error: --trials >= 2, --task-s >= 0, --parallelism >= 1\n")
    if not args.database_url.startswith("postgresql"):
        ap.exit(2, "error: --database-url must be a PostgreSQL URL (postgresql+psycopg://...)\n")
    from search.evaluators import fingerprint as fp

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="fitnas-overhead-"))
    with fresh_database(args.database_url) as url, server(url, tmp / "serve.log") as (
            base, key, env):
        for p in levels:
            rows.append(run_job(base, key, env, args.trials, p, args.task_s))
    print()
    print(f"{'parallelism':>11} {'n':>4} {'result POST':>12} {'result -> next lease':>21} "
          f"{'overhead per candidate (p90, mean)':>35}")
    for r in rows:
        print(f"{r['parallelism']:>11} {r['candidates']:>4} "
              f"{r['result_ms']:>7.1f} ms   {r['next_lease_ms'] or 0:>9.1f} ms "
              f"(p90 {r['next_lease_p90_ms'] or 0:.0f})  {r['overhead_ms'] or 0:>9.1f} ms "
              f"({r['overhead_p90_ms'] or 0:.0f}, {r['overhead_mean_ms'] or 0:.0f})")
    print(json.dumps({"rows": rows, "loadavg": [round(load0, 2), round(os.getloadavg()[0], 2)],
                      "cores": fp.logical_cores(),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
