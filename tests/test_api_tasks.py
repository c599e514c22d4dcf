"""The worker <-> API task protocol: lease (long poll), heartbeat, result (accepted once,
duplicate no-op, stale 409), fail (attempts), release, lease expiry and re-queue,
concurrent leasing, metrics."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest
from svc_helpers import HttpWorker, job_body


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _setup(client, app, user_key, make_worker_token, **job):
    _, h = user_key
    target, wh = make_worker_token()
    worker = HttpWorker(client, wh, target)
    worker.register()
    created = client.post("/v1/jobs", headers=h, json=job_body(target, **job))
    assert created.status_code == 201, created.text
    return h, target, wh, worker, created.json()


def _trial(client, h, job_id, number):
    items = client.get(f"/v1/jobs/{job_id}/trials?limit=500", headers=h).json()["items"]
    return next(t for t in items if t["number"] == number)


def _poll_in_thread(worker: HttpWorker, wait_s: float) -> tuple[threading.Thread, dict]:
    """A long poll in a thread; returns once it has read once and waits (0.3 s). The
    dict gets the lease and the seconds it waited."""
    got: dict = {}

    def poll():
        t = time.monotonic()
        got["lease"] = worker.lease(wait_s=wait_s)
        got["waited"] = time.monotonic() - t

    th = threading.Thread(target=poll)
    th.start()
    time.sleep(0.3)
    return th, got


def test_long_poll_waits_then_returns_a_task_when_one_appears(client, app, user_key,
                                                              make_worker_token):
    _, h = user_key
    target, wh = make_worker_token()
    worker = HttpWorker(client, wh, target)
    worker.register()
    t0 = time.monotonic()
    assert worker.lease(wait_s=0) is None
    assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    assert worker.lease(wait_s=0.5) is None
    assert 0.45 <= time.monotonic() - t0 < 3.0
    r = client.post("/v1/tasks/lease", headers=wh,
                    json={"worker_id": worker.worker_id, "target": target, "wait_s": 31})
    assert r.status_code == 422

    th, got = _poll_in_thread(worker, wait_s=10)
    client.post("/v1/jobs", headers=h, json=job_body(target, trials=1))
    app.state.scheduler.tick()
    th.join(15)
    assert got["lease"] is not None and got["lease"]["attempt"] == 1
    assert 0.25 <= got["waited"] < 5.0
    task = got["lease"]["task"]
    assert task["measure"]["resolution"] == 32 and task["spec"]["num_classes"] == 10


def test_the_doorbell_wakes_a_waiting_long_poll_when_the_scheduler_queues(
        make_settings, user_key, make_worker_token):
    """With a 5 s poll interval, a waiting lease gets the task the scheduler of the same
    process has just queued at once (without the doorbell: at its next read, 5 s on)."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    slow = create_app(make_settings(lease_poll_interval_s=5.0))
    with TestClient(slow) as c:
        _, h = user_key
        target, wh = make_worker_token()
        worker = HttpWorker(c, wh, target)
        worker.register()
        th, got = _poll_in_thread(worker, wait_s=20)
        c.post("/v1/jobs", headers=h, json=job_body(target, trials=1))
        rings = slow.state.doorbell.rings
        t_tick = time.monotonic()
        slow.state.scheduler.tick()
        th.join(15)
        assert slow.state.doorbell.rings == rings + 1
        assert got["lease"] is not None
        assert time.monotonic() - t_tick < 2.5 and got["waited"] < 4.0


