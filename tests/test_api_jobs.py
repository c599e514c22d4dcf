"""/v1/jobs: create with validation and idempotency, list/filter/page, get, cancel;
targets and workers listing; the OpenAPI description."""

from __future__ import annotations

import copy

from svc_helpers import TINY_SPACE, HttpWorker, job_body


def test_create_get_and_idempotency(client, user_key, make_worker_token):
    _, h = user_key
    target, _ = make_worker_token()
    body = job_body(target, trials=5, parallelism=3, seed=7, signal="naswot")
    r = client.post("/v1/jobs", headers=h, json=body)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["trials"] == 5 and job["parallelism"] == 3
    assert job["study_name"] == f"fitnas-job-{job['id']}"
    assert job["progress"]["trials"] == 5 and job["progress"]["finished"] == 0
    cfg = job["config"]
    assert cfg["target"] == target and cfg["seed"] == 7 and cfg["sampler"] == "random"
    assert cfg["quality"]["signal"] == "naswot"  # the `signal` shorthand
    assert cfg["space"]["name"] == "tiny" and cfg["measure"]["resolution"] == 32

    got = client.get(f"/v1/jobs/{job['id']}", headers=h).json()
    assert got["id"] == job["id"] and got["config"] == cfg

    # Idempotency-Key: a retried create returns the same job (200), nothing new is made
    hk = {**h, "Idempotency-Key": "create-1"}
    first = client.post("/v1/jobs", headers=hk, json=body)
    assert first.status_code == 201
    again = client.post("/v1/jobs", headers=hk, json=body)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", headers=hk, json={**body, "trials": 6})
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
    assert client.get("/v1/jobs", headers=h).json()["total"] == 2


def test_create_validation(client, user_key, make_worker_token):
    _, h = user_key
    target, _ = make_worker_token()

    def post(**kw):
        return client.post("/v1/jobs", headers=h, json=job_body(target, **kw))

    r = client.post("/v1/jobs", headers=h, json=job_body("no-such-target"))
    assert r.status_code == 422 and "unknown target" in r.json()["detail"]
    r = post(space="/etc/passwd")
    assert r.status_code == 422 and "not a built-in space" in r.json()["detail"]
    r = post(space="mobilenet_v2")
    assert r.status_code == 201 and r.json()["config"]["space"]["name"] != "tiny"
    bomb = copy.deepcopy(TINY_SPACE)
    bomb["stages"][0]["width"] = [100_000]
    assert post(space=bomb).status_code == 422
    assert post(trials=0).status_code == 422
    r = post(trials=10_001)
    assert r.status_code == 422 and "at most 10000" in r.json()["detail"]
    assert post(parallelism=65).status_code == 422
    assert post(sampler="grid").status_code == 422
    assert post(measure={"runtime": "tensorrt"}).status_code == 422
    assert post(unknown_field=1).status_code == 422
    # a relative latency budget needs a reference network
    r = post(budgets={"max_latency_ratio": 0.8})
    assert r.status_code == 422 and "reference" in r.json()["detail"]
    # a seed spec must be a point of the job's space
    r = post(seed_specs=["preset:mnasnet@0.5"])
    assert r.status_code == 422 and "seed spec 1 (net_v1" in r.json()["detail"]


def test_list_filter_page_and_cancel(client, user_key, make_worker_token):
    _, h = user_key
    target, _ = make_worker_token()
    ids = [client.post("/v1/jobs", headers=h, json=job_body(target, name=f"j{i}")).json()["id"]
           for i in range(5)]
    page = client.get("/v1/jobs?limit=2", headers=h).json()
    assert page["total"] == 5 and [j["id"] for j in page["items"]] == ids[::-1][:2]
    page2 = client.get("/v1/jobs?limit=2&offset=2", headers=h).json()
    assert [j["id"] for j in page2["items"]] == ids[::-1][2:4]
    assert page2["items"][0]["config"] is None  # listings stay small

    r = client.post(f"/v1/jobs/{ids[0]}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{ids[0]}/cancel", headers=h).status_code == 200
    cancelled = client.get("/v1/jobs?status=cancelled", headers=h).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[0]]
    assert client.get("/v1/jobs?status=queued", headers=h).json()["total"] == 4
    assert client.get("/v1/jobs?status=bogus", headers=h).status_code == 422
    assert client.get("/v1/jobs/nope", headers=h).status_code == 404


