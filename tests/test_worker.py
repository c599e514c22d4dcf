"""The device worker: its unit-level pieces (backoff, configuration, task fitting) and its
behaviour against the real API run as a subprocess (lease, heartbeat, result, 409,
reconnection while the API is down, SIGTERM)."""

from __future__ import annotations

import json
import random
import re
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_harness import Proc, Stack, clean_env, free_port, wait_http
from svc_helpers import FAST_MEASURE, job_body

from search.evaluators.types import EvalTask, MeasureSettings
from service.worker import (
    Backoff,
    WorkerConfig,
    WorkerError,
    adapt_task,
    load_data_sources,
)

# --------------------------------------------------------------------------- backoff


def test_backoff_grows_exponentially_and_is_capped():
    b = Backoff(base=0.5, factor=2.0, cap=8.0, jitter=0.0)
    assert [b.next() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    b.reset()
    assert b.next() == 0.5


def test_backoff_jitter_stays_in_band_and_spreads():
    b = Backoff(base=1.0, factor=2.0, cap=30.0, jitter=0.5, rng=random.Random(1))
    delays = []
    for _ in range(200):
        ceiling = b.ceiling()
        d = b.next()
        assert ceiling * 0.5 <= d <= ceiling <= 30.0
        delays.append(d)
    capped = delays[10:]  # all at the cap by now: jitter must still spread them
    assert max(capped) <= 30.0
    assert statistics.pstdev(capped) > 2.0
    # two workers with different seeds do not reconnect in lock step
    other = Backoff(base=1.0, cap=30.0, rng=random.Random(2))
    assert [round(other.next(), 6) for _ in range(5)] != [round(d, 6) for d in delays[:5]]


def test_backoff_huge_attempt_count_does_not_overflow():
    b = Backoff(base=0.5, cap=30.0, jitter=0.0)
    b.attempt = 10_000
    assert b.next() == 30.0


def test_backoff_rejects_nonsense():
    with pytest.raises(ValueError):
        Backoff(base=0)
    with pytest.raises(ValueError):
        Backoff(base=5, cap=1)


# --------------------------------------------------------------------------- config


def _cfg(**kw):
    base = dict(server="http://127.0.0.1:8000", target="cpu", token="t")
    base.update(kw)
    return WorkerConfig(**base)


def test_worker_config_validation():
    c = _cfg(server="http://api:8000/", runtimes=["eager", "eager", "onnxruntime"])
    assert c.server == "http://api:8000"
    assert c.runtimes == ["eager", "onnxruntime"]
    assert c.name  # a default name is made up
    for kw, msg in [
        (dict(token=""), "FITNAS_WORKER_TOKEN"),
        (dict(server="api:8000"), "http(s)://"),
        (dict(device="gpu"), "--device"),
        (dict(runtimes=["tensorrt"]), "unknown runtime"),
        (dict(poll_wait_s=60), "--poll-wait"),
        (dict(target=" "), "--target"),
    ]:
        with pytest.raises(WorkerError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            _cfg(**kw)


def test_data_sources_from_file_env_and_errors(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "arr.npz").write_bytes(b"")
    f = tmp_path / "sources.json"
    f.write_text(json.dumps({"mine": "imgs", "arr": str(tmp_path / "arr.npz")}))
    got = load_data_sources(f)
    assert got == {"mine": str(tmp_path / "imgs"), "arr": str(tmp_path / "arr.npz")}
    # the environment: a file, inline JSON (wins on equal names), or a path in the latter
    monkeypatch.chdir(tmp_path)
    assert load_data_sources(None, {"FITNAS_DATA_SOURCES": '{"mine": "imgs"}'}) == {
        "mine": str(tmp_path / "imgs")}
    assert load_data_sources(None, {"FITNAS_DATA_SOURCES": str(f)}) == got
    assert load_data_sources(None, {"FITNAS_DATA_SOURCES_FILE": str(f)}) == got
    both = load_data_sources(None, {"FITNAS_DATA_SOURCES_FILE": str(f),
                                    "FITNAS_DATA_SOURCES": '{"arr": "imgs"}'})
    assert both == {"mine": str(tmp_path / "imgs"), "arr": str(tmp_path / "imgs")}
    assert load_data_sources(None, {}) == {}
    assert load_data_sources(None, {"FITNAS_DATA_SOURCES": "  "}) == {}
    # --data-sources wins over the environment
    assert load_data_sources(f, {"FITNAS_DATA_SOURCES": '{"x": "nope"}'}) == got
    bad = [
        ({"mine": "missing"}, "does not exist"),
        ({"digits": "imgs"}, "built in"),
        ({"x": "sources.json"}, "neither a directory nor a .npz"),
        (["imgs"], "JSON object"),
        ({"bad name": "imgs"}, "bad data source name"),
    ]
    for data, msg in bad:
        f.write_text(json.dumps(data))
        with pytest.raises(WorkerError, match=msg):
            load_data_sources(f)
    f.write_text("{nope")
    with pytest.raises(WorkerError, match="not valid JSON"):
        load_data_sources(f)
    with pytest.raises(WorkerError, match="FITNAS_DATA_SOURCES: data sources are not valid"):
        load_data_sources(None, {"FITNAS_DATA_SOURCES": "{nope"})
    with pytest.raises(WorkerError, match="cannot read"):
        load_data_sources(tmp_path / "absent.json")


def test_adapt_task_fits_device_and_refuses_mismatches():
    spec = {"name": "x"}
    task = EvalTask(spec=spec, measure=MeasureSettings(device="cuda", runtime="eager"))
    fitted = adapt_task(task, "cuda:1", ["eager"])
    assert isinstance(fitted, EvalTask) and fitted.measure.device == "cuda:1"
    assert task.measure.device == "cuda"  # the original is left alone
    assert "measures on 'cpu'" in adapt_task(task, "cpu", ["eager"])
    ort = EvalTask(spec=spec, measure=MeasureSettings(runtime="onnxruntime"))
    assert "needs runtime 'onnxruntime'" in adapt_task(ort, "cpu", ["eager", "torchscript"])
    quality_only = EvalTask(spec=spec, measure=None)
    assert adapt_task(quality_only, "cpu", ["eager"]) is quality_only


# --------------------------------------------------------------------------- against the API
#
# One real API (``fitnas serve`` as a subprocess, SQLite) for this module, with short
# leases so that a missing heartbeat shows within seconds. Every test uses its own target
# (its own worker token) so that its worker sees only its own tasks.

LEASE_TIMEOUT_S = 2.5
HEARTBEAT_S = 0.5


@dataclass
class Api:
    url: str
    db_url: str
    headers: dict[str, str]
    stack: Stack
    workdir: Path
    early_worker: Proc
    early_target: str
    early_token: str

    def token(self, target: str) -> str:
        from service.db import Database
        from service.tokens import create_worker_token

        db = Database(self.db_url)
        try:
            token, _ = create_worker_token(db, target)
        finally:
            db.dispose()
        return token

    def worker(self, name: str, target: str, token: str, *extra: str) -> Proc:
        argv = ["fitnas", "worker", "--server", self.url, "--target", target,
                "--poll-wait", "1", "--backoff-cap", "2", "--log-level", "debug", *extra]
        return self.stack.start(name, argv, clean_env({"FITNAS_WORKER_TOKEN": token}))

    def submit(self, target: str, trials: int, quality: dict | None = None, **measure) -> str:
        body = job_body(target, trials=trials, parallelism=1,
                        measure={**FAST_MEASURE, "max_cv": 1.0, **measure},
                        quality=quality or {"signal": "none"})
        r = httpx.post(f"{self.url}/v1/jobs", json=body, headers=self.headers, timeout=30)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict:
        r = httpx.get(f"{self.url}/v1/jobs/{job_id}", headers=self.headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_job(self, job_id: str, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not finished after {timeout} s: {job}\n"
                             + self.stack.logs())

    def cancel(self, job_id: str) -> None:
        httpx.post(f"{self.url}/v1/jobs/{job_id}/cancel", headers=self.headers, timeout=30)

    def tasks(self, job_id: str) -> list[dict]:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT trial_number, state, attempts_used, told_at, outcome "
                         "FROM fitnas_tasks WHERE job_id = :j ORDER BY trial_number"),
                    {"j": job_id},
                ).mappings().all()
        finally:
            engine.dispose()
        return [dict(r) for r in rows]


def wait_log(proc: Proc, pattern: str, timeout: float = 120, count: int = 1) -> list[str]:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [ln for ln in proc.log().splitlines() if rx.search(ln)]
        if len(hits) >= count:
            return hits
        if not proc.alive():
            break
        time.sleep(0.1)
    raise AssertionError(f"{proc.name}: no {count} x {pattern!r} in its log "
                         f"(alive: {proc.alive()}):\n{proc.log()[-4000:]}")


def wait_exit(proc: Proc, timeout: float) -> int:
    try:
        return proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.name} still running after {timeout} s:\n"
                             f"{proc.log()[-3000:]}") from None


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    import migrations
    from service.db import Database
    from service.tokens import create_api_key, create_worker_token

    work = tmp_path_factory.mktemp("worker-api")
    db_url = f"sqlite:///{work}/fitnas.db"
    migrations.upgrade(db_url)
    db = Database(db_url)
    try:
        key, _ = create_api_key(db, "tester")
        early_target = "early"
        early_token, _ = create_worker_token(db, early_target)
    finally:
        db.dispose()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack = Stack(work)
    ctx = Api(url, db_url, {"Authorization": f"Bearer {key}"}, stack, work, None,  # type: ignore[arg-type]
              early_target, early_token)
    try:
        # A worker started BEFORE the API: it must wait with backoff, then connect. It has
        # a data set of its own for the 'train' signal.
        rng = np.random.default_rng(0)
        x = rng.random((48, 8, 8), dtype=np.float32)
        y = (x.mean(axis=(1, 2)) > 0.5).astype(np.int64)
        np.savez(work / "blobs.npz", x=x, y=y)
        (work / "sources.json").write_text(json.dumps({"blobs": "blobs.npz"}))
        ctx.early_worker = ctx.worker("worker-early", early_target, early_token,
                                      "--data-sources", str(work / "sources.json"))
        wait_log(ctx.early_worker, r"unavailable .* retrying in", count=3, timeout=120)
        env = clean_env({
            "FITNAS_DATABASE_URL": db_url,
            "FITNAS_LEASE_TIMEOUT_S": str(LEASE_TIMEOUT_S),
            "FITNAS_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            "FITNAS_SCHEDULER_INTERVAL_S": "0.2",
            "FITNAS_LEASE_POLL_INTERVAL_S": "0.05",
            "FITNAS_EXPORT_DIR": str(work / "exports"),
        })
        api_proc = stack.start("api", ["fitnas", "serve", "--host", "127.0.0.1", "--port",
                                       str(port)], env)
        wait_http(f"{url}/readyz", timeout=120, proc=api_proc)
        yield ctx
    finally:
        stack.stop_all()


