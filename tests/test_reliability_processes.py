"""Process-level reliability: real ``fitnas serve`` and ``fitnas worker`` processes,
killed -9, stopped (SIGSTOP) past their lease, or two API replicas of which the one that
drives the job is killed. Each test checks exactly-once telling (every trial told once,
nothing left in flight) and prints its recovery time (the README's reliability section
quotes them)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
from service_harness import Proc, Stack, clean_env, free_port, fresh_postgres_database, wait_http
from svc_helpers import FAST_MEASURE, job_body

PG_URL = os.environ.get("FITNAS_TEST_POSTGRES_URL", "")
needs_pg = pytest.mark.skipif(not PG_URL, reason="FITNAS_TEST_POSTGRES_URL is not set")

LEASE_TIMEOUT_S = 3.0
HEARTBEAT_S = 0.5


class Service:
    def __init__(self, work: Path, db_url: str, replicas: int = 1) -> None:
        import migrations
        from service.db import Database
        from service.tokens import create_api_key, create_worker_token

        migrations.upgrade(db_url)
        db = Database(db_url)
        try:
            key, _ = create_api_key(db, "tester")
            self.worker_token, _ = create_worker_token(db, "cpu")
        finally:
            db.dispose()
        self.db_url, self.work = db_url, work
        self.headers = {"Authorization": f"Bearer {key}"}
        self.stack = Stack(work)
        self.env = clean_env({
            "FITNAS_DATABASE_URL": db_url,
            "FITNAS_LEASE_TIMEOUT_S": str(LEASE_TIMEOUT_S),
            "FITNAS_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            "FITNAS_SCHEDULER_INTERVAL_S": "0.2",
            "FITNAS_SCHEDULER_LOCK_S": "6",
            "FITNAS_LEASE_POLL_INTERVAL_S": "0.05",
            "FITNAS_EXPORT_DIR": str(work / "exports"),
        })
        self.apis: list[Proc] = []
        self.urls: list[str] = []
        for i in range(replicas):
            port = free_port()
            self.urls.append(f"http://127.0.0.1:{port}")
            self.apis.append(self.stack.start(f"api-{i + 1}", [
                "fitnas", "serve", "--host", "127.0.0.1", "--port", str(port)], self.env))
        for url, proc in zip(self.urls, self.apis, strict=True):
            wait_http(f"{url}/readyz", timeout=120, proc=proc)
        self.url = self.urls[0]

    def worker(self, name: str, url: str | None = None) -> Proc:
        argv = ["fitnas", "worker", "--server", url or self.url, "--target", "cpu",
                "--runtime", "eager", "--poll-wait", "1", "--backoff-cap", "1",
                "--log-level", "debug"]
        return self.stack.start(name, argv, clean_env({"FITNAS_WORKER_TOKEN": self.worker_token}))

    def submit(self, trials: int, **measure) -> str:
        body = job_body("cpu", trials=trials, parallelism=1, quality={"signal": "none"},
                        measure={**FAST_MEASURE, "max_cv": 1.0, **measure})
        r = httpx.post(f"{self.url}/v1/jobs", json=body, headers=self.headers, timeout=30)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str, url: str | None = None) -> dict:
        r = httpx.get(f"{url or self.url}/v1/jobs/{job_id}", headers=self.headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_job(self, job_id: str, timeout: float = 240, url: str | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id, url)
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not finished: {job}\n{self.stack.logs()}")

    def rows(self, sql: str, **params) -> list[dict]:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                return [dict(r) for r in conn.execute(text(sql), params).mappings().all()]
        finally:
            engine.dispose()

    def check_exactly_once(self, job_id: str, trials: int) -> list[dict]:
        job = self.job(job_id)
        assert job["status"] == "completed", job
        assert job["progress"]["finished"] == trials and job["progress"]["running"] == 0, job
        tasks = self.rows("SELECT trial_number, state, attempts_used, told_at FROM "
                          "fitnas_tasks WHERE job_id = :j ORDER BY trial_number", j=job_id)
        assert len({t["trial_number"] for t in tasks}) == len(tasks)
        assert all(t["told_at"] is not None for t in tasks), tasks
        assert all(t["state"] in ("done", "failed") for t in tasks), tasks
        return tasks


def _wait_log(proc: Proc, needle: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while needle not in proc.log():
        assert proc.alive() and time.monotonic() < deadline, proc.log()[-3000:]
        time.sleep(0.05)


def _descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


@pytest.fixture
def sqlite_service(tmp_path):
    svc = Service(tmp_path, f"sqlite:///{tmp_path}/fitnas.db")
    try:
        yield svc
    finally:
        svc.stack.stop_all()


def test_kill_9_of_a_worker_holding_a_lease(sqlite_service):
    """The task comes back after the lease (3 s) and the other worker measures it; the
    killed worker's evaluation child does not outlive it."""
    svc = sqlite_service
    w1 = svc.worker("worker-1")
    _wait_log(w1, "registered as")
    job_id = svc.submit(1, rounds=3, min_run_time_s=1.0)
    _wait_log(w1, "evaluating")
    children = _descendants(w1.popen.pid)
    w2 = svc.worker("worker-2")
    _wait_log(w2, "registered as")
    t0 = time.monotonic()
    w1.popen.kill()
    w1.popen.wait(10)
    job = svc.wait_job(job_id)
    recovery = time.monotonic() - t0
    tasks = svc.check_exactly_once(job_id, 1)
    assert [t["attempts_used"] for t in tasks] == [1]  # the dead worker's attempt
    assert "reported, ok" in w2.log()
    _gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"orphans: {alive}"
    print(f"\nkill -9 worker holding a lease: job done {recovery:.1f} s later "
          f"(lease {LEASE_TIMEOUT_S:g} s, the measurement itself about 4 s)")
    assert recovery < LEASE_TIMEOUT_S + 60
    assert job["progress"]["measured"] == 1


