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
    """A worker that speaks the protocol over a (Test)Client."""

    def __init__(self, http, headers: dict[str, str], target: str, name: str = "w1",
                 runtimes: list[str] | None = None) -> None:
        self.http = http
        self.headers = headers
        self.target = target
        self.name = name
        self.runtimes = runtimes if runtimes is not None else ["eager", "torchscript",
                                                                 "onnxruntime"]
        self.worker_id: str | None = None

    def register(self) -> dict[str, Any]:
        r = self.http.post("/v1/workers/register", headers=self.headers, json={
            "target": self.target, "name": self.name, "device": "cpu",
            "runtimes": self.runtimes, "fingerprint": {"cpu": "test"},
        })
        assert r.status_code == 200, r.text
        self.worker_id = r.json()["worker_id"]
        return r.json()

    def lease(self, wait_s: float = 0.0):
        r = self.http.post("/v1/tasks/lease", headers=self.headers, json={
            "worker_id": self.worker_id, "target": self.target, "wait_s": wait_s})
        if r.status_code == 204:
            return None
        assert r.status_code == 200, r.text
        return r.json()

    def heartbeat(self, lease: dict[str, Any]):
        return self.http.post(f"/v1/tasks/{lease['task_id']}/heartbeat", headers=self.headers,
                              json={"lease_token": lease["lease_token"]})

    def result(self, lease: dict[str, Any], outcome: dict[str, Any] | None = None):
        outcome = outcome if outcome is not None else fake_outcome(lease["task"])
        return self.http.post(f"/v1/tasks/{lease['task_id']}/result", headers=self.headers,
                              json={"lease_token": lease["lease_token"], "outcome": outcome})

    def fail(self, lease: dict[str, Any], reason: str = "crashed", message: str = "boom"):
        return self.http.post(f"/v1/tasks/{lease['task_id']}/fail", headers=self.headers,
                              json={"lease_token": lease["lease_token"], "reason": reason,
                                    "message": message})

    def release(self, lease: dict[str, Any]):
        return self.http.post(f"/v1/tasks/{lease['task_id']}/release", headers=self.headers,
                              json={"lease_token": lease["lease_token"]})

    def idle_heartbeat(self):
        return self.http.post(f"/v1/workers/{self.worker_id}/heartbeat", headers=self.headers,
                              json={})

    def work_all(self, max_tasks: int = 1000) -> int:
        """Lease and report until nothing is queued; returns tasks done."""
        n = 0
        while n < max_tasks:
            lease = self.lease()
            if lease is None:
                return n
            r = self.result(lease)
            assert r.status_code == 200, r.text
            n += 1
        return n
