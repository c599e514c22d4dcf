"""Reliability: a worker that always handles SIGTERM, finished work that survives an
outage longer than the lease, fast take-over of a dead replica's job, counted scheduler
errors, no orphaned evaluation children."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from service_harness import clean_env, free_port
from svc_helpers import HttpWorker, job_body

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def _catches_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & SIGTERM_BIT)
    return False


def test_worker_exits_0_on_sigterm_in_every_phase_start_up_and_shutdown_included(tmp_path):
    """SIGTERM every 20 ms from the moment the process catches it (its first imports) to
    its exit: start-up, registration against an API that is not there, and the way out.
    Exactly what a harness that signals twice, or ``docker stop`` during start-up, does."""
    port = free_port()  # nothing listens: the worker is in its registration backoff
    cmd = [sys.executable, "-m", "service.cli", "worker", "--server",
           f"http://127.0.0.1:{port}", "--target", "cpu", "--runtime", "eager"]
    env = clean_env({"FITNAS_WORKER_TOKEN": "fnw_not_checked", "PYTHONPATH": os.getcwd()})
    for _ in range(3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=tmp_path)
        deadline = time.monotonic() + 30
        while not _catches_sigterm(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        deadline = time.monotonic() + 30
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the worker did not stop"
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.02)
        out = proc.stdout.read().decode()
        proc.stdout.close()
        assert proc.returncode == 0, out
        assert "Traceback" not in out


# ------------------------------------------------- finished work survives an outage


@contextlib.contextmanager
def _service(make_settings, **overrides):
    from fastapi.testclient import TestClient

    from service import clock
    from service.api.app import create_app
    from service.tokens import create_api_key, create_worker_token

    settings = dict(lease_timeout_s=0.4, heartbeat_interval_s=0.1, max_attempts=1)
    settings.update(overrides)
    app = create_app(make_settings(**settings))
    with clock.use(clock.ManualClock()) as now, TestClient(app) as client:
        key, _ = create_api_key(app.state.db, f"user-{time.monotonic_ns()}")
        target = f"rel-{time.monotonic_ns()}"
        token, _ = create_worker_token(app.state.db, target)
        yield SimpleNamespace(app=app, client=client, now=now, target=target,
                              user={"Authorization": f"Bearer {key}"},
                              worker_headers={"Authorization": f"Bearer {token}"})


def _worker(svc):
    w = HttpWorker(svc.client, svc.worker_headers, svc.target)
    w.register()
    return w


def _task_row(svc, task_id):
    from service.models import Task

    return svc.app.state.db.run(lambda s: s.get(Task, task_id), write=False)


def _job(svc, trials=1):
    r = svc.client.post("/v1/jobs", headers=svc.user, json=job_body(svc.target, trials=trials))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _finish(svc, job_id):
    svc.app.state.scheduler.run_until_idle()
    return svc.client.get(f"/v1/jobs/{job_id}", headers=svc.user).json()


def test_a_result_delivered_after_its_lease_expired_is_kept_and_spends_no_attempt(
        make_settings):
    """The outage of the issue: heartbeats refused past the lease, the reaper re-queues
    the task; the worker's finished result, delivered when the API is back, is the
    trial's (max_attempts 1: had the expiry counted, the trial would have failed)."""
    with _service(make_settings, max_attempts=2) as svc:
        job_id = _job(svc)
        sched = svc.app.state.scheduler
        sched.tick()
        w = _worker(svc)
        lease = w.lease()
        svc.now.advance(1.0)
        assert [r.requeued for r in sched.tick().reaped] == [True]
        assert _task_row(svc, lease["task_id"]).attempts_used == 1
        r = w.result(lease)
        assert r.status_code == 200 and r.json()["duplicate"] is False, r.text
        assert w.result(lease).json()["duplicate"] is True
        row = _task_row(svc, lease["task_id"])
        assert (row.state, row.attempts_used) == ("done", 0)
        assert w.lease() is None  # not measured again
        job = _finish(svc, job_id)
        assert job["status"] == "completed" and job["progress"]["failed"] == 0, job
        assert job["progress"]["measured"] == 1