def test_cancel_a_completed_job_is_a_conflict(client, app, user_key, make_worker_token):
    _, h = user_key
    target, wh = make_worker_token()
    job = client.post("/v1/jobs", headers=h, json=job_body(target, trials=1)).json()
    worker = HttpWorker(client, wh, target)
    worker.register()
    app.state.scheduler.tick()
    assert worker.work_all() == 1
    app.state.scheduler.tick()
    assert client.get(f"/v1/jobs/{job['id']}", headers=h).json()["status"] == "completed"
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    assert r.status_code == 409 and "completed" in r.json()["detail"]


def test_targets_and_workers(client, user_key, make_worker_token):
    _, h = user_key
    r = client.post("/v1/targets", headers=h, json={"name": "jetson-orin",
                                                     "description": "Orin NX 16GB"})
    assert r.status_code in (201, 409)
    assert client.post("/v1/targets", headers=h, json={"name": "jetson-orin"}).status_code == 409
    assert client.post("/v1/targets", headers=h, json={"name": "bad name"}).status_code == 422
    target, wh = make_worker_token()
    w1 = HttpWorker(client, wh, target, name="bench-1")
    reg = w1.register()
    assert reg["heartbeat_interval_s"] == 5.0 and reg["lease_timeout_s"] == 30.0
    # re-registering under the same name keeps the worker id
    assert HttpWorker(client, wh, target, name="bench-1").register()["worker_id"] == w1.worker_id
    w2 = HttpWorker(client, wh, target, name="bench-2")
    w2.register()
    assert w2.worker_id != w1.worker_id
    assert w1.idle_heartbeat().status_code == 200
    r = client.post("/v1/workers/0000/heartbeat", headers=wh, json={})
    assert r.status_code == 404 and "register again" in r.json()["detail"]

    workers = client.get(f"/v1/workers?target={target}", headers=h).json()
    assert workers["total"] == 2
    assert {w["name"] for w in workers["items"]} == {"bench-1", "bench-2"}
    assert all(w["live"] and w["last_heartbeat_at"] for w in workers["items"])
    assert workers["items"][0]["fingerprint"] == {"cpu": "test"}
    t = client.get(f"/v1/targets/{target}", headers=h).json()
    assert t["live_workers"] == 2 and t["queued_tasks"] == 0
    names = [x["name"] for x in client.get("/v1/targets", headers=h).json()]
    assert "jetson-orin" in names and target in names
    assert client.get("/v1/targets/none-such", headers=h).status_code == 404


def test_openapi_describes_the_api_with_examples(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
              "/v1/jobs/{job_id}/trials", "/v1/jobs/{job_id}/pareto",
              "/v1/jobs/{job_id}/winner", "/v1/jobs/{job_id}/export", "/v1/targets",
              "/v1/workers", "/v1/workers/register", "/v1/workers/{worker_id}/heartbeat",
              "/v1/tasks/lease", "/v1/tasks/{task_id}/heartbeat", "/v1/tasks/{task_id}/result",
              "/v1/tasks/{task_id}/fail", "/v1/tasks/{task_id}/release", "/healthz",
              "/readyz", "/metrics"):
        assert p in paths, p
    schemas = spec["components"]["schemas"]
    assert schemas["JobCreate"]["examples"][0]["target"] == "cpu-x86-4t"
    assert "examples" in schemas["WorkerRegister"] and "examples" in schemas["LeaseRequest"]
    create = paths["/v1/jobs"]["post"]
    assert any(p["name"] == "Idempotency-Key" for p in create["parameters"])
    assert "409" in create["responses"] and "200" in create["responses"]
    assert "204" in paths["/v1/tasks/lease"]["post"]["responses"]
    assert "409" in paths["/v1/tasks/{task_id}/result"]["post"]["responses"]


def test_readyz_reports_an_unmigrated_database(tmp_path):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    app = create_app(Settings(database_url=f"sqlite:///{tmp_path}/empty.db",
                              scheduler_enabled=False))
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "fitnas db upgrade" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200
