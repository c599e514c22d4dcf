"""The command line as a new user meets it: each mistake is one ``error:`` line and a
non-zero exit before any work starts, never a traceback."""

from __future__ import annotations

import os
import socket

import pytest
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()
SEARCH = ["search", "--trials", "1", "--max-latency-ms", "5", "--presets", "none"]


def _error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("storage", "says"), [
    ("sqlite:////nonexistent-fitnas-dir/sub/x.db", "does not exist"),
    ("postgres://postgres@127.0.0.1:5432/test", "'postgresql', not 'postgres'"),
    ("mysql+nodriver://u@h/db", "dialect"),
    ("not a url", "is not a database URL"),
])
def test_search_storage_mistakes(tmp_path, storage, says):
    line = _error_line(runner.invoke(app, [*SEARCH, "--storage", storage,
                                           "--out", str(tmp_path)]))
    assert says in line
    assert not os.path.exists("/nonexistent-fitnas-dir")


def test_search_storage_server_not_listening(tmp_path):
    url = f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/test"
    line = _error_line(runner.invoke(app, [*SEARCH, "--storage", url,
                                           "--out", str(tmp_path)]))
    assert line.startswith("error: cannot connect to the storage") and "refused" in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_search_on_a_missing_gpu_fails_before_the_first_trial(tmp_path):
    line = _error_line(runner.invoke(app, [*SEARCH, "--device", "cuda",
                                           "--out", str(tmp_path)]))
    assert "no CUDA GPU" in line
    assert not (tmp_path / "fitnas.db").exists()


