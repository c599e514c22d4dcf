"""The Pareto plot says what it shows: space, target and budget in the title, the
reference network on the x axis, a log signal on the y axis; parameters against latency
without a quality signal; a sentence, not empty axes, when nothing was measured."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=True)

from test_cli_trials import _fake
from test_search_local import tiny_config

from search.local import run_search
from search.report import pareto_figure
from search.study import SearchDriver


def _driver(tmp_path, **budgets) -> SearchDriver:
    url = f"sqlite:///{tmp_path}/fitnas.db"
    config = tiny_config(6, **budgets)
    run_search(config, url, "tiny", tmp_path, progress=False, presets=[], evaluate=_fake,
               export=False)
    return SearchDriver.open(url, "tiny", config)


def test_labels_name_the_budget_reference_and_log_signal(tmp_path):
    driver = _driver(tmp_path, max_latency_ms=0.9, max_params=40_000)
    ax = pareto_figure(driver, []).axes[0]
    assert "tiny on cpu" in ax.get_title() and "<= 0.9 ms" in ax.get_title()
    assert "<= 40,000 params" in ax.get_title()
    assert "log SynFlow" in ax.get_ylabel() and "log value" in ax.get_ylabel()
    assert ax.get_xlabel() == "latency, median (ms)"
    assert any("params budget 40,000" in t.get_text() for t in ax.texts)


def test_without_a_signal_it_plots_params(tmp_path):
    url = f"sqlite:///{tmp_path}/fitnas.db"
    config = tiny_config(5, max_latency_ms=0.9, max_params=40_000)
    config = config.model_copy(update={"quality": config.quality.model_copy(
        update={"signal": "none"})})
    run_search(config, url, "tiny", tmp_path, progress=False, presets=[], evaluate=_fake,
               export=False)
    ax = pareto_figure(SearchDriver.open(url, "tiny", config), []).axes[0]
    assert ax.get_ylabel().startswith("parameters")
    ys = [y for coll in ax.collections for _, y in coll.get_offsets()]
    assert ys and max(ys) > 1000  # parameter counts, not a flat quality line
    assert any(line.get_label().startswith("params budget") for line in ax.lines)


def test_nothing_measured_says_why(tmp_path):
    driver = _driver(tmp_path, max_latency_ms=0.9, max_params=10)
    fig = pareto_figure(driver, [])
    ax = fig.axes[0]
    assert not ax.axison
    assert any("nothing to plot" in t.get_text() and "over a params" in t.get_text()
               for t in ax.texts)
