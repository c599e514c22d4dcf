"""``fitnas trials``: a study's trials listed and one shown, from the search storage."""

from __future__ import annotations

import json

from test_search_local import tiny_config
from typer.testing import CliRunner

from search.evaluators.types import EvalOutcome, EvalTask
from search.local import run_search
from service.cli import app

runner = CliRunner()


def _fake(task: EvalTask) -> EvalOutcome:
    """Latency from MACs, quality from params: a pure function of the spec."""
    from svc_helpers import fake_outcome

    return EvalOutcome.model_validate(fake_outcome(task.model_dump(mode="json")))


def _search(tmp_path, trials: int = 5):
    url = f"sqlite:///{tmp_path}/fitnas.db"
    config = tiny_config(trials, max_latency_ms=0.9, max_params=40_000)
    return run_search(config, url, "tiny", tmp_path, progress=False, presets=[],
                      evaluate=_fake, export=False)


def test_trials_lists_and_shows(tmp_path):
    res = _search(tmp_path)
    out = runner.invoke(app, ["trials", "--out", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [r["number"] for r in rows] == list(range(5))
    measured = [r for r in rows if r["status"] in ("measured", "cached")]
    assert measured and all(r["latency_ms"] is not None for r in measured)
    assert {r["feasible"] for r in rows} <= {True, False}
    assert sum(r["feasible"] for r in rows) == res.result["counts"]["feasible"]
    table = runner.invoke(app, ["trials", "--out", str(tmp_path)])
    assert table.exit_code == 0 and "tiny: 5 trials" in table.output
    n = measured[0]["number"]
    one = runner.invoke(app, ["trials", "--out", str(tmp_path), "show", str(n)])
    assert one.exit_code == 0, one.output
    assert "architecture" in one.output and "stem" in one.output
    assert "latency_ms" in one.output and "params" in one.output


def test_trials_errors_are_one_line(tmp_path):
    out = runner.invoke(app, ["trials", "--out", str(tmp_path)])
    assert out.exit_code == 2 and out.output.startswith("error: no search database")
    _search(tmp_path, trials=2)
    out = runner.invoke(app, ["trials", "--out", str(tmp_path), "show", "7"])
    assert out.exit_code == 2 and "no trial 7" in out.output
    out = runner.invoke(app, ["trials", "--out", str(tmp_path), "--study", "nope"])
    assert out.exit_code == 2 and "no study 'nope'" in out.output and "tiny" in out.output