def test_result_is_accepted_once_duplicates_are_noops_and_stale_is_409(
        client, app, user_key, make_worker_token):
    from service import clock

    h, _target, _wh, worker, job = _setup(client, app, user_key, make_worker_token, trials=2)
    app.state.scheduler.tick()
    lease = worker.lease()
    assert lease is not None
    first_expiry = _ts(lease["lease_expires_at"])
    with clock.use(clock.ManualClock()) as now:
        now.advance(1.0)
        r = worker.heartbeat(lease)
    assert r.status_code == 200 and _ts(r.json()["lease_expires_at"]) > first_expiry

    bogus = {**lease, "lease_token": "fnl_not-the-token"}
    assert worker.result(bogus).status_code == 409
    assert worker.heartbeat(bogus).status_code == 409
    r = worker.result(lease)
    assert r.status_code == 200 and r.json() == {"accepted": True, "duplicate": False}
    r = worker.result(lease)
    assert r.status_code == 200 and r.json() == {"accepted": False, "duplicate": True}
    # a different outcome with the same (finished) lease is still just a duplicate
    r = worker.result(lease, {"ok": False, "failure": {"reason": "timeout", "message": "x"}})
    assert r.json() == {"accepted": False, "duplicate": True}
    r = worker.heartbeat(lease)
    assert r.status_code == 409 and "already done" in r.json()["detail"]
    assert worker.fail(lease).status_code == 409
    assert worker.result({**lease, "task_id": "nope"}).status_code == 404
    bad = client.post(f"/v1/tasks/{lease['task_id']}/result", headers=worker.headers,
                      json={"lease_token": lease["lease_token"], "outcome": {"ok": "maybe"}})
    assert bad.status_code == 422

    app.state.scheduler.tick()
    t = _trial(client, h, job["id"], lease["trial_number"])
    assert t["state"] == "COMPLETE" and t["status"] == "measured"
    assert t["latency_ms"] > 0.2 and t["quality"] > 0


def test_expired_leases_are_requeued_then_fail_the_trial(make_settings, user_key,
                                                         make_worker_token):
    from fastapi.testclient import TestClient

    from service import clock
    from service.api.app import create_app

    app = create_app(make_settings(lease_timeout_s=0.4, heartbeat_interval_s=0.1))
    with clock.use(clock.ManualClock()) as now, TestClient(app) as client:
        _, h = user_key
        from service.tokens import create_worker_token

        target = f"exp-{time.monotonic_ns()}"
        token, _ = create_worker_token(app.state.db, target)
        worker = HttpWorker(client, {"Authorization": f"Bearer {token}"}, target)
        worker.register()
        job = client.post("/v1/jobs", headers=h, json=job_body(target, trials=1)).json()
        sched = app.state.scheduler
        sched.tick()
        leases = []
        for attempt in (1, 2, 3):
            lease = worker.lease()
            assert lease is not None and lease["attempt"] == attempt
            if leases:  # the expired lease cannot resume once the task is leased again
                r = worker.heartbeat(leases[-1])
                assert r.status_code == 409 and "leased again" in r.json()["detail"]
            leases.append(lease)
            now.advance(0.5)  # no heartbeat: the lease runs out
            report = sched.tick()
            assert [r.requeued for r in report.reaped] == [attempt < 3]
        r = worker.heartbeat(leases[-1])
        assert r.status_code == 409 and "attempts exhausted" in r.json()["detail"]
        assert worker.result(leases[-1]).status_code == 409
        assert worker.lease() is None
        sched.tick()
        got = client.get(f"/v1/jobs/{job['id']}", headers=h).json()
        assert got["status"] == "completed" and got["progress"]["failed"] == 1
        t = _trial(client, h, job["id"], leases[0]["trial_number"])
        assert t["state"] == "FAIL" and t["fail_reason"] == "crashed"
        assert "lease expired" in t["fail_message"] and "attempt 3 of 3" in t["fail_message"]
        text = client.get("/metrics").text
        assert f'fitnas_lease_expiries_total{{outcome="requeued",target="{target}"}} 2.0' in text
        assert f'fitnas_lease_expiries_total{{outcome="failed",target="{target}"}} 1.0' in text