def test_worker_started_before_the_api_backs_off_then_heartbeats_and_reports(api):
    early = api.early_worker
    wait_log(early, r"registered as", timeout=60)
    # capped exponential backoff with jitter while the API was down
    delays = [float(m) for m in re.findall(r"retrying in ([0-9.]+) s", early.log())]
    assert len(delays) >= 3
    assert max(delays) <= 2.0  # --backoff-cap 2
    assert delays[2] > delays[0]  # grows: 0.25-0.5, 0.5-1, 1-2 s

    # a task whose evaluation outlives the lease timeout: only heartbeats keep it.
    # Quality: a proxy on a minibatch of a data set that the job only names; the worker's
    # own configuration says where it is. (Training is a trainer's: tests/test_trainers.py.)
    job_id = api.submit(api.early_target, trials=1, rounds=3, min_run_time_s=1.0,
                        quality={"signal": "naswot", "data": "blobs", "batch": 8,
                                 "resolution": 16})
    job = api.wait_job(job_id)
    assert job["status"] == "completed", job
    assert job["progress"]["finished"] == 1 and job["progress"]["measured"] == 1
    tasks = api.tasks(job_id)
    assert [t["state"] for t in tasks] == ["done"]
    assert [t["attempts_used"] for t in tasks] == [0]  # the lease never expired
    for t in tasks:
        outcome = t["outcome"] if isinstance(t["outcome"], dict) else json.loads(t["outcome"])
        q = outcome["quality"]
        assert q["signal"] == "naswot" and q["details"]["data"] == "blobs"
        assert q["details"]["source"] == str(api.workdir / "blobs.npz")
        assert q["details"]["n_train"] + q["details"]["n_val"] == 48
        # the worker's warm child, held for its lifetime: no interpreter start per task
        assert outcome["evaluator"]["mode"] == "warm"
    log = early.log()
    evals = [float(s) for s in re.findall(r"evaluated in ([0-9.]+) s", log)]
    assert len(evals) == 1 and evals[0] > LEASE_TIMEOUT_S
    beats = re.findall(r"lease extended \(heartbeat (\d+)\)", log)
    assert len(beats) >= int(LEASE_TIMEOUT_S / HEARTBEAT_S)
    assert log.count("reported, ok") == 1
    assert "lease lost" not in log

    # idle: SIGTERM stops it cleanly within about one long-poll window
    t0 = time.monotonic()
    early.popen.send_signal(signal.SIGTERM)
    assert wait_exit(early, timeout=30) == 0
    assert time.monotonic() - t0 < 15
    assert "exiting: 1 leased, 1 reported" in early.log()


