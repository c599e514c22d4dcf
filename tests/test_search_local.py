"""The embedded search end to end with the real isolated runner (tiny networks at 32x32,
short timing), and Ctrl-C / resume through the real command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from blocks.load import load_spec
from search.evaluators.types import MeasureSettings, QualitySettings
from search.local import run_search
from search.space import DesignSpace
from search.study import Budgets, SearchConfig

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY_YAML = """\
name: tiny
num_classes: 10
resolution: [32]
width_mult: [0.5, 1.0]
stem: {width: [8, 16]}
stages:
  - {kinds: [mbconv, ds, conv], stride: 2, width: [16, 32], depth: [1, 2], kernel: [3, 5]}
  - {kinds: [mbconv, bottleneck, shuffle], stride: 2, width: [32, 64], depth: [1, 2]}
"""

# Short timing: these tests check behaviour, not the figures.
QUICK = dict(rounds=3, min_run_time_s=0.02, threads=1, reference=None)


def tiny_config(trials: int, **budgets) -> SearchConfig:
    return SearchConfig(
        space=DesignSpace.from_text(TINY_YAML), target="cpu", trials=trials, seed=1,
        budgets=Budgets(**budgets), measure=MeasureSettings(**QUICK),
        quality=QualitySettings(signal="synflow"), timeout_s=120)


def test_tiny_search_end_to_end_and_resume_for_more_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/fitnas.db"
    config = tiny_config(3, max_latency_ms=500.0, max_params=40_000)
    res = run_search(config, url, "tiny", tmp_path / "out", progress=False,
                     presets=["mobilenet_v2@0.35"])
    data = json.loads(res.result_json.read_text())
    assert data["counts"]["trials"] == 3
    assert data["counts"]["measured"] + data["counts"]["over_budget"] + \
        data["counts"]["cached"] + data["counts"]["failed"] == 3
    assert data["budgets"] == {"max_latency_ms": 500.0, "max_params": 40_000}
    assert data["pareto"], "a 500 ms budget on 32x32 toy networks leaves feasible ones"
    for member in data["pareto"]:
        assert member["feasible"]
        assert member["latency_ms"] <= 500.0 and member["params"] <= 40_000
        assert all(v <= 0 for v in member["constraints"].values())
        assert member["quality"] > 0  # synflow of a real network
    winner = data["winner"]
    assert winner["number"] in {m["number"] for m in data["pareto"]}
    assert winner["quality"] == max(m["quality"] for m in data["pareto"])
    # exported in every format; the JSON export is the winner's spec
    for fmt in ("json", "pytorch", "torchscript", "onnx"):
        path = Path(data["exports"][fmt])
        assert path.is_file() and path.stat().st_size > 0, fmt
    assert load_spec(data["exports"]["json"]).hash == winner["spec_hash"]
    assert res.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ref = data["references"][0]
    assert ref["name"] == "mobilenet_v2@0.35" and ref["ok"] and ref["latency_ms"] > 0
    assert ref["resolution"] == 32

    # the same search with more trials resumes the study and does only the remainder
    more = run_search(tiny_config(4, max_latency_ms=500.0, max_params=40_000), url, "tiny",
                      tmp_path / "out", progress=False, presets=["mobilenet_v2@0.35"])
    assert more.resumed
    study = optuna.load_study(study_name="tiny", storage=url)
    assert len(study.trials) == 4
    assert more.result["counts"]["trials"] == 4
    # the reference came from the cache this time
    assert more.result["references"][0]["cached"] is True


def _search_cmd(tmp_path: Path, trials: int) -> list[str]:
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_YAML)
    return [sys.executable, "-m", "service.cli", "search", "--space", str(space),
            "--target", "cpu", "--max-latency-ms", "500", "--trials", str(trials),
            "--signal", "synflow", "--rounds", "3", "--min-run-time", "0.02",
            "--threads", "1", "--presets", "none", "--reference", "none",
            "--out", str(tmp_path / "out"), "--seed", "5"]


def _poll(path) -> list[tuple[str, bool]]:
    """(state, has its spec) of every trial, read from the search's SQLite file as it
    runs: a read-only connection with a busy timeout, so the poll never writes (opening
    an Optuna storage does) and a busy writer makes it wait instead of fail."""
    import sqlite3

    if not path.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return [(state, bool(has_spec)) for state, has_spec in conn.execute(
                "SELECT t.state, EXISTS (SELECT 1 FROM trial_user_attributes a "
                "WHERE a.trial_id = t.trial_id AND a.key = 'spec') FROM trials t")]
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the schema is not there yet
        return []


def _states(url: str) -> list[optuna.trial.FrozenTrial]:
    names = optuna.get_all_study_names(url)
    if not names:
        return []
    return optuna.load_study(study_name=names[0], storage=url).get_trials(deepcopy=False)


def test_ctrl_c_then_the_same_command_resumes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = _search_cmd(tmp_path, trials=3)
    url = f"sqlite:///{tmp_path}/out/fitnas.db"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # wait until one trial is done and the next is being evaluated, then Ctrl-C
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            trials = _poll(tmp_path / "out" / "fitnas.db")
            done = [st for st, _ in trials if st not in ("RUNNING", "WAITING")]
            running = [has_spec for st, has_spec in trials if st == "RUNNING"]
            if done and running and running[0]:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        else:
            pytest.fail("the search did not get to its second trial in time")
        proc.send_signal(signal.SIGINT)  # inside the evaluation (a warm one lasts < 1 s)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted after" in err and "run the same command again" in err
    assert "Traceback" not in err
    trials = _states(url)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.user_attrs.get("status") == "interrupted"]
    assert len(interrupted) == 1 and interrupted[0].state == TrialState.FAIL
    assert interrupted[0].user_attrs["fail_reason"] == "interrupted"

    # the same command again: resumes the same study and finishes the remainder
    proc = subprocess.run([*cmd, "--json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["counts"]["trials"] == 3
    assert result["counts"]["interrupted"] == 1
    assert len(optuna.get_all_study_names(url)) == 1
    trials = _states(url)
    assert len(trials) == 4  # three that count plus the interrupted one
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for member in result["pareto"]:
        assert member["latency_ms"] <= 500.0 and member["feasible"]


def test_ctrl_c_twice_exits_at_once_without_a_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(_search_cmd(tmp_path, trials=50), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any(st == "RUNNING" for st, _ in _poll(tmp_path / "out" / "fitnas.db")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no trial started in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # 130, or killed by the second SIGINT late in interpreter shutdown (where Python has
    # reset its handlers): a shell shows 130 for both
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_cli_refuses_bad_options_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    base = ["search", "--out", str(tmp_path / "o")]
    cases = [
        ([], "exactly one latency budget"),
        (["--max-latency-ms", "5", "--max-latency-ratio", "1"], "exactly one latency budget"),
        (["--max-latency-ms", "5", "--space", "nope"], "neither a built-in space"),
        (["--max-latency-ms", "5", "--sampler", "cmaes"], "--sampler must be"),
        (["--max-latency-ms", "5", "--signal", "magic"], "bad option"),
        (["--max-latency-ratio", "1", "--reference", "preset:nonet"], "unknown preset"),
        (["--max-latency-ratio", "1", "--reference", "none"], "needs a --reference"),
        (["--max-latency-ms", "5", "--resolution", "4"], "--resolution must be"),
        (["--max-latency-ms", "5", "--space", "mobilenet_v2", "--seed-spec",
          "preset:mnasnet@0.5"], "seed spec 1 (net_v1"),
        (["--max-latency-ms", "5", "--seed-spec", "preset:nonet"], "unknown preset"),
    ]
    runner = CliRunner()
    for args, fragment in cases:
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == 2, (args, result.output)
        assert fragment in result.stderr, (args, result.stderr)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "o").exists()  # nothing written for a refused command


def test_dashboard_refuses_a_missing_database(tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    result = CliRunner().invoke(app, ["dashboard", "--storage",
                                      f"sqlite:///{tmp_path}/none.db"])
    assert result.exit_code == 2
    assert "no search database" in result.stderr


@pytest.mark.slow
def test_done_when_default_space_30_trials_under_15_minutes(tmp_path):
    """The acceptance run: the default space, 30 trials, synflow, budget = MobileNetV2-0.5's
    median latency at 224 measured on this machine just before, under 15 minutes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    measure = subprocess.run(
        [sys.executable, "-m", "service.cli", "measure", "preset:mobilenet_v2@0.5", "--json"],
        env=env, capture_output=True, text=True, timeout=300)
    assert measure.returncode == 0, measure.stderr
    budget = json.loads(measure.stdout)["latency_ms"]["median"]
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "search", "--space", "default", "--target", "cpu",
         "--max-latency-ms", f"{budget:.3f}", "--trials", "30", "--signal", "synflow",
         "--out", str(tmp_path / "out"), "--json"],
        env=env, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert wall < 15 * 60, f"took {wall:.0f} s"
    assert result["counts"]["trials"] == 30
    assert result["pareto"], "no feasible architecture"
    for member in result["pareto"]:
        assert member["feasible"] and member["latency_ms"] <= float(f"{budget:.3f}")
        assert all(v <= 0 for v in member["constraints"].values())
    for fmt in ("json", "pytorch", "torchscript", "onnx"):
        assert Path(result["exports"][fmt]).is_file()


