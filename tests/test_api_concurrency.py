"""The real server under concurrent load: uvicorn with the background scheduler, four
worker threads long-polling over HTTP, two jobs at once. No client may ever see a
5xx (in particular SQLite's "database is locked"), and both jobs complete with every
trial told once."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from service_harness import free_port
from svc_helpers import HttpWorker, job_body


class _Server:
    def __init__(self, app, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                   log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


class _Recorder(httpx.Client):
    """An httpx client that remembers every status code it got."""

    def __init__(self, *args, codes: list, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.codes = codes

    def send(self, request, **kwargs):
        resp = super().send(request, **kwargs)
        self.codes.append((request.url.path, resp.status_code, resp.text[:200]
                           if resp.status_code >= 500 else ""))
        return resp


@pytest.mark.timeout(300)
def test_four_workers_two_jobs_no_errors(make_settings, app):
    from service.api.app import create_app
    from service.tokens import create_api_key, create_worker_token

    settings = make_settings(scheduler_enabled=True, scheduler_interval_s=0.1,
                             lease_timeout_s=20.0, heartbeat_interval_s=1.0)
    server_app = create_app(settings)
    db = app.state.db
    target = f"live-{time.monotonic_ns()}"
    wtoken, _ = create_worker_token(db, target)
    key, _ = create_api_key(db, "live-user")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    codes: list = []
    stop = threading.Event()
    done_counts: list[int] = []
    errors: list[str] = []

    def work(i: int) -> None:
        with _Recorder(base_url=base, timeout=30, codes=codes) as http:
            w = HttpWorker(http, {"Authorization": f"Bearer {wtoken}"}, target, name=f"w{i}")
            try:
                w.register()
                n = 0
                while not stop.is_set():
                    lease = w.lease(wait_s=1.0)
                    if lease is None:
                        continue
                    assert w.heartbeat(lease).status_code == 200
                    r = w.result(lease)
                    assert r.status_code == 200 and r.json()["accepted"], r.text
                    n += 1
                done_counts.append(n)
            except Exception as exc:  # surfaced below
                errors.append(repr(exc))

    with _Server(server_app, port):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        with _Recorder(base_url=base, timeout=30, codes=codes) as user:
            h = {"Authorization": f"Bearer {key}"}
            jobs = []
            for seed in (1, 2):
                r = user.post("/v1/jobs", headers={**h, "Idempotency-Key": f"live-{seed}"},
                              json=job_body(target, trials=8, parallelism=4, seed=seed))
                assert r.status_code == 201, r.text
                jobs.append(r.json()["id"])
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                states = [user.get(f"/v1/jobs/{j}", headers=h).json() for j in jobs]
                if all(s["finalized"] for s in states):
                    break
                time.sleep(0.3)
            metrics = user.get("/metrics").text
        stop.set()
        for t in threads:
            t.join(30)

    assert not errors, errors
    assert [s["status"] for s in states] == ["completed", "completed"], states
    for s in states:
        p = s["progress"]
        assert p["finished"] == 8 and p["running"] == 0
        assert p["measured"] + p["cached"] == 8
    server_errors = [c for c in codes if c[1] >= 500]
    assert not server_errors, server_errors[:5]
    assert not [c for c in codes if "locked" in c[2]]
    measured = sum(s["progress"]["measured"] for s in states)
    assert sum(done_counts) == measured  # every task reported exactly once
    assert 'fitnas_scheduler_ticks_total' in metrics
    assert len(done_counts) == 4


def test_sqlite_lock_is_retried_not_raised(tmp_path):
    """Another process holds SQLite's write lock longer than the busy timeout: the
    transaction is retried (in Database.run) instead of failing with 'database is
    locked'; a non-transient error is raised at once."""
    import sqlite3

    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    import migrations
    from service.db import Database

    url = f"sqlite:///{tmp_path}/lock.db"
    migrations.upgrade(url)
    db = Database(url, busy_timeout_ms=50, retry_for_s=20)
    holder = sqlite3.connect(f"{tmp_path}/lock.db", isolation_level=None,
                             check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO fitnas_targets (name, description, created_at) "
                   "VALUES ('held', '', '2025-01-01 00:00:00')")
    threading.Timer(0.6, holder.execute, args=("COMMIT",)).start()
    t0 = time.monotonic()
    db.run(lambda s: s.execute(text(
        "INSERT INTO fitnas_targets (name, description, created_at) "
        "VALUES ('waited', '', '2025-01-01 00:00:00')")))
    assert time.monotonic() - t0 >= 0.5
    assert db.retries >= 1
    names = db.run(lambda s: set(s.execute(text("SELECT name FROM fitnas_targets")).scalars()),
                   write=False)
    assert names == {"held", "waited"}
    with pytest.raises(OperationalError):
        db.run(lambda s: s.execute(text("SELECT * FROM no_such_table")))
    holder.close()
    db.dispose()