@pytest.mark.slow
def test_sigstop_of_a_worker_past_its_lease(sqlite_service):
    """A worker frozen past its lease: the task is leased to the other worker; when the
    frozen one resumes, whichever result comes first is the trial's, told once."""
    svc = sqlite_service
    w1 = svc.worker("worker-1")
    _wait_log(w1, "registered as")
    job_id = svc.submit(1, rounds=3, min_run_time_s=1.0)
    _wait_log(w1, "evaluating")
    w2 = svc.worker("worker-2")
    _wait_log(w2, "registered as")
    t0 = time.monotonic()
    os.kill(w1.popen.pid, signal.SIGSTOP)
    try:
        _wait_log(w2, "evaluating", timeout=60)
        took_over = time.monotonic() - t0
    finally:
        os.kill(w1.popen.pid, signal.SIGCONT)
    svc.wait_job(job_id)
    svc.check_exactly_once(job_id, 1)
    print(f"\nSIGSTOP worker past its lease: the other worker had the task "
          f"{took_over:.1f} s later (lease {LEASE_TIMEOUT_S:g} s)")
    assert took_over < LEASE_TIMEOUT_S + 15


@needs_pg
@pytest.mark.slow
def test_kill_9_of_the_replica_that_drives_the_job(tmp_path):
    """Two API replicas on one PostgreSQL database; the one holding the job's scheduling
    lock is killed -9 as soon as it is seen holding it. The other takes the job over
    within the lock's time-to-live (6 s here, 10 s by default), not 121 s."""
    from service.clock import utcnow

    with fresh_postgres_database(PG_URL) as db_url:
        svc = Service(tmp_path, db_url, replicas=2)
        try:
            pids = {p.popen.pid: p for p in svc.apis}
            workers = [svc.worker(f"worker-{i}", url) for i, url in enumerate(svc.urls)]
            for w in workers:
                _wait_log(w, "registered as")
            job_id = svc.submit(6)
            deadline = time.monotonic() + 120
            victim = None
            while victim is None:
                assert time.monotonic() < deadline, svc.stack.logs()
                rows = svc.rows("SELECT lock_owner FROM fitnas_jobs WHERE id = :j", j=job_id)
                owner = rows[0]["lock_owner"]
                if owner:
                    victim = pids.get(int(owner.split(":")[1]))
            victim.popen.kill()
            t0 = time.monotonic()
            killed_at = utcnow()
            survivor = next(p for p in svc.apis if p is not victim)
            url = svc.urls[svc.apis.index(survivor)]
            # taken over: the survivor writes under the job's lock (asks or tells a trial)
            while not svc.rows("SELECT 1 FROM fitnas_tasks WHERE job_id = :j AND "
                               "(created_at > :t OR told_at > :t)", j=job_id, t=killed_at):
                assert time.monotonic() - t0 < 60, svc.stack.logs()
                time.sleep(0.05)
            took_over = time.monotonic() - t0
            svc.url = url
            svc.wait_job(job_id)
            svc.check_exactly_once(job_id, 6)
            print(f"\nkill -9 of the lock-holding replica: the survivor drove the job "
                  f"{took_over:.1f} s later (lock 6 s)")
            assert took_over < 15
        finally:
            svc.stack.stop_all()