def test_dashboard_warns_when_bound_beyond_localhost(tmp_path, monkeypatch):
    import optuna_dashboard

    db = tmp_path / "fitnas.db"
    import optuna

    optuna.create_study(storage=f"sqlite:///{db}", study_name="s")
    served = {}
    monkeypatch.setattr(optuna_dashboard, "run_server",
                        lambda storage, host, port, artifact_store=None:
                        served.update(host=host, port=port))
    result = runner.invoke(app, ["dashboard", "--storage", f"sqlite:///{db}",
                                 "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    assert "warning: optuna-dashboard has no authentication" in result.output
    assert served == {"host": "0.0.0.0", "port": 8080}
    quiet = runner.invoke(app, ["dashboard", "--storage", f"sqlite:///{db}"])
    assert "warning" not in quiet.output


def test_dashboard_on_a_missing_database(tmp_path):
    line = _error_line(runner.invoke(app, ["dashboard", "--storage",
                                           f"sqlite:///{tmp_path}/none.db"]))
    assert "no search database" in line


@pytest.mark.parametrize(("name", "magic"), [("x.onnx", b"\x08"), ("x.py", b'"""'),
                                             ("x.json", b"{"), ("x.pt", b"PK")])
def test_export_format_from_the_extension(tmp_path, name, magic):
    out = tmp_path / name
    result = runner.invoke(app, ["arch", "export", "preset:mobilenet_v2@0.35", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(magic)


def test_export_unknown_extension_needs_a_format(tmp_path):
    line = _error_line(runner.invoke(app, ["arch", "export", "preset:mobilenet_v2@0.35",
                                           "-o", str(tmp_path / "x.bin")]))
    assert "--format" in line


def test_reference_file_is_read_on_the_command_line(tmp_path):
    """A person may name a JSON file as the reference; it is read here and sent on as
    inline JSON, because no setting that travels to a worker is ever a path."""
    from blocks import preset
    from service.cli.common import spec_text_or_fail

    f = tmp_path / "ref.json"
    f.write_text(preset("mobilenet_v2", 0.35).model_dump_json())
    text = spec_text_or_fail(str(f))
    assert text.startswith("{") and str(tmp_path) not in text
    assert spec_text_or_fail("preset:mobilenet_v2@0.5") == "preset:mobilenet_v2@0.5"


def test_search_takes_its_options_from_a_config_file(tmp_path, monkeypatch):
    import search.local

    seen = {}

    def fake_run(config, storage, study, out, **kw):
        seen.update(config=config, storage=storage, out=out)
        raise SystemExit(0)

    monkeypatch.setattr(search.local, "run_search", fake_run)
    cfg = tmp_path / "search.yaml"
    cfg.write_text("space: default\ntrials: 2\nmax-latency-ratio: 0.9\nsignal: none\n"
                   "threads: 1\npresets: none\nseed-spec: ['preset:mobilenet_v2@0.35']\n")
    result = runner.invoke(app, ["search", "--config", str(cfg), "--trials", "3",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.trials == 3  # the flag overrides the file
    assert config.budgets.max_latency_ratio == 0.9
    assert config.quality.signal == "none" and config.measure.threads == 1
    assert len(config.seed_specs) == 1
    cfg.write_text("max_latency_ration: 1.0\n")
    line = _error_line(runner.invoke(app, ["search", "--config", str(cfg)]))
    assert "unknown option 'max_latency_ration'" in line and "max-latency-ratio" in line
    line = _error_line(runner.invoke(app, ["search", "--config", str(tmp_path / "no.yaml")]))
    assert "No such file" in line


def test_an_impossible_cost_budget_is_refused_before_the_first_trial(tmp_path):
    line = _error_line(runner.invoke(app, [*SEARCH, "--max-params", "10",
                                           "--out", str(tmp_path)]))
    assert "--max-params 10" in line and "the smallest has" in line
    assert not (tmp_path / "fitnas.db").exists()


def test_unreachable_budgets_never_refuses_a_reachable_one():
    """Any network the space can produce sets budgets that are never refused."""
    import optuna

    from blocks.cost import estimate_cost
    from search.feasibility import unreachable_budgets
    from search.space import DesignSpace

    space = DesignSpace.load("default")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(8):
        cost = estimate_cost(space.sample(study.ask()))
        limits = {"params": cost.params, "macs": cost.macs,
                  "activation_bytes": cost.activation_bytes}
        assert unreachable_budgets(space, limits) is None
    assert "--max-macs 1,000" in unreachable_budgets(space, {"macs": 1000})


ROWS = [{"number": i, "quality": 40.0 + i, "latency_ratio": 0.5 + i / 10,
         "latency_ms": 10.0 + i, "latency_p90_ms": 11.0 + i, "params": 1_234_567 * (i + 1),
         "macs": 98_765_432, "activation_bytes": 2**20, "contended": i % 2,
         "summary": "r224 stem32 " + " ".join(f"mbconvx{k}:{16 * k}" for k in range(1, 8)),
         "latency_objective": "latency_ratio"} for i in range(4)]


@pytest.mark.parametrize("width", [80, 100, 200])
def test_pareto_table_fits_the_terminal(width):
    from rich.console import Console

    from search.report import pareto_table

    console = Console(width=width, record=True)
    console.print(pareto_table(ROWS, 2, width=width))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(ln.rstrip()) for ln in lines) <= width
    # one line per member: nothing wrapped mid-cell
    assert sum(1 for ln in lines if ln.startswith("│")) == len(ROWS)
    assert ("architecture" in text) == (width >= 200)


def test_summary_says_when_a_reference_beats_the_winner():
    from service.cli.search import reference_notes

    r = {"budgets": {"max_latency_ratio": 1.0},
         "references": [{"name": "mobilenet_v2@0.5", "ok": True, "latency_ratio": 0.99,
                         "quality": 53.5},
                        {"name": "mnasnet@0.5", "ok": True, "latency_ratio": 1.2,
                         "quality": 90.0}]}
    [note] = reference_notes(r, {"quality": 41.7})
    assert "mobilenet_v2@0.5" in note and "higher quality (53.5)" in note
    assert reference_notes(r, {"quality": 60.0}) == []
    [none] = reference_notes(r, None)
    assert "no searched network did" in none
