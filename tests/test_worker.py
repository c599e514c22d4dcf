"""The device worker: its unit-level pieces (backoff, configuration, task fitting) and its
behaviour against the real API run as a subprocess (lease, heartbeat, result, 409,
reconnection while the API is down, SIGTERM)."""

from __future__ import annotations

import json
import random
import statistics

import pytest

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
    # env: inline JSON, or a path to a file
    monkeypatch.chdir(tmp_path)
    assert load_data_sources(None, '{"mine": "imgs"}') == {"mine": str(tmp_path / "imgs")}
    assert load_data_sources(None, str(f)) == got
    assert load_data_sources(None, None) == {}
    # the file wins over the env
    assert load_data_sources(f, '{"x": "nope"}') == got
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