@contextlib.contextmanager
def own_postgres():
    """A PostgreSQL instance of this test's own (``initdb`` and ``pg_ctl`` as the postgres
    user, on a free port, in a temporary directory), so that the test may stop it.
    Yields (database URL, start, stop)."""
    import shutil
    import subprocess

    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        pytest.skip("initdb/pg_ctl not installed")
    import tempfile

    # not under tmp_path: pytest's base directory is readable by its owner only
    home = Path(tempfile.mkdtemp(prefix="fitnas-pg-"))
    data = home / "pgdata"
    data.mkdir()
    port = free_port()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:
        shutil.chown(home, "postgres")
        shutil.chown(data, "postgres")
    subprocess.run([*as_pg, "initdb", "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"

    def start() -> None:
        subprocess.run([*as_pg, "pg_ctl", "-D", str(data), "-o", opts, "-l",
                        str(data / "log"), "-w", "start"], check=True, capture_output=True)

    def stop() -> None:
        subprocess.run([*as_pg, "pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"],
                       check=True, capture_output=True)

    start()
    try:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE fitnas")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/fitnas", start, stop
    finally:
        with contextlib.suppress(Exception):
            stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_database_outage_longer_than_the_lease_loses_no_finished_result(tmp_path):
    """The database stops while a worker measures and stays down past the lease; the
    worker finishes meanwhile and keeps its result. When the database is back the result
    is accepted: no attempt spent, nothing measured twice, the trial told once."""
    with own_postgres() as (db_url, start, stop):
        svc = Service(tmp_path, db_url)
        try:
            w1 = svc.worker("worker-1")
            _wait_log(w1, "registered as")
            job_id = svc.submit(1, rounds=3, min_run_time_s=1.0)
            _wait_log(w1, "evaluating")
            stop()
            down_at = time.monotonic()
            _wait_log(w1, "evaluated in", timeout=120)  # finished during the outage
            while time.monotonic() - down_at < 2.5 * LEASE_TIMEOUT_S:
                time.sleep(0.1)  # keep the database away past the lease
            start()
            outage = time.monotonic() - down_at
            up_at = time.monotonic()
            job = svc.wait_job(job_id)
            recovery = time.monotonic() - up_at
            tasks = svc.check_exactly_once(job_id, 1)
            assert [(t["state"], t["attempts_used"]) for t in tasks] == [("done", 0)]
            assert job["progress"]["measured"] == 1 and job["progress"]["failed"] == 0
            log = w1.log()
            assert log.count("evaluating") == 1 and "reported, ok" in log, log[-3000:]
            tried = log.count("reporting failed") + log.count("heartbeat failed")
            print(f"\ndatabase outage of {outage:.1f} s (lease {LEASE_TIMEOUT_S:g} s): result "
                  f"accepted, job done {recovery:.1f} s after the database was back; "
                  f"{tried} requests answered 5xx/refused meanwhile, 0 attempts spent")
        finally:
            svc.stack.stop_all()