def test_sigterm_releases_a_task_it_cannot_finish_then_another_worker_finishes(api):
    import psutil

    target = "release"
    token = api.token(target)
    job_id = api.submit(target, trials=1, rounds=6, min_run_time_s=0.5)
    w1 = api.worker("worker-release-1", target, token, "--grace", "0.5")
    wait_log(w1, r"\(attempt 1\): evaluating")
    time.sleep(0.5)
    children = psutil.Process(w1.popen.pid).children(recursive=True)
    assert children, "the evaluation runs in a child process"
    t0 = time.monotonic()
    w1.popen.send_signal(signal.SIGTERM)
    assert wait_exit(w1, timeout=30) == 0
    assert time.monotonic() - t0 < 20
    log = w1.log()
    assert "did not finish in time; releasing it" in log and ": released" in log
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    [task] = api.tasks(job_id)
    assert task["state"] == "queued" and task["attempts_used"] == 0  # no attempt spent

    # the next worker gets it (attempt 1 again) and, told to stop while evaluating with a
    # long enough grace period, finishes and reports before exiting
    w2 = api.worker("worker-release-2", target, token, "--grace", "200")
    wait_log(w2, r"\(attempt 1\): evaluating")
    w2.popen.send_signal(signal.SIGTERM)
    assert wait_exit(w2, timeout=240) == 0
    log2 = w2.log()
    assert "waiting up to 200 s for the evaluation to finish" in log2
    assert "reported, ok" in log2
    job = api.wait_job(job_id, timeout=60)
    assert job["status"] == "completed" and job["progress"]["measured"] == 1
    [task] = api.tasks(job_id)
    assert task["state"] == "done" and task["attempts_used"] == 0


