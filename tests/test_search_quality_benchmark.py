"""The search-quality benchmark's pieces: the enumerated space, the Pareto front and
hypervolume against hand-computed values, and a replay through the real driver on a
synthetic table (the recorded table itself is read by the benchmark, not the tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import search_quality as sq  # noqa: E402
import table as tbl  # noqa: E402


def test_the_space_enumerates_to_128_distinct_networks():
    space = tbl.load_space()
    params = tbl.enumerate_space(space)
    assert len(params) == 128 == space.n_configurations()
    assert len({space.sample_params(p).hash for p in params}) == 128


def test_pareto_and_hypervolume_by_hand():
    points = [(0.5, 0.5), (0.7, 0.8), (0.4, 0.9), (0.6, 0.5)]
    assert sq.pareto(points) == [(0.6, 0.5), (0.7, 0.8)]
    # rectangles above chance (0.1) up to the reference ratio 1.0:
    # [0.1, 0.6] x [0.5, 1.0] and [0.6, 0.7] x [0.8, 1.0]
    assert sq.hypervolume(points, 1.0) == pytest.approx(0.5 * 0.5 + 0.1 * 0.2)
    assert sq.hypervolume([(0.05, 0.1)], 1.0) == 0.0  # below chance counts nothing


@pytest.fixture
def fake_table(tmp_path):
    path = tmp_path / "table.jsonl"
    lines = []
    for i, (net, spec, _) in enumerate(tbl.networks()):
        ratio = 0.2 + (i * 37 % 101) / 120
        acc = 0.2 + (i * 53 % 97) / 160
        lines.append({"id": net, "what": "latency", "ok": True, "compact": spec.to_compact(),
                      "spec_hash": spec.hash, "latency_ratio": ratio})
        lines.append({"id": net, "what": "shapes32/seed0", "ok": True,
                      "rungs": [[30, acc * 0.5], [60, acc * 0.8], [120, acc]],
                      "rung_seconds": [1.0, 2.0, 4.0]})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_replay_through_the_driver_with_and_without_pruning(fake_table):
    cands, refs = sq.load(fake_table)
    assert len(cands) == 128 and set(refs) == set(tbl.REFERENCES)
    plain = sq.replay(cands, "random", 0, 30, 1.5)
    pruned = sq.replay(cands, "random", 0, 30, 1.5, prune=True)
    assert len(plain["hv"]) == 30
    assert all(b >= a for a, b in zip(plain["hv"], plain["hv"][1:], strict=False))
    assert plain["train_seconds"] == 30 * 4.0  # every run to its last rung
    assert pruned["train_seconds"] < plain["train_seconds"]  # pruned runs stop early
    assert sq.trials_to_reach(plain["hv"], plain["hv"][9]) <= 10
