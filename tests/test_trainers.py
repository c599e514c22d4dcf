"""Trainer workers beside latency workers, through the HTTP protocol and the scheduler (on
SQLite and PostgreSQL): the latency first, the training only for candidates within every
budget, rungs through the progress endpoint to the job's pruner, every trial told once,
and each role kept to its own kind of task."""

from __future__ import annotations

from typing import Any

import pytest
from optuna.trial import TrialState
from sqlalchemy import select
from svc_helpers import HttpWorker, fake_outcome, job_body

from blocks.cost import estimate_cost
from blocks.spec import ArchSpec
from service.models import Task
from service.studies import load_study

STEPS = 8
RUNG = 4


def _tasks(app, job_id: str) -> list[Task]:
    return app.state.db.run(
        lambda s: list(s.execute(select(Task).where(Task.job_id == job_id)).scalars()),
        write=False)


def _latency_only(task: dict[str, Any]) -> dict[str, Any]:
    out = fake_outcome(task)
    out.pop("quality", None)
    return out


def _accuracy(task: dict[str, Any], step: int) -> float:
    """A made-up learning curve: bigger networks learn faster (a pure function of the
    spec, so the pruner's choices are reproducible)."""
    params = estimate_cost(ArchSpec.model_validate(task["spec"])).params
    return min(0.99, params / 50_000.0) * step / STEPS


