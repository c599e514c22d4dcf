"""Helpers for the API and scheduler tests: a tiny design space, outcomes computed from
a task's spec (deterministic, so tests can assert on them), and a worker that speaks the
real HTTP protocol through any httpx-compatible client."""

from __future__ import annotations

from typing import Any

TINY_SPACE: dict[str, Any] = {
    "version": 1,
    "name": "tiny",
    "num_classes": 10,
    "resolution": [32],
    "width_mult": [1.0],
    "channel_divisor": 4,
    "stem": {"width": [8], "kernel": [3], "stride": 2, "act": ["relu"]},
    "stages": [
        {"id": "s1", "stride": 1, "width": [8, 12], "depth": [1, 2],
         "kinds": {"ds": {"kernel": [3, 5]}, "mbconv": {"expand": [2, 4]}}},
        {"id": "s2", "stride": 2, "width": [16, 24], "depth": 1,
         "kinds": {"mbconv": {"expand": [2], "kernel": [3, 5]}}},
    ],
    "head": None,
    "dropout": 0.0,
}

FAST_MEASURE = {"runtime": "eager", "resolution": 32, "threads": 1, "reference": None,
                "rounds": 3, "min_run_time_s": 0.01}


def job_body(target: str, **overrides) -> dict[str, Any]:
    body = {
        "name": "test job",
        "target": target,
        "space": TINY_SPACE,
        "trials": 6,
        "parallelism": 2,
        "measure": FAST_MEASURE,
        "quality": {"signal": "synflow"},
        "sampler": "random",
        "seed": 0,
    }
    body.update(overrides)
    return body


def _stats(x: float) -> dict[str, Any]:
    return {"median": x, "p90": x * 1.05, "iqr": x * 0.02, "cv": 0.01, "n": 21,
            "mean": x, "min": x * 0.97, "max": x * 1.1}


def fake_outcome(task: dict[str, Any], seconds: float = 0.5) -> dict[str, Any]:
    """An EvalOutcome (JSON) for a task: latency from MACs, quality from params, so the
    results are a pure function of the spec."""
    from blocks.cost import estimate_cost
    from blocks.spec import ArchSpec

    spec = ArchSpec.model_validate(task["spec"])
    measure = task.get("measure") or {}
    cost = estimate_cost(spec, resolution=measure.get("resolution"))
    latency = 0.2 + cost.macs / 2e6
    out: dict[str, Any] = {
        "ok": True,
        "latency": {
            "latency_ms": _stats(latency),
            "runtime": measure.get("runtime", "eager"),
            "settings": measure,
            "device": {"cpu": "test"},
            "params": cost.params,
            "macs": cost.macs,
        },
        "seconds": seconds,
    }
    if task.get("quality"):
        out["quality"] = {"signal": task["quality"]["signal"], "value": cost.params / 1000.0,
                          "seconds": 0.01}
    return out


class HttpWorker:
    """A test worker: the real worker client (``service.worker.client.ApiClient``) and the
    protocol's own models (``service.protocol``) over any httpx client, such as the app's
    TestClient. The calls a test checks return the raw answer so that it can assert the
    status code."""

    def __init__(self, http, headers: dict[str, str], target: str, name: str = "w1",
                 runtimes: list[str] | None = None) -> None:
        from service.worker.client import ApiClient

        token = headers["Authorization"].removeprefix("Bearer ")
        self.api = ApiClient(str(http.base_url), token, http=http)
        self.headers = headers
        self.target = target
        self.name = name
        self.runtimes = runtimes if runtimes is not None else ["eager", "torchscript",
                                                                 "onnxruntime"]
        self.worker_id: str | None = None

    def register(self, role: str = "latency") -> dict[str, Any]:
        from service.protocol import REGISTER_PATH, WorkerRegister

        r = self.api.send(REGISTER_PATH, WorkerRegister(
            target=self.target, name=self.name, device="cpu", runtimes=self.runtimes,
            fingerprint={"cpu": "test"}, role=role))
        assert r.status_code == 200, r.text
        self.worker_id = r.json()["worker_id"]
        return r.json()

    def lease(self, wait_s: float = 0.0):
        from service.protocol import LEASE_PATH, LeaseRequest

        r = self.api.send(LEASE_PATH, LeaseRequest(worker_id=self.worker_id,
                                                   target=self.target, wait_s=wait_s))
        if r.status_code == 204:
            return None
        assert r.status_code == 200, r.text
        return r.json()

    def _on_lease(self, lease: dict[str, Any], action: str, body):
        from service.protocol import task_path

        return self.api.send(task_path(lease["task_id"], action), body)

    def progress(self, lease: dict[str, Any], step: int, value: float):
        from service.protocol import ProgressIn

        return self._on_lease(lease, "progress", ProgressIn(
            lease_token=lease["lease_token"], step=step, value=value))

    def heartbeat(self, lease: dict[str, Any]):
        from service.protocol import LeaseTokenIn

        return self._on_lease(lease, "heartbeat", LeaseTokenIn(lease_token=lease["lease_token"]))

    def result(self, lease: dict[str, Any], outcome: dict[str, Any] | None = None):
        from service.protocol import ResultIn

        outcome = outcome if outcome is not None else fake_outcome(lease["task"])
        return self._on_lease(lease, "result",
                              ResultIn(lease_token=lease["lease_token"], outcome=outcome))

    def fail(self, lease: dict[str, Any], reason: str = "crashed", message: str = "boom"):
        from service.protocol import FailIn

        return self._on_lease(lease, "fail", FailIn(lease_token=lease["lease_token"],
                                                    reason=reason, message=message))

    def release(self, lease: dict[str, Any]):
        from service.protocol import LeaseTokenIn

        return self._on_lease(lease, "release", LeaseTokenIn(lease_token=lease["lease_token"]))

    def idle_heartbeat(self):
        from service.protocol import worker_heartbeat_path

        return self.api.send(worker_heartbeat_path(self.worker_id))

    def work_all(self, max_tasks: int = 1000) -> int:
        """Lease and report until nothing is queued, through the worker client's own
        calls (a refused report raises); returns tasks done."""
        from search.evaluators.types import EvalOutcome

        n = 0
        while n < max_tasks:
            lease = self.api.lease(self.worker_id, self.target, 0.0)
            if lease is None:
                return n
            outcome = EvalOutcome.model_validate(fake_outcome(lease.task))
            assert self.api.result(lease.task_id, lease.lease_token, outcome).accepted
            n += 1
        return n