def test_a_heartbeat_after_its_lease_expired_resumes_the_lease(make_settings):
    with _service(make_settings, max_attempts=2) as svc:
        job_id = _job(svc)
        sched = svc.app.state.scheduler
        sched.tick()
        w = _worker(svc)
        lease = w.lease()
        svc.now.advance(1.0)
        sched.tick()
        assert w.heartbeat(lease).status_code == 200
        row = _task_row(svc, lease["task_id"])
        assert (row.state, row.attempts_used) == ("leased", 0)
        assert w.lease() is None
        assert w.result(lease).status_code == 200
        assert _finish(svc, job_id)["progress"]["measured"] == 1


def test_a_late_result_wins_over_the_lease_given_since_and_is_told_once(make_settings):
    with _service(make_settings, max_attempts=3) as svc:
        job_id = _job(svc)
        sched = svc.app.state.scheduler
        sched.tick()
        a, b = _worker(svc), _worker(svc)
        first = a.lease()
        svc.now.advance(1.0)
        sched.tick()
        second = b.lease()
        assert second["task_id"] == first["task_id"] and second["attempt"] == 2
        assert a.result(first).status_code == 200
        assert b.heartbeat(second).status_code == 409  # b stops measuring it
        assert b.result(second).status_code == 409
        job = _finish(svc, job_id)
        assert job["status"] == "completed" and job["progress"]["measured"] == 1, job
        assert _task_row(svc, first["task_id"]).attempts_used == 0  # the outage spent none


def test_after_a_failed_tick_leases_get_a_fresh_lease_before_the_reaper_runs(
        make_settings, monkeypatch):
    """An outage longer than the lease at the last attempt: the first tick that gets
    through gives the leases a full lease, so the worker can come back."""
    from service import leases

    with _service(make_settings, max_attempts=1) as svc:
        job_id = _job(svc)
        sched = svc.app.state.scheduler
        sched.tick()
        w = _worker(svc)
        lease = w.lease()
        real = leases.extend_live_leases

        def down(*a, **k):
            raise OSError("connection refused")

        monkeypatch.setattr(leases, "extend_live_leases", down)
        sched._heard = False  # as after any failed tick
        with pytest.raises(OSError):
            sched.tick()
        svc.now.advance(5.0)  # the outage outlasts the lease
        monkeypatch.setattr(leases, "extend_live_leases", real)
        assert sched.tick().reaped == []
        assert w.heartbeat(lease).status_code == 200
        assert w.result(lease).status_code == 200
        job = _finish(svc, job_id)
        assert job["progress"]["measured"] == 1 and job["progress"]["failed"] == 0


# ----------------------------------------------------------- scheduler errors


