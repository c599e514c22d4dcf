"""A device worker needs only ``fitnas[worker]``: the worker client, the CLI and the
evaluators must import and run with the web stack, the database layer and Optuna absent.

The packages outside ``fitnas[worker]`` are blocked by a ``sitecustomize`` module placed
first on PYTHONPATH, so the block also holds in every child process (the isolated
evaluation runs in one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top-level modules that only fitnas[search] / fitnas[server] bring in.
BLOCKED = (
    "fastapi",
    "starlette",
    "sqlalchemy",
    "optuna",
    "optuna_dashboard",
    "alembic",
    "uvicorn",
    "psycopg",
    "psycopg2",
    "pydantic_settings",
    "prometheus_client",
    "matplotlib",
    "yaml",
)

_SITECUSTOMIZE = textwrap.dedent(
    """
    import sys

    _BLOCKED = {blocked!r}

    class _BlockServerPackages:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _BLOCKED:
                raise ModuleNotFoundError(
                    f"{{name}} is blocked: not part of fitnas[worker]", name=name
                )
            return None

    sys.meta_path.insert(0, _BlockServerPackages())
    """
)


def worker_only_env(tmp_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which Python cannot import anything outside fitnas[worker]."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    (tmp_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(blocked=BLOCKED))
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(tmp_dir), str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def _run(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=timeout,
    )


def test_blocker_really_blocks(tmp_path):
    proc = _run("import sqlalchemy", worker_only_env(tmp_path / "site"))
    assert proc.returncode != 0
    assert "not part of fitnas[worker]" in proc.stderr


def test_worker_and_cli_import_without_server_packages(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        import service.worker, service.cli, service.protocol
        import service.worker.client, service.worker.keeper, service.worker.loop
        import search.evaluators
        import search.evaluators.types
        import search.evaluators.runner, search.evaluators.fingerprint
        leaked = sorted({{m.split(".")[0] for m in sys.modules}} & set({BLOCKED!r}))
        assert not leaked, leaked
        sys.argv = ["fitnas", "worker", "--help"]
        service.cli.main()
        """
    )
    proc = _run(code, worker_only_env(tmp_path / "site"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for option in ("--server", "--target", "--token", "--device", "--runtime", "--name",
                   "--data-sources", "FITNAS_WORKER_TOKEN"):
        assert option in proc.stdout, option


def test_fitnas_worker_help_console_script(tmp_path):
    """The installed ``fitnas`` entry point, as a worker image runs it."""
    env = worker_only_env(tmp_path / "site")
    env["COLUMNS"] = "200"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--help"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--data-sources" in proc.stdout


@pytest.mark.slow
def test_isolated_evaluation_without_server_packages(tmp_path):
    """The evaluation path itself (runner -> child process -> latency + quality) runs in a
    worker-only installation. (The default run covers it too: the end-to-end test runs its
    worker under the same block.)"""
    code = textwrap.dedent(
        """
        from blocks import preset
        from search.evaluators.runner import evaluate
        from search.evaluators.types import EvalTask, MeasureSettings, QualitySettings
        spec = preset("mobilenet_v2", 0.25)
        task = EvalTask(
            spec=spec.model_dump(mode="json"),
            measure=MeasureSettings(resolution=32, reference=None, min_run_time_s=0.01,
                                    rounds=3, threads=1),
            quality=QualitySettings(signal="synflow", batch=4, resolution=32),
            timeout_s=120,
        )
        out = evaluate(task, isolated=True)
        assert out.ok, out.failure
        assert out.latency.latency_ms.median > 0
        print("median_ms", out.latency.latency_ms.median)
        """
    )
    proc = _run(code, worker_only_env(tmp_path / "site"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "median_ms" in proc.stdout
