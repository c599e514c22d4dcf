"""Authentication and authorization: API keys for users, target-scoped worker tokens,
users see only their own jobs, only health/readiness (and metrics by default) are open."""

from __future__ import annotations

from svc_helpers import HttpWorker, job_body

from service.tokens import create_api_key, create_worker_token, revoke


def test_open_endpoints_and_missing_or_bad_tokens(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    assert client.get("/metrics").status_code == 200
    for path in ("/v1/jobs", "/v1/targets", "/v1/workers"):
        r = client.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
    r = client.get("/v1/jobs", headers={"Authorization": "Bearer fnk_not-a-real-key"})
    assert r.status_code == 401 and "invalid" in r.json()["detail"]
    r = client.get("/v1/jobs", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401


def test_revoked_key_is_refused(client, app):
    token, row = create_api_key(app.state.db, "carol")
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    assert revoke(app.state.db, row.prefix) == 1
    assert client.get("/v1/jobs", headers=headers).status_code == 401


def test_token_kinds_are_not_interchangeable(client, user_key, make_worker_token):
    _, uh = user_key
    target, wh = make_worker_token()
    # a worker token cannot use user endpoints
    r = client.get("/v1/jobs", headers=wh)
    assert r.status_code == 403 and "worker token" in r.json()["detail"]
    # an API key cannot speak the task protocol
    r = client.post("/v1/workers/register", headers=uh,
                    json={"target": target, "name": "x"})
    assert r.status_code == 403
    r = client.post("/v1/tasks/lease", headers=uh,
                    json={"worker_id": "abc", "target": target, "wait_s": 0})
    assert r.status_code == 403


def test_worker_token_is_scoped_to_its_target(client, app, user_key, make_worker_token):
    _, uh = user_key
    target_a, wh_a = make_worker_token()
    target_b, wh_b = make_worker_token()
    # registering for another target
    r = client.post("/v1/workers/register", headers=wh_a,
                    json={"target": target_b, "name": "w"})
    assert r.status_code == 403 and target_a in r.json()["detail"]
    # leasing for another target
    wa = HttpWorker(client, wh_a, target_a)
    wa.register()
    r = client.post("/v1/tasks/lease", headers=wh_a,
                    json={"worker_id": wa.worker_id, "target": target_b, "wait_s": 0})
    assert r.status_code == 403
    # a B task cannot be touched with an A token, even with its lease token
    job = client.post("/v1/jobs", headers=uh, json=job_body(target_b, trials=2)).json()
    wb = HttpWorker(client, wh_b, target_b)
    wb.register()
    app.state.scheduler.tick()
    lease = wb.lease()
    assert lease is not None and lease["job_id"] == job["id"]
    intruder = HttpWorker(client, wh_a, target_a)
    for call in (intruder.heartbeat, intruder.result, intruder.fail, intruder.release):
        r = call(lease)
        assert r.status_code == 403, (call.__name__, r.text)
    # and B's own worker is unaffected
    assert wb.result(lease).json() == {"accepted": True, "duplicate": False}
    # a worker id of target A cannot be used with a token of target B
    r = client.post("/v1/tasks/lease", headers=wh_b,
                    json={"worker_id": wa.worker_id, "target": target_b, "wait_s": 0})
    assert r.status_code == 403


def test_users_see_only_their_own_jobs(client, app, make_worker_token):
    target, _ = make_worker_token()
    ka, _ = create_api_key(app.state.db, "alice-iso")
    kb, _ = create_api_key(app.state.db, "bob-iso")
    ka2, _ = create_api_key(app.state.db, "alice-iso")  # a second key of the same user
    ha, hb, ha2 = ({"Authorization": f"Bearer {k}"} for k in (ka, kb, ka2))
    job = client.post("/v1/jobs", headers=ha, json=job_body(target)).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=ha2).status_code == 200
    for path in ("", "/trials", "/pareto", "/winner", "/export?format=json"):
        r = client.get(f"/v1/jobs/{job['id']}{path}", headers=hb)
        assert r.status_code == 404, path
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=hb).status_code == 404
    assert client.get("/v1/jobs", headers=hb).json()["total"] == 0
    ids = [j["id"] for j in client.get("/v1/jobs", headers=ha2).json()["items"]]
    assert ids == [job["id"]]


def test_metrics_can_require_auth(make_settings, app):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    locked = create_app(make_settings(metrics_require_auth=True))
    token, _ = create_api_key(app.state.db, "ops")
    _, wtoken = None, create_worker_token(app.state.db, "metrics-t")[0]
    with TestClient(locked) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": f"Bearer {wtoken}"}).status_code == 403
        r = c.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and "fitnas_database_up 1.0" in r.text
        assert c.get("/healthz").status_code == 200