def test_worker_token_for_another_target_is_refused_in_one_line(api):
    token = api.token("scoped-a")
    p = api.worker("worker-wrong-target", "scoped-b", token)
    assert wait_exit(p, timeout=60) == 2
    lines = [ln for ln in p.log().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "403" in lines[-1], lines
    assert "Traceback" not in p.log()


@pytest.mark.slow
def test_lease_lost_409_drops_the_task_and_it_is_told_once(api):
    """A worker frozen (SIGSTOP) past its lease: the reaper re-queues the task; when the
    worker wakes its heartbeat (or result) gets 409 and it drops the task; the task runs
    again and the trial is told exactly once."""
    target = "frozen"
    token = api.token(target)
    job_id = api.submit(target, trials=1, rounds=8, min_run_time_s=0.5)
    w = api.worker("worker-frozen", target, token)
    wait_log(w, r"\(attempt 1\): evaluating")
    w.popen.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            [task] = api.tasks(job_id)
            if task["attempts_used"] == 1:
                break
            time.sleep(0.2)
        assert task["state"] == "queued" and task["attempts_used"] == 1, task
    finally:
        w.popen.send_signal(signal.SIGCONT)
    wait_log(w, r"lease lost")
    wait_log(w, r"\(attempt 2\): evaluating")
    job = api.wait_job(job_id)
    assert job["status"] == "completed" and job["progress"]["finished"] == 1
    [task] = api.tasks(job_id)
    assert task["state"] == "done" and task["attempts_used"] == 1
    assert w.log().count("reported, ok") == 1
    w.popen.send_signal(signal.SIGTERM)
    assert wait_exit(w, timeout=30) == 0


@pytest.mark.slow
def test_result_survives_an_api_restart(tmp_path):
    """The API goes away while a task is evaluated: the worker keeps retrying (heartbeats
    and the result) with backoff until it is back; nothing is lost, nothing told twice."""
    import migrations
    from service.db import Database
    from service.tokens import create_api_key, create_worker_token

    db_url = f"sqlite:///{tmp_path}/fitnas.db"
    migrations.upgrade(db_url)
    db = Database(db_url)
    try:
        key, _ = create_api_key(db, "tester")
        token, _ = create_worker_token(db, "restart")
    finally:
        db.dispose()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_env({"FITNAS_DATABASE_URL": db_url, "FITNAS_LEASE_TIMEOUT_S": "120",
                     "FITNAS_HEARTBEAT_INTERVAL_S": "0.5", "FITNAS_SCHEDULER_INTERVAL_S": "0.2",
                     "FITNAS_EXPORT_DIR": str(tmp_path / "exports")})
    stack = Stack(tmp_path)
    api = Api(url, db_url, {"Authorization": f"Bearer {key}"}, stack, tmp_path, None,  # type: ignore[arg-type]
              "restart", token)
    try:
        a1 = stack.start("api-1", ["fitnas", "serve", "--host", "127.0.0.1", "--port",
                                   str(port)], env)
        wait_http(f"{url}/readyz", timeout=120, proc=a1)
        job_id = api.submit("restart", trials=1, rounds=10, min_run_time_s=0.5)
        w = api.worker("worker-restart", "restart", token)
        wait_log(w, r"\(attempt 1\): evaluating")
        a1.terminate()
        wait_log(w, r"heartbeat failed")
        wait_log(w, r"evaluated in", timeout=240)
        wait_log(w, r"reporting failed .* retrying in")
        a2 = stack.start("api-2", ["fitnas", "serve", "--host", "127.0.0.1", "--port",
                                   str(port)], env)
        wait_http(f"{url}/readyz", timeout=120, proc=a2)
        wait_log(w, r"reported, ok", timeout=60)
        job = api.wait_job(job_id)
        assert job["status"] == "completed" and job["progress"]["measured"] == 1
        [task] = api.tasks(job_id)
        assert task["state"] == "done" and task["attempts_used"] == 0
    finally:
        stack.stop_all()