def _train_search(tmp_path: Path, pruner: str, rungs: str, trials: int
                  ) -> subprocess.CompletedProcess:
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_YAML)
    cmd = [sys.executable, "-m", "service.cli", "search", "--space", str(space),
           "--target", "cpu", "--max-latency-ms", "500", "--trials", str(trials),
           "--signal", "train", "--data", "digits", "--steps", "100", "--rungs", rungs,
           "--pruner", pruner, "--rounds", "3", "--min-run-time", "0.02", "--threads", "1",
           "--presets", "none", "--reference", "none", "--sampler", "random",
           "--out", str(tmp_path / "out"), "--seed", "3"]
    return subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=600)


def test_fitnas_search_trains_with_successive_halving_and_shows_the_pruned(tmp_path):
    """`fitnas search --signal train`: latency first, then seeded training on digits with
    a rung at 50 of 100 steps; the pruner's trials say where they stopped, and
    result.json counts them (training is deterministic on CPU, so this run is too)."""
    proc = _train_search(tmp_path, "successive_halving", "50", trials=6)
    assert proc.returncode == 0, proc.stderr
    pruned_lines = [ln for ln in proc.stderr.splitlines() if "(pruned)" in ln]
    assert pruned_lines and all("at step 50 of 100 (pruned)" in ln for ln in pruned_lines)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["counts"]["pruned"] == len(pruned_lines) >= 1
    assert result["counts"]["trials"] == 6
