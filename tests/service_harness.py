"""Run the service as plain processes on this machine, with exactly the command lines that
docker-compose.yml gives its services (hosts, ports and the database URL substituted).

Used by the worker, compose and end-to-end tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR?error}`` and ``$$`` for a literal dollar."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        val = env.get(name)
        unset = not val if op in (":-", ":?") else val is None
        if op in (":-", "-") and unset:
            return arg or ""
        if op in (":?", "?") and unset:
            raise KeyError(f"{name}: {arg}")
        return val or ""

    out = _VAR.sub(sub, value.replace("$$", "\0"))
    return out.replace("\0", "$")


def load_compose() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(COMPOSE_FILE.read_text())


def service_command(name: str, env: dict[str, str] | None = None) -> list[str]:
    """The argv that compose runs for service ``name`` (interpolated with ``env``)."""
    svc = load_compose()["services"][name]
    cmd = svc["command"]
    if isinstance(cmd, str):
        import shlex

        cmd = shlex.split(cmd)
    return [interpolate(str(a), env or {}) for a in cmd]


def service_environment(name: str, env: dict[str, str] | None = None) -> dict[str, str]:
    svc = load_compose()["services"][name]
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: interpolate(str(v), env or {}) for k, v in raw.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def localize(argv: list[str], *, database_url: str, api_url: str, api_port: int,
             dashboard_port: int) -> list[str]:
    """Turn a container command line into one for this machine: compose's in-network
    names and ports become local ones; nothing else changes."""
    compose_db = re.compile(r"^postgresql\+psycopg://[^@]*@postgres:5432/\w+$")
    out = []
    prev = None
    for a in argv:
        if compose_db.match(a):
            a = database_url
        elif a == "http://api:8000":
            a = api_url
        elif prev == "--host" and a == "0.0.0.0":
            a = "127.0.0.1"
        elif prev == "--port" and a == "8000":
            a = str(api_port)
        elif prev == "--port" and a == "8080":
            a = str(dashboard_port)
        out.append(a)
        prev = a
    return out


def exe(argv: list[str]) -> list[str]:
    """Run console scripts through this interpreter (the same installation as the test)."""
    if argv[0] == "fitnas":
        return [sys.executable, "-m", "service.cli", *argv[1:]]
    if argv[0] == "optuna-dashboard":
        return [sys.executable, "-m", "optuna_dashboard._cli", *argv[1:]]
    return argv


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FITNAS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self, timeout: float = 60) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


def terminate_all(procs: list[Proc], timeout: float = 60) -> dict[str, int | None]:
    """SIGTERM every process at once, then wait for each (SIGKILL after ``timeout``)."""
    for p in procs:
        if p.alive():
            p.popen.send_signal(signal.SIGTERM)
    return {p.name: p.terminate(timeout) for p in procs}


@dataclass
class Stack:
    """Processes started for one test; all stopped (SIGTERM, then SIGKILL) at the end."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        log_path = self.workdir / f"{name}.log"
        fh = open(log_path, "ab")  # noqa: SIM115 - the child process owns it
        popen = subprocess.Popen(
            exe(argv), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
            start_new_session=True,
        )
        fh.close()
        p = Proc(name, argv, popen, log_path)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        # workers first (they may still report), then the API, then the rest
        workers = [p for p in self.procs if p.name.startswith("worker")]
        terminate_all(workers)
        terminate_all([p for p in self.procs if p not in workers])

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.log()[-6000:]}" for p in self.procs)


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120
            ) -> subprocess.CompletedProcess:
    return subprocess.run(
        exe(["fitnas", *args]), capture_output=True, text=True, env=env, cwd=cwd,
        timeout=timeout,
    )


def wait_http(url: str, timeout: float = 60, proc: Proc | None = None,
              status: int = 200) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log()}")
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == status:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s ({last})")


@contextlib.contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """A database created for this test run on the server at ``server_url`` (any database
    URL on it), dropped afterwards. Yields its SQLAlchemy URL (psycopg 3 driver)."""
    import psycopg

    conninfo = re.sub(r"^postgresql\+\w+://", "postgresql://", server_url)
    name = f"fitnas_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = conninfo.rpartition("/")
    url = f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield url
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