def _train(trainer: HttpWorker, lease: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """What a trainer does: a rung at RUNG (the pruner answers), then the rest."""
    task = lease["task"]
    assert task["measure"] is None and task["quality"]["signal"] == "train"
    first = _accuracy(task, RUNG)
    r = trainer.progress(lease, RUNG, first)
    assert r.status_code == 200, r.text
    go_on = r.json()["go_on"]
    rungs = [[RUNG, first]] if not go_on else [[RUNG, first], [STEPS, _accuracy(task, STEPS)]]
    quality = {"signal": "train", "value": rungs[-1][1], "seconds": 0.1, "pruned": not go_on,
               "details": {"rungs": rungs, "steps": rungs[-1][0], "planned_steps": STEPS,
                           "pruned": not go_on}}
    return go_on, {"ok": True, "quality": quality, "seconds": 0.2}


@pytest.fixture
def train_job(client, app, user_key, make_worker_token):
    _, h = user_key
    target, wh = make_worker_token()
    pool = target + "-trainers"
    body = job_body(target, trials=10, parallelism=3, sampler="random", seed=2,
                    trainer_pool=pool,
                    quality={"signal": "train", "data": "digits", "steps": STEPS,
                             "rungs": [RUNG]},
                    budgets={"max_latency_ms": 0.33})
    # no trainer for the pool yet: refused, naming the command that makes one
    r = client.post("/v1/jobs", headers=h, json=body)
    assert r.status_code == 422
    assert f"create-worker-token --role trainer --target {pool}" in r.text
    _, th = make_worker_token(pool, role="trainer")
    job = client.post("/v1/jobs", headers=h, json=body).json()
    latency = HttpWorker(client, wh, target, name="phone")
    latency.register()
    trainer = HttpWorker(client, th, pool, name="gpu-box")
    trainer.register(role="trainer")
    return h, job, latency, trainer


def test_latency_first_then_training_within_budget_only(client, app, settings, train_job):
    h, job, latency, trainer = train_job
    sched = app.state.scheduler
    pruned_by_pruner = 0
    for _ in range(200):
        sched.tick()
        while (lease := latency.lease()) is not None:
            assert lease["kind"] == "latency"
            assert lease["task"]["quality"] is None  # the device never trains
            assert latency.result(lease, _latency_only(lease["task"])).json()["accepted"]
        sched.tick()
        while (lease := trainer.lease()) is not None:
            assert lease["kind"] == "quality"
            go_on, outcome = _train(trainer, lease)
            pruned_by_pruner += not go_on
            assert trainer.result(lease, outcome).json()["accepted"]
        if client.get(f"/v1/jobs/{job['id']}", headers=h).json()["finalized"]:
            break
    got = client.get(f"/v1/jobs/{job['id']}", headers=h).json()
    assert got["status"] == "completed" and got["progress"]["finished"] == 10

    tasks = _tasks(app, job["id"])
    assert all(t.told_at is not None for t in tasks)  # every task told
    lat = {t.trial_number: t for t in tasks if t.kind == "latency"}
    trained = {t.trial_number for t in tasks if t.kind == "quality"}
    assert len({(t.trial_number, t.kind) for t in tasks}) == len(tasks)
    within = {n for n, t in lat.items()
              if t.outcome["latency"]["latency_ms"]["median"] <= 0.33}
    assert trained == within and 0 < len(within) < 10  # the budget split the space

    study = load_study(settings.optuna_url, job["study_name"])
    trials = {t.number: t for t in study.trials}
    assert len(trials) == 10  # each trial asked once, told once
    cached = {n for n, t in trials.items() if t.user_attrs.get("status") == "cached"}
    assert set(lat) | cached == set(trials) and not set(lat) & cached  # random repeats
    for n, t in trials.items():
        if n in cached:
            continue
        if n in within:
            assert "quality_skipped" not in t.user_attrs
            assert t.user_attrs["rungs"][0][0] == RUNG
        else:  # over the budget: PRUNED with its latency, never trained
            assert t.state == TrialState.PRUNED and t.user_attrs["quality_skipped"] == 1
            assert t.user_attrs["latency_ms"] > 0.33 and "rungs" not in t.user_attrs
    pruned = [t for t in trials.values() if t.user_attrs.get("status") == "pruned"]
    assert pruned_by_pruner >= 1 and len(pruned) == pruned_by_pruner
    assert all(t.state == TrialState.PRUNED and t.user_attrs["pruned_at_step"] == RUNG
               for t in pruned)


def test_each_role_keeps_to_its_own_kind(client, app, user_key, make_worker_token,
                                         train_job):
    from service.protocol import LEASE_PATH, REGISTER_PATH, LeaseRequest, WorkerRegister

    _h, _job, latency, trainer = train_job
    # a trainer token registering as a latency worker: 403 naming the role to run with
    r = trainer.api.send(REGISTER_PATH, WorkerRegister(
        target=trainer.target, name="confused", device="cpu", role="latency"))
    assert r.status_code == 403 and "--role trainer" in r.text
    r = latency.api.send(REGISTER_PATH, WorkerRegister(
        target=latency.target, name="confused", device="cpu", role="trainer"))
    assert r.status_code == 403 and "--role latency" in r.text
    # asking for the other kind's task: 403
    r = latency.api.send(LEASE_PATH, LeaseRequest(worker_id=latency.worker_id,
                                                  target=latency.target, kind="quality"))
    assert r.status_code == 403
    # a latency result without a measurement, a training result with one: 422
    app.state.scheduler.tick()
    lease = latency.lease()
    r = latency.result(lease, {"ok": True, "seconds": 0.1,
                               "quality": {"signal": "train", "value": 0.5, "seconds": 0.1}})
    assert r.status_code == 422 and "latency" in r.text
    assert latency.result(lease, _latency_only(lease["task"])).json()["accepted"]
    for _ in range(20):  # until a candidate within the budget reaches the trainer
        app.state.scheduler.tick()
        if (t_lease := trainer.lease()) is not None:
            break
        if (lease := latency.lease()) is not None:
            latency.result(lease, _latency_only(lease["task"]))
    assert t_lease is not None
    r = trainer.result(t_lease, fake_outcome({**t_lease["task"], "measure": {}}))
    assert r.status_code == 422 and "never measures latency" in r.text
    # progress is for training tasks only
    if (lease := latency.lease()) is not None:
        assert latency.progress(lease, 1, 0.5).status_code == 422


def test_a_worker_refuses_the_other_roles_task():
    from search.evaluators.types import EvalTask, QualitySettings
    from service.worker.loop import _refuses

    spec = {"version": 1}  # never built: refused before
    train = QualitySettings(signal="train", data="digits", steps=8)
    measure = EvalTask.model_construct(spec=spec, measure=object(), quality=None)
    training = EvalTask.model_construct(spec=spec, measure=None, quality=train)
    both = EvalTask.model_construct(spec=spec, measure=object(), quality=train)
    assert _refuses("latency", "latency", measure) is None
    assert "never trains" in _refuses("latency", "quality", training)
    assert "never trains" in _refuses("latency", "latency", both)
    assert _refuses("trainer", "quality", training) is None
    assert "never measures latency" in _refuses("trainer", "latency", measure)
