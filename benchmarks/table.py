"""The recorded evaluation table behind benchmarks/search_quality.py and
benchmarks/signal_quality.py: every member of one small design space, measured once.

For each network of ``benchmarks/spaces/compact32.yaml`` (128 members, enumerated in a
fixed order) and for the three reference networks (MobileNetV2-0.35, MobileNetV2-0.5,
MobileNetV3-Small-0.75, built for 10 classes at 32x32), the recorder stores:

* ``latency``: the ratio to the reference network (MobileNetV2-0.5 at 32x32, timed
  interleaved A B A B in the same process by ``search.evaluators.latency``), one thread,
  batch 1, eager; a short protocol (3 rounds of 0.05 s) because the ratio, not the
  absolute time, is what is kept;
* ``proxies``: every zero-cost signal and params / MACs, with their CPU seconds;
* ``shapes32/seed<S>``: the multi-fidelity training recipe (:data:`RECIPE`) on shapes32,
  the validation accuracy at every rung and the seconds to reach it; seed 0 for every
  network, seed 1 for :data:`NOISE_NETWORKS` of them spread over the space (the
  seed-noise ceiling);
* ``digits/seed<S>``: the same recipe on digits for :data:`DIGITS_NETWORKS` of them.

The file is JSON lines, one measurement per line (``id``, ``what``, figures), appended as
soon as it is made: recording is resumable (measurements already in the file are
skipped) and several recorder processes may append to the same file.

    python benchmarks/table.py record --workers 2     # resumable
    python benchmarks/table.py status
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPACE = ROOT / "benchmarks" / "spaces" / "compact32.yaml"
TABLE = ROOT / "benchmarks" / "data" / "compact32_shapes32.jsonl"
RECIPE: dict[str, Any] = {"signal": "train", "steps": 120, "rungs": [30, 60, 120],
                          "batch": 32, "threads": 1}
REFERENCES = ("mobilenet_v2@0.35", "mobilenet_v2@0.5", "mobilenet_v3_small@0.75")
LATENCY_REFERENCE = "preset:mobilenet_v2@0.5"
PROXIES = ("synflow", "naswot", "grad_norm", "zico", "meco", "params", "macs")
NOISE_NETWORKS = 64
DIGITS_NETWORKS = 32
PROXY_BATCH = 64


# ---- the space, enumerated -------------------------------------------------------------


class _Path:
    """A TrialLike that takes the ``forced`` choice indices in order, then the first
    choice, and records how many choices each decision had."""

    def __init__(self, forced: list[int]):
        self.forced = forced
        self.counts: list[int] = []
        self.params: dict[str, Any] = {}

    def _pick(self, name: str, choices: list[Any]) -> Any:
        i = len(self.counts)
        self.counts.append(len(choices))
        value = choices[self.forced[i] if i < len(self.forced) else 0]
        self.params[name] = value
        return value

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._pick(name, list(choices))

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return self._pick(name, list(range(low, high + 1)))


def enumerate_space(space) -> list[dict[str, Any]]:
    """Every parameter assignment of ``space`` (conditional parameters included), in a
    fixed depth-first order."""
    out: list[dict[str, Any]] = []
    stack: list[list[int]] = [[]]
    while stack:
        forced = stack.pop()
        path = _Path(forced)
        space.sample(path)
        out.append(path.params)
        for j in range(len(path.counts) - 1, len(forced) - 1, -1):
            for k in range(path.counts[j] - 1, 0, -1):
                stack.append(forced + [0] * (j - len(forced)) + [k])
    return out


def load_space():
    from search.space import DesignSpace

    return DesignSpace.load(SPACE)


def networks() -> list[tuple[str, Any, dict[str, Any] | None]]:
    """(id, spec, space params) for the references then every member of the space."""
    from blocks.presets import preset

    space = load_space()
    out: list[tuple[str, Any, dict[str, Any] | None]] = []
    for ref in REFERENCES:
        name, _, width = ref.partition("@")
        out.append((ref, preset(name, float(width), num_classes=space.num_classes,
                                resolution=space.resolution[0]), None))
    for i, params in enumerate(enumerate_space(space)):
        out.append((f"c{i:03d}", space.sample_params(params), params))
    return out


# ---- reading ---------------------------------------------------------------------------


def read_table(path: Path = TABLE) -> dict[str, dict[str, Any]]:
    """id -> {what -> measurement} merged from every line of the file."""
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a killed recorder
        rows.setdefault(rec["id"], {})[rec["what"]] = rec
    return rows


def accuracy(rows: dict[str, Any], what: str, step: int | None = None) -> float | None:
    """Validation accuracy of one measurement at ``step`` (default: the last rung)."""
    rec = rows.get(what)
    if rec is None or not rec.get("ok", True):
        return None
    rungs = rec["rungs"]
    if step is None:
        return float(rungs[-1][1])
    for s, acc in rungs:
        if s == step:
            return float(acc)
    return None


# ---- recording -------------------------------------------------------------------------


def _plan(nets: list[tuple[str, Any, Any]]) -> Iterator[tuple[str, str]]:
    """What to measure, most useful first: the full table (latency, proxies, seed 0 for
    every network); then a second seed and digits for every 4th network (32 of them, an
    even spread over the enumeration order, which varies the width multiplier last);
    then the second seed for every 4th network from the third (64 in all)."""
    cands = [n for n, _, p in nets if p is not None]
    refs = [n for n, _, p in nets if p is None]
    for net in refs + cands:
        yield net, "latency"
        yield net, "proxies"
        yield net, "shapes32/seed0"
    spread = cands[::len(cands) // DIGITS_NETWORKS]
    for net in refs + spread:
        yield net, "shapes32/seed1"
    for net in spread:
        yield net, "digits/seed0"
        yield net, "digits/seed1"
    step = len(cands) // DIGITS_NETWORKS
    for net in cands[step // 2::step][: NOISE_NETWORKS - len(spread)]:
        yield net, "shapes32/seed1"


def _measure(spec, what: str) -> dict[str, Any]:
    from search.evaluators.types import MeasureSettings, QualitySettings

    if what == "latency":
        from search.evaluators.latency import measure_latency

        lat = measure_latency(spec, MeasureSettings(
            resolution=32, threads=1, rounds=3, min_run_time_s=0.05,
            reference=LATENCY_REFERENCE))
        return {"latency_ratio": lat.ratio_to_reference.median,
                "latency_ms": lat.latency_ms.median,
                "reference_latency_ms": lat.reference_latency_ms.median,
                "latency_cv": lat.latency_ms.cv, "contended": lat.contended}
    from search.evaluators.quality import evaluate_quality

    if what == "proxies":
        values: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        for signal in PROXIES:
            t = time.process_time()
            try:
                r = evaluate_quality(spec, QualitySettings(signal=signal, data="shapes32",
                                                           batch=PROXY_BATCH))
                values[signal] = r.value
            except ValueError as exc:
                values[signal] = None
                values[f"{signal}_error"] = str(exc)[:200]
            seconds[signal] = round(time.process_time() - t, 4)
        return {"values": values, "cpu_s": seconds}
    data, _, seed = what.partition("/seed")
    r = evaluate_quality(spec, QualitySettings(data=data, seed=int(seed), **RECIPE))
    return {"rungs": r.details["rungs"], "rung_seconds": r.details["rung_seconds"],
            "value": r.value}


def record(workers: int, worker: int | None, path: Path, deadline: float | None) -> int:
    """Measure what the table lacks. With ``--workers N`` this process starts N-1 more
    (each takes every N-th missing measurement)."""
    if worker is None and workers > 1:
        import subprocess

        procs = [subprocess.Popen([sys.executable, __file__, "record", "--workers",
                                   str(workers), "--worker", str(w), "--table", str(path)]
                                  + (["--until", str(deadline)] if deadline else []))
                 for w in range(workers)]
        return max(p.wait() for p in procs)
    import torch

    torch.set_num_threads(1)
    nets = networks()
    specs = {n: s for n, s, _ in nets}
    params = {n: p for n, _, p in nets}
    have = read_table(path)
    todo = [(n, w) for n, w in _plan(nets) if w not in have.get(n, {})]
    mine = todo if worker is None else todo[worker::workers]
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"worker {worker}: {len(mine)} of {len(todo)} missing measurements", flush=True)
    with open(path, "a", encoding="utf-8") as fh:
        for k, (net, what) in enumerate(mine):
            if deadline is not None and time.time() > deadline:
                print(f"worker {worker}: deadline reached after {k}", flush=True)
                break
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"id": net, "what": what, "ok": True}
            if what == "latency":
                spec = specs[net]
                rec.update(compact=spec.to_compact(), spec_hash=spec.hash,
                           space_params=params[net])
            try:
                rec.update(_measure(specs[net], what))
            except Exception as exc:  # a network that cannot be evaluated: recorded so
                rec.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            rec["loadavg"] = [round(v, 2) for v in os.getloadavg()]
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
            fh.flush()
            print(f"worker {worker}: {k + 1}/{len(mine)} {net} {what} "
                  f"{rec['seconds']:.1f} s", flush=True)
    return 0


def status(path: Path) -> int:
    nets = networks()
    have = read_table(path)
    plan = list(_plan(nets))
    done = sum(1 for n, w in plan if w in have.get(n, {}))
    print(f"{path}: {done}/{len(plan)} measurements")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["record", "status"])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--table", type=Path, default=TABLE)
    ap.add_argument("--until", type=float, default=None,
                    help="stop starting measurements after this Unix time")
    args = ap.parse_args(argv)
    if args.command == "status":
        return status(args.table)
    return record(args.workers, args.worker, args.table, args.until)


if __name__ == "__main__":
    sys.exit(main())