def test_worker_failures_spend_attempts_and_release_does_not(client, app, user_key,
                                                             make_worker_token):
    h, _target, _wh, worker, job = _setup(client, app, user_key, make_worker_token, trials=1)
    app.state.scheduler.tick()
    lease = worker.lease()
    # release: back to the queue, no attempt spent, the old token is dead
    assert worker.release(lease).json() == {"requeued": True}
    assert worker.release(lease).status_code == 409
    lease = worker.lease()
    assert lease["attempt"] == 1
    r = worker.fail(lease, "out_of_memory", "needed 9 GB")
    assert r.json() == {"requeued": True, "attempts_used": 1, "max_attempts": 3}
    assert worker.fail(lease).status_code == 409
    lease = worker.lease()
    assert lease["attempt"] == 2
    assert worker.fail(lease, "gpu_fell_off", "xid 79").json()["requeued"] is True
    lease = worker.lease()
    assert lease["attempt"] == 3
    r = worker.fail(lease, "out_of_memory", "needed 9 GB again")
    assert r.json() == {"requeued": False, "attempts_used": 3, "max_attempts": 3}
    assert worker.lease() is None
    app.state.scheduler.tick()
    t = _trial(client, h, job["id"], lease["trial_number"])
    assert t["state"] == "FAIL" and t["fail_reason"] == "out_of_memory"
    assert t["fail_message"] == "needed 9 GB again"
    assert client.get(f"/v1/jobs/{job['id']}", headers=h).json()["status"] == "completed"


def test_unknown_failure_reasons_are_kept_in_the_message():
    from service.leases import normalize_failure

    assert normalize_failure("timeout", "60 s") == {"reason": "timeout", "message": "60 s"}
    assert normalize_failure("gpu_fell_off", "xid 79") == {
        "reason": "crashed", "message": "gpu_fell_off: xid 79"}


def test_cancel_makes_leases_stale(client, app, user_key, make_worker_token):
    h, _target, _wh, worker, job = _setup(client, app, user_key, make_worker_token, trials=3)
    app.state.scheduler.tick()
    lease = worker.lease()
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=h).status_code == 200
    r = worker.heartbeat(lease)
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]
    assert worker.result(lease).status_code == 409
    assert worker.lease() is None
    app.state.scheduler.tick()
    got = client.get(f"/v1/jobs/{job['id']}", headers=h).json()
    assert got["status"] == "cancelled" and got["finalized"]
    trials = client.get(f"/v1/jobs/{job['id']}/trials", headers=h).json()["items"]
    assert trials and all(t["state"] != "RUNNING" for t in trials)


def test_runtime_filter(client, app, user_key, make_worker_token):
    _h, target, wh, _worker, _job = _setup(client, app, user_key, make_worker_token, trials=1)
    app.state.scheduler.tick()
    onnx_only = HttpWorker(client, wh, target, name="onnx-only", runtimes=["onnxruntime"])
    onnx_only.register()
    assert onnx_only.lease() is None  # the job measures eager
    eager = HttpWorker(client, wh, target, name="eager")
    eager.register()
    assert eager.lease() is not None


@pytest.mark.timeout(120)
def test_concurrent_leases_never_share_a_task(client, app, user_key, make_worker_token):
    _, h = user_key
    target, wh = make_worker_token()
    workers = [HttpWorker(client, wh, target, name=f"w{i}") for i in range(6)]
    for w in workers:
        w.register()
    client.post("/v1/jobs", headers=h, json=job_body(target, trials=12, parallelism=12))
    app.state.scheduler.tick()  # 6 live workers: 7 tasks queued (one beyond them)
    text = client.get("/metrics").text
    assert f'fitnas_queue_depth{{target="{target}"}} 7.0' in text
    got: list[str] = []
    lock = threading.Lock()
    errors: list[str] = []

    def run(w):
        try:
            for _ in range(3):
                lease = w.lease()
                if lease is not None:
                    with lock:
                        got.append(lease["task_id"])
        except Exception as exc:  # surfaced below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(got) == 7 and len(set(got)) == 7
    text = client.get("/metrics").text
    assert f'fitnas_tasks_leased{{target="{target}"}} 7.0' in text
    assert f'fitnas_workers_live{{target="{target}"}} 6.0' in text