def test_failed_ticks_are_counted_and_logged_once_per_distinct_error(make_settings,
                                                                     monkeypatch, caplog):
    from service import scheduler as scheduler_module

    with _service(make_settings) as svc:
        sched = svc.app.state.scheduler

        def down(*a, **k):
            raise OSError("could not connect to server: Connection refused")

        monkeypatch.setattr(scheduler_module, "reap_expired", down)
        caplog.set_level("ERROR", logger="fitnas.scheduler")
        for _ in range(92):
            with pytest.raises(OSError):
                sched.tick()
        text = svc.client.get("/metrics").text
        assert "fitnas_scheduler_errors_total 92.0" in text
        lines = [r for r in caplog.records if "scheduler tick failed" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is not None
        # the next interval: one line that says how often it recurred, no traceback
        sched.error_log._clock = lambda: time.monotonic() + 61
        with pytest.raises(OSError):
            sched.tick()
        lines = [r for r in caplog.records if "scheduler tick failed" in r.getMessage()]
        assert len(lines) == 2 and lines[1].exc_info is None
        assert "91 more time(s)" in lines[1].getMessage()


# ------------------------------------------------ take-over of a dead replica's job


def test_the_lock_is_renewed_while_driving_and_taken_over_soon_after_its_holder_dies(
        make_settings):
    """A replica killed while it drove a job leaves a lock of scheduler_lock_s; the other
    replica takes the job over once it runs out, not two minutes later. A live holder
    renews it, so a slow drive is never taken over."""
    from service.models import Job
    from service.scheduler import LockKeeper, Scheduler

    with _service(make_settings, scheduler_lock_s=0.3) as svc:
        job_id = _job(svc)
        settings = svc.app.state.settings
        dead = Scheduler(svc.app.state.db, settings, owner="replica-a")
        other = Scheduler(svc.app.state.db, settings, owner="replica-b")
        assert dead._claim(job_id)  # and then SIGKILL: no release
        assert not other._claim(job_id)
        svc.now.advance(0.31)
        assert other._claim(job_id)
        other._release(job_id)
        # a live holder's keeper renews the lock (real time: the keeper's own interval)
        assert dead._claim(job_id)
        keeper = LockKeeper(svc.app.state.db, job_id, "replica-a", 0.3)
        keeper.start()
        deadline = time.monotonic() + 30
        while keeper.renewals < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        keeper.stop()
        job = svc.app.state.db.run(lambda s: s.get(Job, job_id), write=False)
        assert job.lock_owner == "replica-a"
        assert not other._claim(job_id)
        assert settings.scheduler_lock_s == 0.3
    from service.settings import Settings

    assert Settings.model_fields["scheduler_lock_s"].default <= 15


# ------------------------------------------------------------------------ orphans


def test_one_shot_child_dies_with_its_parent_killed_9_and_removes_its_directory():
    import psutil

    code = (
        "from blocks import load_spec\n"
        "from search.evaluators.runner import evaluate\n"
        "from search.evaluators.types import EvalTask, MeasureSettings\n"
        "t = EvalTask(spec=load_spec('preset:mobilenet_v2@0.25').canonical_dict(), "
        "measure=MeasureSettings(resolution=32, min_run_time_s=30, rounds=3, threads=1, "
        "reference=None), timeout_s=300)\n"
        "evaluate(t, isolated=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 120
        child = None
        while child is None:
            assert time.monotonic() < deadline and parent.poll() is None
            for p in psutil.Process(parent.pid).children():
                with contextlib.suppress(psutil.Error):
                    if "--child" in p.cmdline():
                        child = p
            time.sleep(0.05)  # polling for a process to appear
        tmp = Path(child.cmdline()[-1]).parent
        assert tmp.is_dir()
        parent.kill()
        parent.wait(10)
        t0 = time.monotonic()
        gone, _alive = psutil.wait_procs([child], timeout=15)
        assert gone, "the evaluation child outlived its parent"
        print(f"child gone {time.monotonic() - t0:.2f} s after kill -9 of its parent")
        assert not tmp.exists()
    finally:
        if parent.poll() is None:
            parent.kill()


# ------------------------------------------------------- worker-token bootstrap


def test_a_worker_started_before_its_token_file_waits_then_stops_cleanly(tmp_path):
    """No restart loop: without its token the worker waits for the file (compose's
    bootstrap writes it) instead of exiting; SIGTERM while it waits is exit 0."""
    token_file = tmp_path / "tokens" / "cpu"
    cmd = [sys.executable, "-m", "service.cli", "worker", "--server",
           f"http://127.0.0.1:{free_port()}", "--target", "cpu", "--runtime", "eager"]
    env = clean_env({"FITNAS_WORKER_TOKEN_FILE": str(token_file), "PYTHONPATH": os.getcwd(),
                     "FITNAS_WORKER_HEALTH_FILE": str(tmp_path / "alive")})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=tmp_path, text=True)
    try:
        line = proc.stdout.readline()
        assert "waiting for the worker token in" in line, line
        assert proc.poll() is None
        token_file.parent.mkdir()
        token_file.write_text("fnw_written_by_the_bootstrap\n")
        line = proc.stdout.readline()  # the API is not there: it goes on to register
        assert "unavailable" in line and "retrying" in line, line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not (tmp_path / "alive").exists()  # the API never answered
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
