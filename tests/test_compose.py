"""docker-compose.yml and the Dockerfile: Docker does not run here, so check what can be
checked without it: the file parses, the services are wired as designed, and every command
line that compose (or an image's CMD) runs is accepted by our real CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import typer
from pydantic import ValidationError
from service_harness import ROOT, exe, interpolate, load_compose

# typer (0.29+) carries its own copy of click: take the exception class from it. Values
# are coerced by pydantic there; the CLI shows its ValidationError as "Invalid value".
UsageError = type(typer.BadParameter("x")).__mro__[1]
assert UsageError.__name__ == "UsageError"
Refused = (UsageError, ValidationError)

FITNAS_IMAGE_SERVICES = {"migrate", "api", "dashboard", "worker-cpu", "worker-cuda"}


@pytest.fixture(scope="module")
def compose():
    return load_compose()


def _commands(compose) -> dict[str, list[str]]:
    out = {}
    for name, svc in compose["services"].items():
        if "command" in svc:
            cmd = svc["command"]
            assert isinstance(cmd, list), f"{name}: use the exec (list) form"
            out[name] = [interpolate(str(a), {}) for a in cmd]
    return out


def _dockerfile_cmds() -> dict[str, list[str]]:
    """Each stage's CMD (exec form) in the Dockerfile."""
    stage, out = None, {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        m = re.match(r"FROM\s+\S+\s+AS\s+(\w+)", line, re.I)
        if m:
            stage = m.group(1)
        m = re.match(r"CMD\s+(\[.*\])\s*$", line)
        if m:
            out[stage] = json.loads(m.group(1))
    return out


def test_services_are_wired_as_designed(compose):
    s = compose["services"]
    assert {"postgres", "migrate", "api", "worker-cpu", "worker-cuda", "dashboard"} <= set(s)
    # postgres: healthcheck; migrate waits for it, runs once
    assert "pg_isready" in " ".join(s["postgres"]["healthcheck"]["test"])
    assert s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert s["migrate"]["restart"] == "no"
    assert s["migrate"]["command"][:3] == ["fitnas", "db", "upgrade"]
    # api and dashboard start after the migration completed
    for name in ("api", "dashboard"):
        assert s[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert s["api"]["command"][:2] == ["fitnas", "serve"]
    assert "/readyz" in " ".join(s["api"]["healthcheck"]["test"])
    # workers: HTTP only, the token from the environment, never DB credentials
    for name in ("worker-cpu", "worker-cuda"):
        svc = s[name]
        assert svc["command"][:2] == ["fitnas", "worker"]
        assert "--token" not in svc["command"]
        assert "FITNAS_WORKER_TOKEN" in svc["environment"]
        env = " ".join(f"{k}={v}" for k, v in svc["environment"].items())
        assert "DATABASE" not in env and "postgres" not in env
        assert svc["build"]["target"] == "worker"
        grace = float(svc["command"][svc["command"].index("--grace") + 1])
        assert int(svc["stop_grace_period"].rstrip("s")) > grace
    # the CUDA worker is opt-in and reserves a GPU
    cuda = s["worker-cuda"]
    assert cuda["profiles"] == ["cuda"]
    dev = cuda["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert "--device" in cuda["command"] and "cuda:0" in cuda["command"]
    assert "profiles" not in s["worker-cpu"]
    # the dashboard (no auth) is bound to localhost, on the same storage as the API
    assert all(str(p).startswith("127.0.0.1:") for p in s["dashboard"]["ports"])
    # ... on the same database as the API, as the read-only role the migrate step makes
    from sqlalchemy.engine import make_url

    storage = make_url(s["dashboard"]["environment"]["FITNAS_DASHBOARD_STORAGE_URL"])
    api_db = make_url(s["api"]["environment"]["FITNAS_OPTUNA_STORAGE_URL"])
    assert (storage.host, storage.database) == (api_db.host, api_db.database)
    migrate = s["migrate"]["command"]
    assert storage.username == migrate[migrate.index("--readonly-role") + 1]
    assert "FITNAS_READONLY_PASSWORD" in s["migrate"]["environment"]
    # the API and migrate see the same settings (migrate also the role's password)
    menv = dict(s["migrate"]["environment"])
    menv.pop("FITNAS_READONLY_PASSWORD")
    assert s["api"]["environment"] == menv
    # no password on any command line
    for name, svc in s.items():
        assert not any("@" in str(a) and ":" in str(a) for a in svc.get("command") or []), name
    # every fitnas service says how to build its image (never pulled from a registry)
    for name in FITNAS_IMAGE_SERVICES:
        want = "worker" if name.startswith("worker") else "api"
        assert s[name]["build"]["target"] == want, name
        assert s[name]["image"].startswith("fitnas-"), name
    for name, svc in s.items():
        for dep in svc.get("depends_on", {}):
            assert dep in s, f"{name} depends on unknown service {dep}"
    assert set(compose["volumes"]) >= {"pgdata"}


def test_deployment_details(compose):
    """Compose v2 is said; healthchecks everywhere; workers wait for a healthy API and a
    bootstrapped token (read from a file, so no restart loop); latency workers pinned to
    cores, never a CPU quota; the CUDA image has ONNX Runtime's GPU package."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert "name" in compose and "Compose v2" in text
    s = compose["services"]
    for name in ("worker-cpu", "worker-cuda", "worker-trainer", "dashboard", "api",
                 "postgres"):
        assert s[name]["healthcheck"]["test"], name
    for name, boot in (("worker-cpu", "bootstrap"), ("worker-cuda", "bootstrap-cuda"),
                       ("worker-trainer", "bootstrap-trainer")):
        svc = s[name]
        assert svc["depends_on"]["api"]["condition"] == "service_healthy"
        assert svc["depends_on"][boot]["condition"] == "service_completed_successfully"
        token_file = interpolate(svc["environment"]["FITNAS_WORKER_TOKEN_FILE"], {})
        cmd = s[boot]["command"]
        assert cmd[:3] == ["fitnas", "admin", "create-worker-token"]
        assert cmd[cmd.index("--write-to") + 1] == token_file
        assert cmd[cmd.index("--target") + 1] == svc["command"][svc["command"].index(
            "--target") + 1]
        health = svc["environment"]["FITNAS_WORKER_HEALTH_FILE"]
        assert health in " ".join(svc["healthcheck"]["test"])
        assert "cpus" not in svc and "cpu_quota" not in svc
    assert "cpuset" in s["worker-cpu"] and "CFS" in text
    # the trainer profile: a trainer token, a worker that runs as a trainer
    assert s["worker-trainer"]["profiles"] == ["trainer"] == s["bootstrap-trainer"]["profiles"]
    boot = s["bootstrap-trainer"]["command"]
    assert boot[boot.index("--role") + 1] == "trainer"
    cmd = s["worker-trainer"]["command"]
    assert cmd[cmd.index("--role") + 1] == "trainer"
    assert s["worker-cuda"]["build"]["args"]["ONNXRUNTIME_PACKAGE"] == "onnxruntime-gpu"
    assert "ONNXRUNTIME_PACKAGE" in (ROOT / "Dockerfile").read_text()


def test_interpolation_defaults(compose):
    url = compose["services"]["api"]["environment"]["FITNAS_DATABASE_URL"]
    assert interpolate(url, {}) == "postgresql+psycopg://fitnas:fitnas@postgres:5432/fitnas"
    assert interpolate(url, {"POSTGRES_PASSWORD": "s3"}).startswith("postgresql+psycopg://fitnas:s3@")
    assert interpolate("a$$b ${X-d} ${Y:-e}", {"X": "", "Y": ""}) == "a$b  e"
    with pytest.raises(KeyError):
        interpolate("${NEED:?set it}", {})


def test_dockerfile_stages_and_installs():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, re.M | re.I)
    assert stages == ["base", "worker", "api"]
    assert re.search(r'torch==\$\{TORCH_VERSION\}"?\s+--index-url', text)
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    worker = text.split("AS worker", 1)[1].split("FROM ", 1)[0]
    api = text.split("AS api", 1)[1]
    assert 'pip install ".[worker]"' in worker and "[server]" not in worker
    assert 'pip install ".[server]"' in api
    for stage in (worker, api):
        assert "USER fitnas" in stage
    # everything the images COPY exists, and .dockerignore keeps none of it out
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), part
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for needed in ("blocks", "search", "service", "migrations", "pyproject.toml", "README.md"):
        assert needed not in ignored


def _parse_with_cli(argv: list[str]) -> list[str]:
    """Parse ``fitnas ARGS`` with the real command tree, down to the leaf command,
    without running it. Returns the command path; raises UsageError on bad args."""
    from service.cli import app

    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("fitnas", list(argv[1:]))
    path = ["fitnas"]
    while hasattr(cmd, "resolve_command"):  # a group: descend to the sub-command
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, sub, args = cmd.resolve_command(ctx, rest)
        assert sub is not None, f"unknown command {rest[:1]}"
        path.append(name)
        ctx = sub.make_context(name, list(args), parent=ctx)
        cmd = sub
    return path


def _fitnas_commands(compose) -> list[tuple[str, list[str]]]:
    out = [(n, c) for n, c in _commands(compose).items() if c[0] == "fitnas"]
    out += [(f"Dockerfile:{stage}", c) for stage, c in _dockerfile_cmds().items()
            if c[0] == "fitnas"]
    return out


def test_every_fitnas_command_line_parses(compose, monkeypatch):
    cmds = _fitnas_commands(compose)
    names = {n for n, _ in cmds}
    assert {"migrate", "api", "worker-cpu", "worker-cuda", "Dockerfile:api"} <= names
    for name, argv in cmds:
        if argv[1:] == ["worker", "--help"]:
            continue  # the worker image's default CMD: help only
        try:
            path = _parse_with_cli(argv)
        except Refused as exc:
            pytest.fail(f"{name}: {' '.join(argv)!r} is refused by the CLI: {exc}")
        assert path[1] == argv[1], name
    # and the parser really refuses nonsense
    with pytest.raises(UsageError, match="no-such-option"):
        _parse_with_cli(["fitnas", "worker", "--server", "http://x", "--target", "c",
                         "--no-such-option"])
    with pytest.raises(Refused, match="integer"):
        _parse_with_cli(["fitnas", "serve", "--port", "not-a-number"])


def test_every_command_is_in_the_real_help(compose):
    """Each command path's ``--help`` (run like the image runs it) lists every option
    the compose file passes."""
    for name, argv in _fitnas_commands(compose):
        # the command path is the leading non-option words
        words = []
        for a in argv[1:]:
            if a.startswith("-"):
                break
            words.append(a)
        proc = subprocess.run(
            exe(["fitnas", *words, "--help"]), capture_output=True, text=True, cwd=ROOT,
            env={"COLUMNS": "250", "PATH": "/usr/bin:/bin", "HOME": str(ROOT)}, timeout=120,
        )
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
        for opt in (a for a in argv if a.startswith("--") and a != "--help"):
            assert opt in proc.stdout, f"{name}: {opt} not in `fitnas {' '.join(words)} --help`"


def test_dashboard_command_matches_the_fitnas_cli(compose):
    argv = _commands(compose)["dashboard"]
    assert argv[:2] == ["fitnas", "dashboard"]
    proc = subprocess.run(
        exe(["fitnas", "dashboard", "--help"]), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for opt in (a for a in argv if a.startswith("--")):
        assert opt in proc.stdout, opt
    port = argv[argv.index("--port") + 1]
    assert port.isdigit() and f":{port}" in compose["services"]["dashboard"]["ports"][0]


def test_python_minus_m_matches_console_script():
    """The tests run ``python -m service.cli`` where the images run ``fitnas``: the
    console script must point at the same function."""
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert eps.get("fitnas") == "service.cli:main"
    assert sys.executable
