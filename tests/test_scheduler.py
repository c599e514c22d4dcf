"""The scheduler driving SearchDriver through the real HTTP task protocol: every trial
told exactly once, nothing left RUNNING, Pareto set and winner stored, the shared
measurement cache, parallelism bounded by live workers, pre-screening, per-job locks
between replicas, restarts and orphaned trials, the real evaluator."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from svc_helpers import FAST_MEASURE, HttpWorker, job_body

from service.models import Job, Task, Worker
from service.scheduler import Scheduler


def _get(client, h, job_id):
    return client.get(f"/v1/jobs/{job_id}", headers=h).json()


def drive(app, client, h, job_id, workers, *, duplicates=False, max_rounds=400):
    """Tick, let each worker do one task, until the job is finalized."""
    sched = app.state.scheduler
    for i in range(max_rounds):
        sched.tick()
        for w in workers:
            lease = w.lease()
            if lease is None:
                continue
            r = w.result(lease)
            assert r.json() == {"accepted": True, "duplicate": False}, r.text
            if duplicates and i % 3 == 0:
                assert w.result(lease).json() == {"accepted": False, "duplicate": True}
        job = _get(client, h, job_id)
        if job["finalized"]:
            return job
    raise AssertionError(f"job {job_id} did not finish: {job}")


def _study(settings, job):
    from service.studies import load_study

    return load_study(settings.optuna_url, job["study_name"])


def _tasks(app, job_id):
    return app.state.db.run(
        lambda s: list(s.execute(select(Task).where(Task.job_id == job_id)).scalars()),
        write=False,
    )


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.timeout(300)
def test_forty_trials_two_workers_each_told_once(client, app, settings, user_key,
                                                 make_worker_token):
    from optuna.trial import TrialState

    _, h = user_key
    target, wh = make_worker_token()
    workers = [HttpWorker(client, wh, target, name=f"w{i}") for i in range(2)]
    for w in workers:
        w.register()
    body = job_body(target, trials=40, parallelism=2, sampler="tpe", seed=3,
                    budgets={"max_params": 4000})
    job = client.post("/v1/jobs", headers=h, json=body).json()
    final = drive(app, client, h, job["id"], workers, duplicates=True)

    assert final["status"] == "completed" and final["finalized"]
    p = final["progress"]
    assert p["finished"] == 40 and p["running"] == 0
    assert p["measured"] + p["cached"] + p["over_budget"] + p["failed"] == 40
    assert p["measured"] > 0 and p["failed"] == 0

    study = _study(settings, job)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 40
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    measured = {t.number for t in trials if t.user_attrs.get("status") == "measured"}

    tasks = _tasks(app, job["id"])
    numbers = [t.trial_number for t in tasks]
    assert len(numbers) == len(set(numbers))  # one task per trial
    assert set(numbers) == measured  # every measured trial came from exactly one task
    assert all(t.state == "done" and t.told_at is not None for t in tasks)
    # told exactly once: the scheduler's tell count equals the number of trials
    text = client.get("/metrics").text
    told = sum(_metric(text, "fitnas_trials_completed_total", how=how, target=target)
               for how in ("measured", "cached", "over_budget", "failed", "interrupted"))
    assert told == 40
    assert _metric(text, "fitnas_trials_completed_total", how="measured",
                   target=target) == len(tasks)
    assert _metric(text, "fitnas_task_results_total", kind="duplicate", target=target) > 0

    # Pareto set: feasible, non-dominated, sorted by latency; the winner is on it
    pareto = client.get(f"/v1/jobs/{job['id']}/pareto", headers=h).json()
    assert pareto["final"] and pareto["items"]
    front = pareto["items"]
    feasible = client.get(f"/v1/jobs/{job['id']}/trials?feasible=true&limit=500",
                          headers=h).json()["items"]
    assert feasible and all(t["params"] <= 4000 for t in feasible)
    for f in front:
        assert f["feasible"]
        for t in feasible:
            q, lat = t["values"]["quality"], t["values"]["latency_ms"]
            fq, flat = f["values"]["quality"], f["values"]["latency_ms"]
            assert not (q >= fq and lat <= flat and (q > fq or lat < flat)), (t, f)
    lats = [f["values"]["latency_ms"] for f in front]
    assert lats == sorted(lats)
    winner = client.get(f"/v1/jobs/{job['id']}/winner", headers=h).json()
    assert winner["final"] and winner["trial"]["number"] in {f["number"] for f in front}
    best_q = max(t["values"]["quality"] for t in feasible)
    assert winner["trial"]["values"]["quality"] == best_q
    assert final["best"]["values"]["quality"] == best_q

    # exports of the winner: JSON spec (same hash) and standalone PyTorch source
    from blocks.spec import ArchSpec

    r = client.get(f"/v1/jobs/{job['id']}/export?format=json", headers=h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert ArchSpec.model_validate_json(r.content).hash == winner["trial"]["spec_hash"]
    assert f"trial{winner['trial']['number']}" in r.headers["content-disposition"]
    r = client.get(f"/v1/jobs/{job['id']}/export?format=pytorch", headers=h)
    assert r.status_code == 200 and b"def build_model" in r.content
    other = next(t for t in feasible if t["number"] != winner["trial"]["number"])
    r = client.get(f"/v1/jobs/{job['id']}/export?format=json&trial={other['number']}",
                   headers=h)
    assert ArchSpec.model_validate_json(r.content).hash == other["spec_hash"]
    r = client.get(f"/v1/jobs/{job['id']}/export?format=json&trial=999", headers=h)
    assert r.status_code == 404

    # the finished job is reviewable in optuna-dashboard: notes and Pareto artifacts
    import optuna

    study = optuna.load_study(study_name=job["study_name"],
                              storage=settings.optuna_url)
    notes = {k for k in study._storage.get_study_system_attrs(study._study_id)
             if k.startswith("dashboard:")}
    assert notes, "no dashboard notes written"
    for f in front:
        t = study.trials[f["number"]]
        names = sorted(json.loads(v)["filename"] for k, v in t.system_attrs.items()
                       if k.startswith("artifacts:"))
        assert names == ["model.json", "model.onnx", "model.py"], names
    assert any(Path(settings.artifact_dir).iterdir())


@pytest.mark.timeout(300)
def test_identical_second_job_is_served_from_the_cache(client, app, user_key,
                                                       make_worker_token):
    _, h = user_key
    target, wh = make_worker_token()
    worker = HttpWorker(client, wh, target)
    worker.register()
    body = job_body(target, trials=6, parallelism=2, sampler="random", seed=11)
    first = client.post("/v1/jobs", headers=h, json=body).json()
    a = drive(app, client, h, first["id"], [worker])
    assert a["status"] == "completed" and a["progress"]["measured"] >= 4

    second = client.post("/v1/jobs", headers=h, json=body).json()
    assert second["id"] != first["id"]
    b = drive(app, client, h, second["id"], [worker])
    assert b["status"] == "completed" and b["progress"]["finished"] == 6
    assert b["progress"]["cached"] == 6 and b["progress"]["measured"] == 0
    assert _tasks(app, second["id"]) == []  # nothing reached a worker
    ta = client.get(f"/v1/jobs/{first['id']}/trials", headers=h).json()["items"]
    tb = client.get(f"/v1/jobs/{second['id']}/trials", headers=h).json()["items"]
    assert [t["values"] for t in ta] == [t["values"] for t in tb]
    assert b["best"]["values"] == a["best"]["values"]

    # the cache served them: its rows carry the first job's id and count the hits
    from service.models import Measurement

    rows = app.state.db.run(lambda s: list(s.execute(
        select(Measurement).where(Measurement.target == target)).scalars()), write=False)
    assert rows and {r.source_job_id for r in rows} == {first["id"]}
    assert sum(r.hits for r in rows) >= 6


def test_cache_keys_separate_targets_and_settings(app):
    from search.evaluators.types import EvalOutcome, MeasureSettings
    from service.cache import DBMeasurementCache

    db = app.state.db
    ok = EvalOutcome.model_validate({"ok": True, "seconds": 1.0})
    key_a = MeasureSettings().key("spechash", "target-a")
    assert key_a != MeasureSettings().key("spechash", "target-b")
    assert key_a != MeasureSettings(runtime="onnxruntime").key("spechash", "target-a")
    assert key_a != MeasureSettings(batch=8).key("spechash", "target-a")
    assert key_a == MeasureSettings(rounds=20).key("spechash", "target-a")  # effort only
    cache = DBMeasurementCache(db, target="target-a", job_id="j1")
    assert cache.get(key_a) is None
    cache.put(key_a, ok)
    assert cache.get(key_a) == ok
    # first stored outcome wins; transient failures are never cached
    cache.put(key_a, EvalOutcome.model_validate({"ok": True, "seconds": 9.0}))
    assert cache.get(key_a).seconds == 1.0
    key_b = MeasureSettings().key("other", "target-a")
    cache.put(key_b, EvalOutcome.model_validate(
        {"ok": False, "failure": {"reason": "timeout", "message": "slow"}}))
    assert cache.get(key_b) is None
    assert cache.hits == 2 and cache.misses == 2


def test_both_measurement_caches_follow_one_policy(app, tmp_path):
    """fitnas search's cache and the service's keep the same outcomes: successes only,
    the first one stored for a key."""
    from search.evaluators.types import EvalOutcome, MeasureSettings
    from search.study import SQLMeasurementCache
    from service.cache import DBMeasurementCache

    first = EvalOutcome.model_validate({"ok": True, "seconds": 1.0})
    later = EvalOutcome.model_validate({"ok": True, "seconds": 9.0})
    for reason in ("unsupported", "timeout"):
        failed = EvalOutcome.model_validate(
            {"ok": False, "failure": {"reason": reason, "message": "no"}})
        caches = (DBMeasurementCache(app.state.db, target="agree"),
                  SQLMeasurementCache(f"sqlite:///{tmp_path}/local-{reason}.db"))
        for i, cache in enumerate(caches):
            key = MeasureSettings().key(f"agree-{reason}-{i}-{tmp_path.name}", "agree")
            cache.put(key, first)
            cache.put(key, later)
            assert cache.get(key).seconds == 1.0
            other = MeasureSettings().key(f"fails-{reason}-{i}-{tmp_path.name}", "agree")
            cache.put(other, failed)
            assert cache.get(other) is None


def test_parallelism_is_bounded_by_live_workers(client, app, settings, user_key,
                                                make_worker_token):
    _, h = user_key
    target, wh = make_worker_token()
    job = client.post("/v1/jobs", headers=h,
                      json=job_body(target, trials=20, parallelism=3)).json()
    sched = app.state.scheduler

    def inflight():
        return sum(1 for t in _tasks(app, job["id"]) if t.state in ("queued", "leased"))

    sched.tick()
    assert inflight() == 1  # no worker yet: one task waits for the first to come
    workers = [HttpWorker(client, wh, target, name=f"w{i}") for i in range(5)]
    for w in workers[:2]:
        w.register()
    sched.tick()
    assert inflight() == 3  # two workers, and one task queued for whichever is done first
    for w in workers[2:]:
        w.register()
    sched.tick()
    assert inflight() == 3  # now the job's own parallelism binds
    # two workers go silent: they no longer count
    stale = utcnow_minus(settings.worker_timeout_s + 5)
    app.state.db.run(lambda s: s.execute(
        update(Worker).where(Worker.id.in_([w.worker_id for w in workers[:4]]))
        .values(last_heartbeat_at=stale)))
    for _ in range(3):
        lease = workers[4].lease()
        assert lease is not None
        workers[4].result(lease)
        sched.tick()
    assert inflight() == 2  # one live worker: its task and the next one, queued
    t = client.get(f"/v1/targets/{target}", headers=h).json()
    assert t["live_workers"] == 1


def utcnow_minus(seconds: float):
    from service.db import utcnow

    return utcnow() - timedelta(seconds=seconds)


def test_over_budget_trials_never_reach_workers(client, app, user_key, make_worker_token):
    _, h = user_key
    target, _ = make_worker_token()
    # a budget no network of the space meets is refused before anything runs
    r = client.post("/v1/jobs", headers=h, json=job_body(
        target, trials=5, budgets={"max_params": 500}))
    assert r.status_code == 422 and "budgets.max_params 500" in r.json()["detail"]
    # one that only the space's very smallest networks meet: the sampled ones are over it
    job = client.post("/v1/jobs", headers=h, json=job_body(
        target, trials=5, budgets={"max_params": 1195})).json()
    report = app.state.scheduler.tick()
    assert report.jobs[job["id"]].over_budget == 5
    got = _get(client, h, job["id"])
    assert got["status"] == "completed"
    assert got["progress"]["over_budget"] == 5 and got["progress"]["finished"] == 5
    assert _tasks(app, job["id"]) == []
    trials = client.get(f"/v1/jobs/{job['id']}/trials", headers=h).json()["items"]
    assert all(t["state"] == "PRUNED" and t["constraints"]["params"] > 0 for t in trials)
    assert all(t["params"] > 1195 for t in trials)
    assert client.get(f"/v1/jobs/{job['id']}/pareto", headers=h).json()["items"] == []
    w = client.get(f"/v1/jobs/{job['id']}/winner", headers=h).json()
    assert w["final"] and w["trial"] is None and w["exports"] == {}
    r = client.get(f"/v1/jobs/{job['id']}/export?format=onnx", headers=h)
    assert r.status_code == 404 and "no trial met every budget" in r.json()["detail"]


def test_job_lock_keeps_a_second_replica_out(client, app, settings, user_key,
                                            make_worker_token):
    _, h = user_key
    target, _ = make_worker_token()
    job = client.post("/v1/jobs", headers=h, json=job_body(target, trials=4)).json()
    a = Scheduler(app.state.db, settings, owner="replica-a")
    b = Scheduler(app.state.db, settings, owner="replica-b")
    assert a._claim(job["id"])  # replica A is in the middle of a tick
    rep = b.tick()
    assert job["id"] in rep.skipped_locked and job["id"] not in rep.jobs
    assert _tasks(app, job["id"]) == []
    # a lock past its expiry (replica A died) is taken over
    app.state.db.run(lambda s: s.execute(
        update(Job).where(Job.id == job["id"]).values(lock_expires_at=utcnow_minus(1))))
    rep = b.tick()
    assert job["id"] in rep.jobs and rep.jobs[job["id"]].queued == 1
    owner = app.state.db.run(lambda s: s.get(Job, job["id"]).lock_owner, write=False)
    assert owner is None  # released at the end of the tick


@pytest.mark.timeout(300)
def test_two_replicas_ticking_concurrently(client, app, settings, user_key,
                                          make_worker_token):
    _, h = user_key
    target, wh = make_worker_token()
    workers = [HttpWorker(client, wh, target, name=f"w{i}") for i in range(3)]
    for w in workers:
        w.register()
    jobs = [client.post("/v1/jobs", headers=h,
                        json=job_body(target, trials=4, parallelism=3, seed=i)).json()
            for i in range(2)]
    replicas = [Scheduler(app.state.db, settings, owner=f"replica-{i}") for i in range(2)]
    stop = threading.Event()
    errors: list[str] = []

    def tick_loop(s):
        while not stop.is_set():
            try:
                rep = s.tick()
                errors.extend(rep.errors.values())
            except Exception as exc:  # surfaced below
                errors.append(repr(exc))

    threads = [threading.Thread(target=tick_loop, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    try:
        for _ in range(600):
            for w in workers:
                lease = w.lease(wait_s=0.05)
                if lease is not None:
                    assert w.result(lease).json()["accepted"]
            if all(_get(client, h, j["id"])["finalized"] for j in jobs):
                break
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors
    for j in jobs:
        got = _get(client, h, j["id"])
        assert got["status"] == "completed" and got["progress"]["finished"] == 4
        study = _study(settings, j)
        assert len(study.trials) == 4  # nobody asked twice for one slot
        numbers = [t.trial_number for t in _tasks(app, j["id"])]
        assert len(numbers) == len(set(numbers))


def test_restart_and_orphaned_trials(client, app, settings, user_key, make_worker_token):
    """State is only in the database: a new scheduler (a restarted API) picks the job
    up, and a trial asked by a scheduler that died before queueing it is failed as
    interrupted and asked again."""
    from search.study import SearchConfig, SearchDriver
    from service.studies import get_storage

    _, h = user_key
    target, wh = make_worker_token()
    worker = HttpWorker(client, wh, target)
    worker.register()
    job = client.post("/v1/jobs", headers=h, json=job_body(target, trials=3)).json()
    first = Scheduler(app.state.db, settings, owner="before-restart")
    first.tick()
    lease = worker.lease()
    # the dying scheduler asked one more trial but never queued it
    cfg = app.state.db.run(lambda s: s.get(Job, job["id"]).config, write=False)
    driver = SearchDriver.open(get_storage(settings.optuna_url), job["study_name"],
                               SearchConfig.model_validate(cfg), mode="service")
    orphan = driver.ask()
    assert orphan.task is not None
    del first  # "restart"
    second = Scheduler(app.state.db, settings, owner="after-restart")
    assert worker.result(lease).json()["accepted"]
    rep = second.tick()
    assert rep.jobs[job["id"]].stale_failed == 1 and rep.jobs[job["id"]].told == 1
    for _ in range(50):
        lease = worker.lease()
        if lease is not None:
            worker.result(lease)
        second.tick()
        got = _get(client, h, job["id"])
        if got["finalized"]:
            break
    assert got["status"] == "completed"
    assert got["progress"]["finished"] == 3 and got["progress"]["interrupted"] == 1
    trials = {t["number"]: t for t in
              client.get(f"/v1/jobs/{job['id']}/trials", headers=h).json()["items"]}
    assert len(trials) == 4
    assert trials[orphan.trial_number]["state"] == "FAIL"
    assert trials[orphan.trial_number]["status"] == "interrupted"


def test_a_real_measurement_flows_through(client, app, settings, user_key,
                                         make_worker_token):
    """One task measured by the real evaluator (in-process, fast settings)."""
    from search.evaluators.runner import evaluate
    from search.evaluators.types import EvalTask

    if not settings.database_url.startswith("sqlite"):
        pytest.skip("the evaluator does not touch the database: checked once, on SQLite")

    _, h = user_key
    target, wh = make_worker_token()
    worker = HttpWorker(client, wh, target)
    worker.register()
    measure = {**FAST_MEASURE, "max_cv": 1.0}  # one timed pass is enough here
    job = client.post("/v1/jobs", headers=h,
                      json=job_body(target, trials=1, measure=measure)).json()
    app.state.scheduler.tick()
    lease = worker.lease()
    outcome = evaluate(EvalTask.model_validate(lease["task"]), isolated=False)
    assert outcome.ok, outcome.failure
    assert worker.result(lease, outcome.model_dump(mode="json")).json()["accepted"]
    app.state.scheduler.tick()
    got = _get(client, h, job["id"])
    assert got["status"] == "completed" and got["progress"]["measured"] == 1
    best = got["best"]
    assert best["values"]["latency_ms"] == pytest.approx(outcome.latency.latency_ms.median)
    assert best["values"]["quality"] == pytest.approx(outcome.quality.value)
    assert best["params"] == outcome.latency.params
    n = app.state.db.run(lambda s: s.execute(
        select(func.count()).select_from(Task).where(Task.job_id == job["id"])).scalar_one(),
        write=False)
    assert n == 1


def test_cancel_during_a_tick_leaves_nothing_queued(client, app, settings, user_key,
                                                    make_worker_token):
    from optuna.trial import TrialState

    _, h = user_key
    target, wh = make_worker_token()
    workers = [HttpWorker(client, wh, target, name=f"w{i}") for i in range(2)]
    for w in workers:
        w.register()
    job = client.post("/v1/jobs", headers=h,
                      json=job_body(target, trials=6, parallelism=2)).json()
    sched = app.state.scheduler
    sched.tick()
    driver = sched._drivers[job["id"]]
    real_ask = driver.ask

    def ask_then_cancel():
        proposal = real_ask()
        assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=h).status_code == 200
        return proposal

    driver.ask = ask_then_cancel
    lease = workers[0].lease()
    assert workers[0].result(lease).json()["accepted"]
    rep = sched.tick()  # tells the result, asks once, the job is cancelled meanwhile
    assert job["id"] in rep.skipped_locked  # the new task was refused
    sched.tick()
    got = _get(client, h, job["id"])
    assert got["status"] == "cancelled" and got["finalized"]
    assert got["progress"]["measured"] == 1
    states = {t.state for t in _tasks(app, job["id"])}
    assert states <= {"done", "cancelled"}
    assert all(t.told_at is not None for t in _tasks(app, job["id"]))
    study = _study(settings, job)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    text = client.get("/metrics").text
    assert _metric(text, "fitnas_queue_depth", target=target) == 0


def test_a_job_the_driver_cannot_open_fails_with_its_reason(client, app, settings, user_key,
                                                           make_worker_token):
    import optuna

    from service.studies import get_storage

    _, h = user_key
    target, _ = make_worker_token()
    job = client.post("/v1/jobs", headers=h, json=job_body(target, trials=2)).json()
    # someone else's study already holds the job's study name
    squatter = optuna.create_study(storage=get_storage(settings.optuna_url),
                                   study_name=job["study_name"])
    squatter.tell(squatter.ask(), 1.0)
    rep = app.state.scheduler.tick()
    assert job["id"] in rep.errors
    got = _get(client, h, job["id"])
    assert got["status"] == "failed" and "not made by fitnas" in got["error"]
    assert _tasks(app, job["id"]) == []
    assert job["id"] not in app.state.scheduler._candidates()


def test_a_failed_job_cancels_its_tasks_like_a_cancel(client, app, user_key,
                                                      make_worker_token):
    """Failing a job (the driver keeps failing to sample) cancels its in-flight tasks the
    way a cancel does: a worker holding one gets 409, and each has its finished_at."""
    from search.study import SearchError

    _, h = user_key
    target, wh = make_worker_token()
    workers = [HttpWorker(client, wh, target, name=f"w{i}") for i in range(2)]
    for w in workers:
        w.register()
    job = client.post("/v1/jobs", headers=h,
                      json=job_body(target, trials=6, parallelism=2)).json()
    sched = app.state.scheduler
    sched.tick()
    leases = [w.lease() for w in workers]
    assert all(lease is not None for lease in leases)

    def broken_ask():
        raise SearchError("the space cannot be sampled")

    sched._drivers[job["id"]].ask = broken_ask
    assert workers[0].result(leases[0]).json()["accepted"]
    rep = sched.tick()  # tells the result, then asking fails three times: the job fails
    assert job["id"] in rep.errors
    got = _get(client, h, job["id"])
    assert got["status"] == "failed" and "cannot be sampled" in got["error"]
    r = workers[1].heartbeat(leases[1])
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]
    tasks = {t.id: t for t in _tasks(app, job["id"])}
    held = tasks[leases[1]["task_id"]]
    assert held.state == "cancelled" and held.finished_at is not None
    assert tasks[leases[0]["task_id"]].state == "done"


def test_inflight_cap_keeps_one_task_queued_beyond_live_workers():
    from service.scheduler import inflight_cap

    assert inflight_cap(3, 0) == 1  # no worker yet: one waits for the first
    assert [inflight_cap(2, n) for n in (1, 2, 5)] == [2, 2, 2]  # parallelism binds
    assert [inflight_cap(8, n) for n in (1, 2, 5)] == [2, 3, 6]
    assert inflight_cap(1, 4) == 1


def test_two_threads_of_one_scheduler_never_drive_one_job_at_once(
        client, app, settings, user_key, make_worker_token, monkeypatch):
    """The database lock admits its owner again; the scheduler's own per-job lock makes
    a tick called by hand while the loop's tick drives a job skip that job."""
    _, h = user_key
    target, _wh = make_worker_token()
    job = client.post("/v1/jobs", headers=h, json=job_body(target, trials=2)).json()
    sched = Scheduler(app.state.db, settings, owner="one-process")
    inside, release = threading.Event(), threading.Event()
    drives: list[str] = []
    real = sched._drive

    def slow_drive(job_id):
        drives.append(job_id)
        if job_id == job["id"] and len(drives) == 1:
            inside.set()
            assert release.wait(30)
        return real(job_id)

    monkeypatch.setattr(sched, "_drive", slow_drive)
    first = threading.Thread(target=sched.tick)
    first.start()
    try:
        assert inside.wait(30)
        report = sched.tick()  # the loop's tick is still inside the job
        assert job["id"] in report.skipped_locked and job["id"] not in report.jobs
        assert drives.count(job["id"]) == 1
    finally:
        release.set()
        first.join(30)
    assert sched.tick().jobs.get(job["id"]) is not None  # free again afterwards


def test_a_wake_during_a_tick_starts_the_next_tick_at_once():
    """A result that arrives while a tick runs wakes the loop; the next tick must not
    wait for the interval (30 s here)."""
    import asyncio

    from service.scheduler import SchedulerLoop

    class Stub:
        def __init__(self):
            self.ticks: list[float] = []
            self.loop: SchedulerLoop | None = None

        def tick(self):
            self.ticks.append(time.monotonic())
            if len(self.ticks) == 1:
                self.loop.wake()  # a result arrives during this tick

    async def run() -> list[float]:
        stub = Stub()
        loop = SchedulerLoop(stub, interval_s=30.0)
        stub.loop = loop
        await loop.start()
        for _ in range(200):
            if len(stub.ticks) >= 2:
                break
            await asyncio.sleep(0.01)
        await loop.stop()
        return stub.ticks

    ticks = asyncio.run(run())
    assert len(ticks) >= 2 and ticks[1] - ticks[0] < 1.0
