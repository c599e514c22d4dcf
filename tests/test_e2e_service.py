"""End to end: the service as docker-compose.yml runs it, started as plain processes on this
machine with the very command lines of its services (migrate, api, workers, dashboard;
hosts, ports and the database URL substituted). Keys and tokens come from the admin CLI,
the job goes in over HTTP, and its trials are found through optuna-dashboard's HTTP API.

The workers run with every package outside ``fitnas[worker]`` blocked (as in the worker
image). The default run has one short job on PostgreSQL; the 40-trial runs on PostgreSQL
and SQLite (4 workers) and the measurement-cache check are ``slow``.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from service_harness import (
    Proc,
    Stack,
    clean_env,
    free_port,
    fresh_postgres_database,
    localize,
    run_cli,
    service_command,
    service_environment,
    terminate_all,
    wait_http,
)
from sqlalchemy.engine import make_url
from svc_helpers import FAST_MEASURE, job_body
from test_worker_imports import worker_only_env

PG_URL = os.environ.get("FITNAS_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(not PG_URL, reason="FITNAS_TEST_POSTGRES_URL is not set")
LOCKED = "database is locked"


@dataclass
class Service:
    work: Path
    stack: Stack
    api_url: str
    dashboard_url: str
    database_url: str
    optuna_url: str
    key: str
    worker_token: str
    workers: list[Proc] = field(default_factory=list)
    client_errors: list[str] = field(default_factory=list)
    dashboard: Proc | None = None
    dashboard_port: int = 0
    dashboard_storage: str = ""
    readonly_role: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        """Every client call goes through here, so that any error a client saw (a lock
        error above all) is on record."""
        r = httpx.request(method, f"{self.api_url}{path}", headers=self.headers, timeout=60,
                          **kw)
        if r.status_code >= 400:
            self.client_errors.append(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r

    def submit(self, body: dict) -> dict:
        r = self.request("POST", "/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    def wait_job(self, job_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        job: dict = {}
        while time.monotonic() < deadline:
            r = self.request("GET", f"/v1/jobs/{job_id}")
            assert r.status_code == 200, r.text
            job = r.json()
            if job["status"] in ("completed", "failed", "cancelled") and job["finalized"]:
                return job
            dead = [w.name for w in self.workers if not w.alive()]
            assert not dead, f"workers died: {dead}\n{self.stack.logs()}"
            time.sleep(1.0)
        raise AssertionError(f"job {job_id} not done after {timeout:.0f} s: "
                             f"{job.get('status')} {job.get('progress')}\n{self.stack.logs()}")

    def start_dashboard(self) -> None:
        argv = localize(service_command("dashboard"), database_url=self.optuna_url,
                        api_url=self.api_url, api_port=0, dashboard_port=self.dashboard_port)
        argv = [a.replace(COMPOSE_ARTIFACTS_DIR, str(self.work / "artifacts")) for a in argv]
        env = {k: v for k, v in service_environment("dashboard").items()
               if k != "FITNAS_DASHBOARD_STORAGE_URL"}
        # the compose URL points at the read-only role; here, at this test's database
        env["FITNAS_DASHBOARD_STORAGE_URL"] = self.dashboard_storage
        self.dashboard = self.stack.start("dashboard", argv, clean_env(env))
        wait_http(f"{self.dashboard_url}/api/studies", timeout=120, proc=self.dashboard)

    def dashboard_trials(self, study_name: str) -> list[dict]:
        """The study's trials as optuna-dashboard serves them (GET /api/studies, then
        GET /api/studies/<id>)."""
        studies = httpx.get(f"{self.dashboard_url}/api/studies", timeout=60).json()
        ids = [s["study_id"] for s in studies["study_summaries"]
               if s["study_name"] == study_name]
        assert len(ids) == 1, (study_name, studies)
        detail = httpx.get(f"{self.dashboard_url}/api/studies/{ids[0]}", timeout=60).json()
        assert detail["name"] == study_name
        assert detail["objective_names"] == ["quality (synflow)", "latency_ms"]
        return detail["trials"]

    def all_logs(self) -> str:
        return "\n".join(p.log() for p in self.stack.procs)


def _compose_env(service: str, database_url: str, optuna_url: str, work: Path) -> dict:
    """A compose service's environment for this machine: the compose database URL becomes
    the test database, the export volume a local folder."""
    env = service_environment(service)
    out = {}
    for k, v in env.items():
        if k == "FITNAS_DATABASE_URL":
            v = database_url
        elif k == "FITNAS_OPTUNA_STORAGE_URL":
            v = optuna_url
        elif k == "FITNAS_EXPORT_DIR":
            v = str(work / "exports")
        elif k == "FITNAS_ARTIFACT_DIR":
            v = str(work / "artifacts")
        out[k] = v
    return out


COMPOSE_TOKENS_DIR = "/var/lib/fitnas/tokens"
COMPOSE_ARTIFACTS_DIR = "/var/lib/fitnas/artifacts"


def start_service(work: Path, database_url: str, optuna_url: str, n_workers: int,
                  target: str = "cpu") -> Service:
    stack = Stack(work)
    api_port, dash_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}"

    def local(name: str) -> list[str]:
        return localize(service_command(name), database_url=database_url, api_url=api_url,
                        api_port=api_port, dashboard_port=dash_port)

    server_env = clean_env(_compose_env("api", database_url, optuna_url, work))
    migrate_env = _compose_env("migrate", database_url, optuna_url, work)
    ro_password = migrate_env.pop("FITNAS_READONLY_PASSWORD")
    assert migrate_env == _compose_env("api", database_url, optuna_url, work)

    # migrate: the one-shot service; on PostgreSQL it also makes the dashboard's read-only
    # role (a name of this test's own: roles are shared by the server's databases)
    migrate = local("migrate")
    assert migrate[:3] == ["fitnas", "db", "upgrade"]
    role = migrate[migrate.index("--readonly-role") + 1]
    dashboard_url = optuna_url
    if database_url.startswith("postgresql"):
        role = f"{role}_{uuid.uuid4().hex[:8]}"
        migrate[migrate.index("--readonly-role") + 1] = role
        dashboard_url = make_url(optuna_url).set(
            username=role, password=ro_password).render_as_string(hide_password=False)
    else:  # compose runs PostgreSQL; a SQLite file has no roles
        i = migrate.index("--readonly-role")
        del migrate[i:i + 2]
        role = None
    proc = run_cli(migrate[1:], {**server_env, "FITNAS_READONLY_PASSWORD": ro_password},
                   work)
    assert proc.returncode == 0, proc.stderr
    assert "upgraded from empty to" in proc.stdout, proc.stdout

    # keys, as `docker compose exec api fitnas admin ...` makes them (both at once)
    with ThreadPoolExecutor(2) as pool:
        made = list(pool.map(lambda args: run_cli(args, server_env, work), [
            ["admin", "create-key", "--name", "e2e"],
            ["admin", "create-worker-token", "--target", target],
        ]))
    for proc in made:
        assert proc.returncode == 0, proc.stderr
        assert "it is shown only now" in proc.stderr
    key, token = (proc.stdout.strip() for proc in made)
    assert key.startswith("fnk_") and token.startswith("fnw_")

    # bootstrap: the one-shot that writes the workers' token file, kept on a restart
    tokens = work / "tokens"

    def on_this_machine(value: str) -> str:
        return value.replace(COMPOSE_TOKENS_DIR, str(tokens))

    bootstrap = [on_this_machine(a) for a in local("bootstrap")]
    for again in (False, True):
        proc = run_cli(bootstrap[1:], server_env, work)
        assert proc.returncode == 0 and proc.stdout == "", proc.stderr
        assert ("kept" in proc.stderr) == again, proc.stderr
    token_file = Path(bootstrap[bootstrap.index("--write-to") + 1])
    assert token_file.read_text().startswith("fnw_")
    assert token_file.stat().st_mode & 0o077 == 0

    svc = Service(work, stack, api_url, f"http://127.0.0.1:{dash_port}", database_url,
                  optuna_url, key, token, dashboard_port=dash_port,
                  dashboard_storage=dashboard_url, readonly_role=role)
    api = stack.start("api", local("api"), server_env)
    wait_http(f"{api_url}/readyz", timeout=120, proc=api)

    worker_argv = local("worker-cpu")
    assert worker_argv[:2] == ["fitnas", "worker"] and api_url in worker_argv
    assert worker_argv[worker_argv.index("--target") + 1] == target
    wenv = {k: on_this_machine(v) for k, v in service_environment("worker-cpu").items()}
    assert set(wenv) == {"FITNAS_WORKER_TOKEN", "FITNAS_WORKER_TOKEN_FILE",
                         "FITNAS_WORKER_HEALTH_FILE", "FITNAS_DATA_SOURCES"}
    assert wenv["FITNAS_WORKER_TOKEN"] == "" and wenv["FITNAS_WORKER_TOKEN_FILE"] == \
        str(token_file)  # the token the bootstrap wrote, never on a command line
    base = worker_only_env(work / "worker-site", clean_env())
    for i in range(n_workers):
        health = str(work / f"worker-{i + 1}.alive")
        svc.workers.append(stack.start(f"worker-{i + 1}", worker_argv,
                                       {**base, **wenv, "FITNAS_WORKER_HEALTH_FILE": health}))
    return svc


def e2e_job(trials: int, name: str, **over) -> dict:
    """The shared test job, measured for real: TPE, and some of the tiny space over
    budget (pre-screened)."""
    return job_body("cpu", name=name, trials=trials, measure={**FAST_MEASURE, "max_cv": 1.0},
                    quality={"signal": "synflow", "batch": 4}, sampler="tpe", seed=7,
                    budgets={"max_params": 3_000}, **over)


def check_job(svc: Service, job: dict, trials: int) -> dict:
    """Every trial told exactly once, nothing left RUNNING; returns figures for the report."""
    assert job["status"] == "completed", job
    prog = job["progress"]
    assert prog["finished"] == trials and prog["running"] == 0, prog
    assert prog["tasks_queued"] == 0 and prog["tasks_leased"] == 0, prog

    trials_seen = svc.dashboard_trials(job["study_name"])
    states = [t["state"] for t in trials_seen]
    numbers = sorted(t["number"] for t in trials_seen)
    assert numbers == list(range(trials)), numbers  # each trial once, none extra
    assert "Running" not in states and "Waiting" not in states, states
    # measured or cached: Complete (or Fail); over a budget: Pruned, never measured
    assert states.count("Pruned") == prog["over_budget"], (states, prog)
    assert states.count("Complete") + states.count("Fail") == trials - prog["over_budget"]
    for t in trials_seen:
        if t["state"] == "Complete":
            assert len(t["values"]) == 2
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert "spec_hash" in attrs and "params" in attrs

    # the tasks behind them: each accepted once, each told once
    from sqlalchemy import create_engine, text

    engine = create_engine(svc.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT trial_number, state, attempts_used, told_at FROM fitnas_tasks "
                     "WHERE job_id = :j"), {"j": job["id"]},
            ).mappings().all()
    finally:
        engine.dispose()
    assert len({r["trial_number"] for r in rows}) == len(rows)
    assert all(r["state"] == "done" and r["told_at"] is not None for r in rows), rows
    # a task for every trial that went to a worker, none for cached / over-budget ones
    assert len(rows) == prog["measured"] + prog["failed"], (len(rows), prog)

    worker_logs = "\n".join(w.log() for w in svc.workers)
    reported = len(re.findall(r"reported, (ok|failed)", worker_logs))
    assert "duplicate" not in worker_logs and "lease lost" not in worker_logs
    assert "Traceback" not in svc.all_logs()
    return {"tasks": len(rows), "reported_total": reported,
            "attempts_over_1": sum(1 for r in rows if r["attempts_used"] > 0),
            "measured": prog["measured"], "cached": prog["cached"],
            "over_budget": prog["over_budget"], "failed": prog["failed"],
            "feasible": prog["feasible"]}


def stop(svc: Service) -> dict[str, int | None]:
    """Stop the workers (exit codes returned) as compose does (SIGTERM), then the rest."""
    codes = terminate_all(svc.workers)
    svc.stack.stop_all()
    if svc.readonly_role:  # this test's own role: privileges first, then the role
        from sqlalchemy import create_engine, pool, text

        engine = create_engine(svc.database_url, poolclass=pool.NullPool,
                               isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'DROP OWNED BY "{svc.readonly_role}"'))
                conn.execute(text(f'DROP ROLE IF EXISTS "{svc.readonly_role}"'))
        finally:
            engine.dispose()
    return codes


def _wait_workers_registered(svc: Service, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all("registered as" in w.log() for w in svc.workers):
            return
        assert all(w.alive() for w in svc.workers), svc.stack.logs()
        time.sleep(0.2)
    raise AssertionError(svc.stack.logs())


@needs_pg
def test_compose_stack_runs_a_short_job_on_postgres(tmp_path):
    t0 = time.monotonic()
    with fresh_postgres_database(PG_URL) as db_url:
        svc = start_service(tmp_path, db_url, db_url, n_workers=2)
        try:
            _wait_workers_registered(svc)
            job = svc.submit(e2e_job(4, "e2e short", parallelism=2))
            assert job["status"] == "queued"
            svc.start_dashboard()
            job = svc.wait_job(job["id"], timeout=300)
            figures = check_job(svc, job, 4)
            assert figures["measured"] + figures["cached"] + figures["over_budget"] == 4
            # both workers took part (parallelism 2) unless the cache answered
            assert sum("reported, ok" in w.log() for w in svc.workers) >= 1

            # the winner, as a client downloads it
            r = svc.request("GET", f"/v1/jobs/{job['id']}/winner")
            assert r.status_code == 200 and r.json()["final"] is True
            if r.json()["trial"] is not None:
                r = svc.request("GET", f"/v1/jobs/{job['id']}/export", params={"format": "json"})
                assert r.status_code == 200
                assert r.json()["stages"]
        finally:
            codes = stop(svc)
        assert all(c == 0 for c in codes.values()), (codes, svc.stack.logs())
        assert not svc.client_errors, svc.client_errors
    print(f"\nshort e2e on PostgreSQL: {time.monotonic() - t0:.0f} s, {figures}")


def _long_run(tmp_path: Path, database_url: str, optuna_url: str, n_workers: int,
              trials: int = 40) -> dict:
    svc = start_service(tmp_path, database_url, optuna_url, n_workers=n_workers)
    out: dict = {}
    try:
        _wait_workers_registered(svc)
        t0 = time.monotonic()
        job1 = svc.submit(e2e_job(trials, "e2e first"))
        svc.start_dashboard()
        job1 = svc.wait_job(job1["id"], timeout=3000)
        out["first_s"] = round(time.monotonic() - t0, 1)
        out["first"] = check_job(svc, job1, trials)

        # the identical job again: mostly answered by the measurement cache
        t0 = time.monotonic()
        job2 = svc.submit(e2e_job(trials, "e2e first"))
        job2 = svc.wait_job(job2["id"], timeout=3000)
        out["second_s"] = round(time.monotonic() - t0, 1)
        out["second"] = check_job(svc, job2, trials)
        p = job2["progress"]
        evaluated = p["cached"] + p["measured"]
        out["cache_fraction_of_evaluated"] = round(p["cached"] / max(1, evaluated), 3)
        out["cache_fraction_of_trials"] = round(p["cached"] / trials, 3)
        # TPE's proposals depend on which trials have finished when it is asked (2 in
        # flight), so the second job is not a perfect replay; most of it is cached
        assert p["cached"] >= 0.5 * evaluated, p
    finally:
        codes = stop(svc)
    assert all(c == 0 for c in codes.values()), codes
    logs = svc.all_logs()
    out["locked_in_logs"] = logs.count(LOCKED)
    out["client_errors"] = len(svc.client_errors)
    assert LOCKED not in logs
    assert not any(LOCKED in e for e in svc.client_errors), svc.client_errors
    assert not svc.client_errors, svc.client_errors
    return out


@pytest.mark.slow
@needs_pg
def test_forty_trials_two_workers_postgres(tmp_path):
    with fresh_postgres_database(PG_URL) as db_url:
        figures = _long_run(tmp_path, db_url, db_url, n_workers=2)
    print(f"\n40 trials, 2 workers, PostgreSQL: {figures}")


@pytest.mark.slow
def test_forty_trials_four_workers_sqlite(tmp_path):
    db_url = f"sqlite:///{tmp_path}/fitnas.db"
    optuna_url = f"sqlite:///{tmp_path}/fitnas-optuna.db"
    figures = _long_run(tmp_path, db_url, optuna_url, n_workers=4)
    print(f"\n40 trials, 4 workers, SQLite: {figures}")


def test_compose_commands_localize_without_leftovers():
    """What the end-to-end tests run is compose's own command lines, with only hosts,
    ports and the database URL changed."""
    for name in ("migrate", "api", "worker-cpu", "dashboard"):
        argv = service_command(name)
        local = localize(argv, database_url="sqlite:///x.db", api_url="http://127.0.0.1:1",
                         api_port=1, dashboard_port=2)
        assert len(local) == len(argv)
        changed = [(a, b) for a, b in zip(argv, local, strict=True) if a != b]
        for a, _new in changed:
            assert a in ("http://api:8000", "0.0.0.0", "8000", "8080") or "@postgres:" in a, a
        text = " ".join(local)
        assert "api:8000" not in text and "@postgres:" not in text and "0.0.0.0" not in text


def _middle_reference() -> str:
    """A network of the test space with about the median MACs of the space, as a compact
    string: a ratio budget of 1.3 against it leaves most candidates within, some over,
    whatever the machine's speed."""
    import optuna
    from svc_helpers import TINY_SPACE

    from blocks.cost import estimate_cost
    from search.space import DesignSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = DesignSpace.from_dict(TINY_SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    specs = []
    for _ in range(40):
        trial = study.ask()
        specs.append(space.sample(trial))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    specs.sort(key=lambda s: estimate_cost(s, resolution=32).macs)
    return specs[len(specs) // 2].to_compact()


@needs_pg
def test_latency_worker_and_trainer_as_separate_processes_on_postgres(tmp_path):
    """compose's API, one latency worker and one trainer (the `trainer` profile's
    commands) as separate processes: only the candidates within budget are trained, a
    trial the pruner stopped is PRUNED with its intermediate values in optuna-dashboard's
    API, an over-budget one is PRUNED without any, and every trial is told once."""
    from sqlalchemy import create_engine, text

    t0 = time.monotonic()
    trials, steps, rung = 10, 100, 50  # digits learns past chance by step 50
    with fresh_postgres_database(PG_URL) as db_url:
        svc = start_service(tmp_path, db_url, db_url, n_workers=1)
        try:
            api_port = int(svc.api_url.rsplit(":", 1)[1])
            tokens = str(tmp_path / "tokens")

            def local(name: str) -> list[str]:
                argv = localize(service_command(name), database_url=db_url,
                                api_url=svc.api_url, api_port=api_port,
                                dashboard_port=svc.dashboard_port)
                return [a.replace(COMPOSE_TOKENS_DIR, tokens) for a in argv]

            server_env = clean_env(_compose_env("api", db_url, db_url, tmp_path))
            boot = local("bootstrap-trainer")
            proc = run_cli(boot[1:], server_env, tmp_path)
            assert proc.returncode == 0, proc.stderr
            wenv = {k: v.replace(COMPOSE_TOKENS_DIR, tokens)
                    for k, v in service_environment("worker-trainer").items()}
            wenv["FITNAS_WORKER_HEALTH_FILE"] = str(tmp_path / "trainer.alive")
            trainer = svc.stack.start("worker-trainer", local("worker-trainer"),
                                      {**worker_only_env(tmp_path / "worker-site",
                                                         clean_env()), **wenv})
            svc.workers.append(trainer)
            _wait_workers_registered(svc)
            assert "(role trainer, target trainers" in trainer.log()

            body = job_body(
                "cpu", name="e2e trainer", trials=trials, parallelism=2, sampler="random",
                seed=4, measure={**FAST_MEASURE, "reference": _middle_reference(),
                                 "max_cv": 1.0},
                quality={"signal": "train", "data": "digits", "steps": steps,
                         "rungs": [rung], "batch": 32},
                budgets={"max_latency_ratio": 1.3})
            job = svc.submit(body)
            job = svc.wait_job(job["id"], timeout=400)
            assert job["status"] == "completed" and job["progress"]["finished"] == trials

            engine = create_engine(db_url)
            try:
                with engine.connect() as conn:
                    rows = conn.execute(text(
                        "SELECT trial_number, kind, state, told_at, outcome FROM fitnas_tasks "
                        "WHERE job_id = :j"), {"j": job["id"]}).mappings().all()
            finally:
                engine.dispose()
            assert all(r["state"] == "done" and r["told_at"] is not None for r in rows)
            assert len({(r["trial_number"], r["kind"]) for r in rows}) == len(rows)
            latency = {r["trial_number"]: r["outcome"] for r in rows if r["kind"] == "latency"}
            trained = {r["trial_number"] for r in rows if r["kind"] == "quality"}
            within = {n for n, o in latency.items()
                      if o["ok"] and o["latency"]["ratio_to_reference"]["median"] <= 1.3}
            assert trained == within, (trained, within)
            assert all(o["latency"] is None for r in rows if r["kind"] == "quality"
                       for o in [r["outcome"]])  # a trainer never reports latency

            svc.start_dashboard()
            studies = httpx.get(f"{svc.dashboard_url}/api/studies", timeout=60).json()
            sid = next(s["study_id"] for s in studies["study_summaries"]
                       if s["study_name"] == job["study_name"])
            seen = httpx.get(f"{svc.dashboard_url}/api/studies/{sid}", timeout=60).json()
            by_number = {t["number"]: t for t in seen["trials"]}
            assert sorted(by_number) == list(range(trials))  # each trial once
            pruned = []
            for n, t in by_number.items():
                attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
                steps_seen = [iv["step"] for iv in t["intermediate_values"]]
                if n in latency and n not in within:  # over budget: never trained
                    assert t["state"] == "Pruned" and not steps_seen, t
                    assert attrs.get("quality_skipped") == "1", attrs
                if attrs.get("status") == "pruned":  # stopped by the pruner
                    assert t["state"] == "Pruned" and steps_seen and max(steps_seen) < steps
                    pruned.append(n)
            assert pruned, "no trained candidate was stopped by the pruner"
            assert "never trains" not in svc.all_logs()
        finally:
            codes = stop(svc)
        assert all(c == 0 for c in codes.values()), (codes, svc.stack.logs())
        assert not svc.client_errors, svc.client_errors
    print(f"\ntrainer e2e on PostgreSQL: {time.monotonic() - t0:.0f} s, {len(trained)} "
          f"trained of {len(latency)} measured, {len(pruned)} pruned")
