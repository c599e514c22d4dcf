"""The search driver (ask / tell over one Optuna study), with outcomes built by hand: the
driver never evaluates, so these are the outcomes a runner or a worker would report."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from blocks.presets import preset
from search.evaluators.types import (
    EvalOutcome,
    Failure,
    LatencyResult,
    LatencyStats,
    MeasureSettings,
    QualityResult,
    QualitySettings,
)
from search.space import DesignSpace
from search.study import (
    Budgets,
    SearchConfig,
    SearchDriver,
    SearchError,
    SQLMeasurementCache,
    make_storage,
    named_constraints,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY_SPACE = {
    "name": "tiny",
    "num_classes": 10,
    "resolution": [32],
    "width_mult": [0.5, 1.0],
    "stem": {"width": [8, 16]},
    "stages": [
        {"kinds": ["mbconv", "ds", "conv"], "stride": 2, "width": [16, 32, 64],
         "depth": [1, 3], "kernel": [3, 5]},
        {"kinds": ["mbconv", "bottleneck"], "stride": 2, "width": [32, 64, 128],
         "depth": [1, 2]},
    ],
}


def tiny_config(**kw) -> SearchConfig:
    base = dict(space=DesignSpace.from_dict(TINY_SPACE), target="cpu", trials=12, seed=7,
                measure=MeasureSettings(reference="preset:mobilenet_v2@0.5"),
                quality=QualitySettings(signal="synflow"))
    base.update(kw)
    return SearchConfig(**base)


def stats(median: float) -> LatencyStats:
    return LatencyStats(median=median, p90=median * 1.1, iqr=median * 0.05, cv=0.03, n=7,
                        mean=median, min=median * 0.95, max=median * 1.2)


def outcome_for(proposal, config: SearchConfig, latency_ms: float, quality: float,
                ratio: float | None = 0.8) -> EvalOutcome:
    lat = LatencyResult(
        latency_ms=stats(latency_ms),
        ratio_to_reference=stats(ratio) if ratio is not None else None,
        reference=config.measure.reference,
        reference_latency_ms=stats(latency_ms / ratio) if ratio else None,
        runtime="eager", settings=config.measure,
        device={"cpu": "test-cpu", "threads": 1}, params=proposal.cost.params,
        macs=proposal.cost.macs)
    return EvalOutcome(ok=True, latency=lat, seconds=1.5,
                       quality=QualityResult(signal="synflow", value=quality, seconds=0.2))


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/search.db"


def open_driver(url, config, cache=True):
    return SearchDriver.open(url, "s", config, SQLMeasurementCache(url) if cache else None)


def test_open_sets_directions_metric_names_and_config(url):
    config = tiny_config(budgets=Budgets(max_latency_ms=5.0))
    driver = open_driver(url, config)
    study = optuna.load_study(study_name="s", storage=url)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["quality (synflow)", "latency_ms"]
    stored = SearchConfig.model_validate(study.user_attrs["fitnas.config"])
    assert stored == config
    assert study.user_attrs["fitnas.budget.max_latency_ms"] == 5.0
    # same config again (other trial count): loads; other config: refused, one line
    again = open_driver(url, tiny_config(budgets=Budgets(max_latency_ms=5.0), trials=99))
    assert again.study._study_id == driver.study._study_id
    with pytest.raises(SearchError, match="different configuration") as refused:
        open_driver(url, tiny_config(budgets=Budgets(max_latency_ms=6.0)))
    # ... saying which option differs
    assert "(budgets.max_latency_ms: 5.0 -> 6.0)" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_measured_trials_get_constraints_and_numeric_user_attrs(url):
    config = tiny_config(budgets=Budgets(max_latency_ms=5.0, max_params=10_000_000,
                                         max_latency_ratio=1.0))
    driver = open_driver(url, config)
    fast = driver.ask()
    assert fast.task is not None and not fast.told
    assert fast.task.spec == fast.spec.canonical_dict()
    assert fast.task.quality.signal == "synflow"
    driver.tell(fast.trial_number, outcome_for(fast, config, 4.0, 3.5, ratio=0.9))
    slow = driver.ask()
    driver.tell(slow.trial_number, outcome_for(slow, config, 6.0, 9.0, ratio=1.2))

    t_fast, t_slow = driver.trials()
    # measured over the latency budget: PRUNED (never a dashboard's "best"), its figures
    # and constraints kept for the sampler and the reviewer
    assert (t_fast.state, t_slow.state) == (TrialState.COMPLETE, TrialState.PRUNED)
    assert t_slow.user_attrs["quality"] == 9.0 and t_slow.user_attrs["status"] == "measured"
    assert [t.number for t in driver.measured()] == [fast.trial_number, slow.trial_number]
    # optuna-dashboard 0.21 reads one legacy list of the constraint values
    assert sorted(t_slow.system_attrs["constraints"]) == pytest.approx(
        sorted(named_constraints(t_slow).values()))
    assert t_fast.values == [3.5, 4.0]
    assert t_fast.constraints["latency_ms"] == pytest.approx(4.0 / 5.0 - 1)
    assert t_fast.constraints["latency_ratio"] == pytest.approx(0.9 - 1)
    assert t_fast.constraints["params"] == pytest.approx(fast.cost.params / 1e7 - 1)
    assert t_slow.constraints["latency_ms"] == pytest.approx(0.2)
    assert t_slow.constraints["latency_ratio"] == pytest.approx(0.2)
    ua = t_fast.user_attrs
    for key in ("params", "macs", "activation_bytes", "latency_ms", "latency_p90_ms",
                "latency_iqr_ms", "latency_cv", "latency_ratio", "quality",
                "constraint_latency_ms", "constraint_latency_ratio", "constraint_params",
                "feasible"):
        assert isinstance(ua[key], int | float) and not isinstance(ua[key], bool), key
    assert ua["params"] == fast.cost.params and ua["latency_ms"] == 4.0
    assert ua["spec_hash"] == fast.spec.hash
    assert ua["spec_compact"] == fast.spec.to_compact()
    assert ua["device"]["cpu"] == "test-cpu"
    assert (ua["feasible"], t_slow.user_attrs["feasible"]) == (1, 0)
    assert ua["status"] == "measured"
    # the infeasible slow one (better quality) is neither on the Pareto set nor the winner
    assert [t.number for t in driver.pareto()] == [fast.trial_number]
    assert driver.recommend().number == fast.trial_number
    assert driver.best_feasible().number == fast.trial_number
    # Optuna agrees: best_trials filters by the constraints we set
    assert [t.number for t in driver.study.best_trials] == [fast.trial_number]


def test_prescreening_tells_over_budget_without_a_task(url):
    # a params budget below the smallest candidate of the space: nothing is measured
    config = tiny_config(budgets=Budgets(max_latency_ms=5.0, max_params=1_000))
    driver = open_driver(url, config)
    for _ in range(4):
        p = driver.ask()
        assert p.told and p.task is None and p.reason == "over_budget"
    trials = driver.trials()
    assert all(t.state == TrialState.PRUNED for t in trials)
    t = trials[0]
    assert t.constraints["params"] == pytest.approx(t.user_attrs["params"] / 1000 - 1)
    assert t.constraints["params"] > 0
    assert "latency_ms" not in t.constraints  # never measured
    assert t.user_attrs["status"] == "over_budget"
    assert t.user_attrs["over_budget"] == "params"
    assert driver.n_finished() == 4 and driver.pareto() == [] and driver.recommend() is None


def test_tpe_learns_from_prescreened_trials(url):
    """Pre-screened trials are PRUNED with constraints: TPE puts them among the
    infeasible ones (it reads PRUNED trials; it ignores FAIL)."""
    from optuna.samplers._tpe.sampler import _split_trials

    config = tiny_config(budgets=Budgets(max_latency_ms=5.0, max_macs=3_000_000))
    driver = open_driver(url, config)
    told = measured = 0
    while told < 3 or measured < 3:
        p = driver.ask()
        if p.told:
            told += 1
        else:
            measured += 1
            driver.tell(p.trial_number, outcome_for(p, config, 1.0 + measured, 1.0))
    trials = driver.trials(TrialState.COMPLETE, TrialState.PRUNED)
    below, above = _split_trials(driver.study, trials, 3)
    # the feasible measured trials are preferred ("below"); the over-budget ones are not
    assert all(t.state == TrialState.COMPLETE for t in below)
    assert {t.number for t in trials if t.state == TrialState.PRUNED} <= {t.number for t in above}


def test_failures_are_told_fail_with_reason_and_tell_is_idempotent(url):
    config = tiny_config(budgets=Budgets(max_latency_ms=5.0))
    driver = open_driver(url, config)
    p = driver.ask()
    bad = EvalOutcome(ok=False, failure=Failure(reason="timeout", message="no result after 1 s"),
                      seconds=1.0)
    driver.tell(p.trial_number, bad)
    t = driver.trials()[0]
    assert t.state == TrialState.FAIL
    assert t.user_attrs["fail_reason"] == "timeout"
    assert t.user_attrs["fail_message"] == "no result after 1 s"
    # a second report (a retried worker) changes nothing
    driver.tell(p.trial_number, outcome_for(p, config, 1.0, 1.0))
    again = driver.trials()[0]
    assert again.state == TrialState.FAIL and again.values is None
    # a non-finite quality is a failure, not a point on the front
    q = driver.ask()
    driver.tell(q.trial_number, outcome_for(q, config, 1.0, math.nan))
    assert driver.trials()[1].state == TrialState.FAIL
    assert "not finite" in driver.trials()[1].user_attrs["fail_message"]
    assert driver.n_finished() == 2


def test_duplicate_spec_reuses_the_cached_measurement(url):
    # a one-point space: every trial is the same spec
    one = dict(TINY_SPACE, width_mult=[1.0],
               stem={"width": [8]},
               stages=[{"kinds": ["mbconv"], "stride": 2, "width": [16], "depth": 1}])
    config = tiny_config(space=DesignSpace.from_dict(one))
    driver = open_driver(url, config)
    first = driver.ask()
    assert first.task is not None
    driver.tell(first.trial_number, outcome_for(first, config, 2.5, 4.0))
    second = driver.ask()
    assert second.told and second.task is None and second.reason == "cached"
    assert second.cache_key == first.cache_key
    t = driver.trials()[1]
    assert t.state == TrialState.COMPLETE and t.values == [4.0, 2.5]
    assert t.user_attrs["status"] == "cached"
    # the cache survives the process: a new driver on the same storage reuses it
    third = open_driver(url, config).ask()
    assert third.reason == "cached"
    # other measurement settings are another key: measured again
    other = tiny_config(space=DesignSpace.from_dict(one),
                        measure=MeasureSettings(runtime="onnxruntime"))
    fresh = SearchDriver.open(url, "other", other, SQLMeasurementCache(url)).ask()
    assert fresh.task is not None and fresh.cache_key != first.cache_key
    # the Pareto set holds the spec once
    assert len(driver.pareto()) == 1


def test_failed_outcomes_are_not_cached(url):
    one = dict(TINY_SPACE, width_mult=[1.0], stem={"width": [8]},
               stages=[{"kinds": ["ds"], "stride": 2, "width": [16], "depth": 1}])
    config = tiny_config(space=DesignSpace.from_dict(one))
    driver = open_driver(url, config)
    p = driver.ask()
    driver.tell(p.trial_number, EvalOutcome(ok=False, failure=Failure(
        reason="crashed", message="killed by SIGSEGV")))
    assert driver.ask().task is not None  # measured again, not a cached failure


def test_fail_stale_and_resume_counting(url):
    config = tiny_config(budgets=Budgets(max_latency_ms=50.0))
    driver = open_driver(url, config)
    done = driver.ask()
    driver.tell(done.trial_number, outcome_for(done, config, 3.0, 1.0))
    left = [driver.ask().trial_number for _ in range(2)]
    assert driver.n_running() == 2 and driver.n_finished() == 1
    # trials without a live owner are stale
    assert driver.stale_local_trials() == left
    assert driver.fail_stale([*left, done.trial_number]) == left
    assert driver.n_running() == 0
    t = driver.trials()[left[0]]
    assert t.state == TrialState.FAIL and t.user_attrs["fail_reason"] == "interrupted"
    # interrupted trials do not count toward --trials: a resumed run does them again
    assert driver.n_finished() == 1
    # a trial owned by this live process is not stale
    mine = SearchDriver.open(url, "s", config, owner=_this_owner())
    p = mine.ask()
    assert p.trial_number not in mine.stale_local_trials()


def test_owner_liveness():
    from search.study import owner_alive, process_owner

    me = process_owner()
    host = me.split(":")[0]
    assert owner_alive(me)
    assert not owner_alive(f"{host}:999999999:0")  # no such process
    assert not owner_alive(None) and not owner_alive("garbage")
    # a reused pid with another start time is not the owner
    pid, started = me.split(":")[1:]
    assert not owner_alive(f"{host}:{pid}:{int(started) - 1000}")
    assert owner_alive("another-host:1:0")  # other hosts: cannot tell, assumed alive


def _this_owner():
    from search.study import process_owner

    return process_owner()


def test_resumed_seeded_sampler_does_not_replay_the_first_run(url):
    config = tiny_config(sampler="random", seed=3)
    first = open_driver(url, config, cache=False)
    a = [first.ask().spec.hash for _ in range(3)]
    second = open_driver(url, config, cache=False)
    b = [second.ask().spec.hash for _ in range(3)]
    assert a != b
    # while the same seed on a fresh study repeats the same proposals
    fresh = SearchDriver.open(url, "fresh", config)
    assert [fresh.ask().spec.hash for _ in range(3)] == a


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_samplers_run_a_constrained_loop(url, sampler):
    """Each sampler drives a short loop with hard constraints; every Pareto member is
    feasible and the driver's front matches Optuna's own constrained best_trials."""
    config = tiny_config(sampler=sampler, population_size=4,
                         budgets=Budgets(max_latency_ms=2.0, max_params=200_000))
    driver = open_driver(url, config)
    while driver.n_finished() < 14:
        p = driver.ask()
        if p.task is not None:
            # a deterministic stand-in for hardware: latency grows with MACs
            lat = 0.5 + p.cost.macs / 2e6
            driver.tell(p.trial_number, outcome_for(p, config, lat, math.log(p.cost.params)))
    front = driver.pareto()
    for t in front:
        assert all(v <= 0 for v in t.constraints.values())
        assert t.values[1] <= 2.0 and t.user_attrs["params"] <= 200_000
    optuna_front = {t.user_attrs["spec_hash"] for t in driver.study.best_trials}
    assert {t.user_attrs["spec_hash"] for t in front} == optuna_front


def test_storage_url_errors_are_one_line(tmp_path):
    with pytest.raises(SearchError) as err:
        make_storage("postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert "cannot open storage" in str(err.value) and "\n" not in str(err.value)


def test_relative_budget_needs_a_reference():
    with pytest.raises(ValueError, match="reference"):
        tiny_config(budgets=Budgets(max_latency_ratio=1.0),
                    measure=MeasureSettings(reference=None))


def test_config_takes_a_builtin_space_by_name_but_never_a_path(tmp_path):
    config = SearchConfig(space="mobilenet_v2", budgets=Budgets(max_latency_ms=10))
    assert config.space == DesignSpace.load("mobilenet_v2")
    assert SearchConfig.model_validate_json(config.model_dump_json()) == config
    (tmp_path / "s.yaml").write_text("name: x")
    with pytest.raises(ValueError, match="unknown built-in space"):
        SearchConfig(space=str(tmp_path / "s.yaml"))


def test_a_ratio_budget_selects_on_the_ratio_and_records_both_figures(url):
    config = tiny_config(budgets=Budgets(max_latency_ratio=1.0))
    driver = open_driver(url, config)
    assert driver.study.metric_names == ["quality (synflow)", "latency_ratio"]
    # A is slower in ms (it ran under contention) but faster relative to the reference
    a = driver.ask()
    driver.tell(a.trial_number, outcome_for(a, config, 9.0, 5.0, ratio=0.5))
    b = driver.ask()
    driver.tell(b.trial_number, outcome_for(b, config, 5.0, 5.0, ratio=0.6))
    ta, tb = driver.trials()
    assert ta.values == [5.0, 0.5] and tb.values == [5.0, 0.6]
    assert (ta.user_attrs["latency_ms"], tb.user_attrs["latency_ms"]) == (9.0, 5.0)
    assert [t.number for t in driver.pareto()] == [a.trial_number]
    assert driver.recommend().number == a.trial_number
    # an ms budget keeps milliseconds; the study remembers which one it optimizes
    ms = tiny_config(budgets=Budgets(max_latency_ms=5.0))
    assert ms.metric_names() == ["quality (synflow)", "latency_ms"]


def test_warm_start_enqueues_seeds_then_references_as_the_first_trials(url):
    seed = "preset:mobilenet_v2@0.75"
    config = SearchConfig(space="mobilenet_v2", trials=10, seed=0,
                          budgets=Budgets(max_latency_ratio=1.0),
                          quality=QualitySettings(signal="synflow"),
                          seed_specs=[seed, "preset:mobilenet_v2@0.5"])
    driver = open_driver(url, config)
    got = []
    for _ in range(5):
        p = driver.ask()
        got.append((p.spec.hash, driver._frozen(p.trial_number).user_attrs.get("warm_start")))
        driver.tell(p.trial_number, outcome_for(p, config, 5.0, 1.0, ratio=0.9))
    want = [(preset("mobilenet_v2", 0.75).hash, "seed 1"),
            (preset("mobilenet_v2", 0.5).hash, "seed 2"),
            (preset("mobilenet_v2", 0.35).hash, "mobilenet_v2@0.35"),
            (preset("mobilenet_v2", 1.0).hash, "mobilenet_v2@1")]
    assert got[:4] == want  # seeds first; references the seeds already are come once
    assert "warm_start" not in driver._frozen(4).user_attrs  # then the sampler's own
    # resuming enqueues nothing again
    again = open_driver(url, config)
    assert "warm_start" not in again._frozen(again.ask().trial_number).user_attrs


def test_default_space_holds_the_default_reference_network():
    config = SearchConfig(space="default", budgets=Budgets(max_latency_ratio=1.0))
    labels = [label for label, _ in config.warm_start_specs()]
    assert labels == [f"mobilenet_v2@{w:g}" for w in config.space.width_mult]
    config.space.locate(preset("mobilenet_v2", 0.5))


def test_a_seed_spec_outside_the_space_is_a_clear_error():
    with pytest.raises(ValueError, match=r"seed spec 1 \(net_v1.*\): not a point of the "
                                         r"space 'tiny': num_classes is 1000, the space's is "
                                         r"10"):
        tiny_config(seed_specs=["preset:mobilenet_v2@0.5"])
    with pytest.raises(ValueError, match="give a compact spec"):
        tiny_config(seed_specs=["/etc/passwd"])


def test_a_trials_attributes_are_written_in_a_few_commits(url):
    import sqlalchemy as sa

    config = tiny_config(budgets=Budgets(max_latency_ms=5.0, max_params=10_000_000))
    driver = open_driver(url, config, cache=False)
    engine = driver.study._storage._backend.engine
    wrote, writes = [False], []

    def statement(conn, cursor, sql, *args):
        wrote[0] = wrote[0] or sql.lstrip().split()[0].upper() in ("INSERT", "UPDATE")

    def commit(conn):
        writes.append(wrote[0])
        wrote[0] = False

    sa.event.listen(engine, "before_cursor_execute", statement)
    sa.event.listen(engine, "commit", commit)
    p = driver.ask()
    driver.tell(p.trial_number, outcome_for(p, config, 4.0, 3.5))
    t = driver.trials()[0]
    # some 30 attributes and two constraints, as before, each readable by the dashboard
    assert len(t.user_attrs) >= 30 and set(named_constraints(t)) == {"latency_ms", "params"}
    assert t.user_attrs["latency_ms"] == 4.0 and t.user_attrs["status"] == "measured"
    # Optuna's own: the trial, one per parameter, the tell; ours: one in ask, one in tell
    # (one commit per attribute and constraint made that 46 here)
    assert sum(writes) <= len(t.params) + 6, sum(writes)


def test_fields_at_their_defaults_keep_an_older_studys_hash():
    config = tiny_config()
    identity = config.identity()
    assert not {"seed_specs", "warm_start", "predictor"} & set(identity)
    assert tiny_config(warm_start=False).config_hash() != config.config_hash()


def test_opening_a_storage_another_process_is_creating_retries(tmp_path, monkeypatch):
    """A search and its dashboard opening a new storage at once both run Optuna's schema
    set-up; the loser ('table ... already exists') opens again instead of failing."""
    import sqlalchemy.exc

    real = optuna.storages.RDBStorage
    calls = []

    def racing(url, **kw):
        calls.append(url)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError(
                "CREATE TABLE study_directions", {}, Exception(
                    "table study_directions already exists"))
        return real(url, **kw)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    storage = make_storage(f"sqlite:///{tmp_path}/new.db")
    assert len(calls) == 2 and storage.get_all_studies() == []
    calls.clear()

    def broken(url, **kw):
        calls.append(url)
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("disk I/O error"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    with pytest.raises(SearchError, match="disk I/O error"):
        make_storage(f"sqlite:///{tmp_path}/other.db")
    assert len(calls) == 1  # a real error is not retried


def test_the_sampler_reads_the_trials_once_per_ask_and_proposes_the_same(tmp_path,
                                                                        monkeypatch):
    """TPE (grouped, constant liar) re-reads the study for each group of parameters; the
    snapshot answers those reads from one query per ask, with the same proposals, also
    with trials in flight."""
    import contextlib
    import random

    import search.study as study_mod

    def run(name: str) -> tuple[list[str], int]:
        url = f"sqlite:///{tmp_path}/{name}.db"
        config = SearchConfig(space="default", trials=16, seed=0,
                              budgets=Budgets(max_latency_ratio=1.0))
        driver = SearchDriver.open(url, "s", config, None)
        storage = driver.study._storage
        reads = {"n": 0}
        real = storage.get_all_trials

        def counted(*a, **k):
            reads["n"] += 1
            return real(*a, **k)

        monkeypatch.setattr(storage, "get_all_trials", counted)
        rng = random.Random(0)
        hashes, pending, last_reads = [], [], 0
        for _ in range(16):
            reads["n"] = 0
            p = driver.ask()
            last_reads = reads["n"]
            hashes.append(p.spec.hash)
            if p.task is not None:
                pending.append(p)
            if len(pending) >= 2:
                q = pending.pop(0)
                driver.tell(q.trial_number, outcome_for(q, config, 5.0, rng.uniform(1, 50),
                                                        ratio=rng.uniform(0.3, 1.2)))
        return hashes, last_reads

    with_snapshot, reads_with = run("a")
    monkeypatch.setattr(study_mod, "trials_snapshot", lambda study: contextlib.nullcontext())
    without, reads_without = run("b")
    assert with_snapshot == without
    assert reads_with <= 3 < 10 <= reads_without
