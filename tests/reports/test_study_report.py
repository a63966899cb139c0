"""A report on an experiment that has Optuna studies (kb.kind=study runs with trials.csv): the path README's
"Tune, then compare" ends on (`kimi-bench report` raised AttributeError in Collected.studies before)."""

from __future__ import annotations

import pytest

from reports.collect import collect
from reports.markdown import write_report
from tests.reports.conftest import build_store
from tests.reports.studies import add_study


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    root = tmp_path_factory.mktemp("studied")
    st = build_store(root)
    for i, arm in enumerate(("gpt+adamw", "kimi+muon")):
        add_study(st.uri, st.experiment_id, root, arm, n_trials=6, start=1_750_010_000_000 + 1000 * i)
    return st


def test_studies_reads_every_arms_trials(studied):
    got = collect(studied.uri, studied.experiment).studies()
    assert sorted(got) == ["gpt+adamw", "kimi+muon"]
    trials, importances = got["kimi+muon"]
    assert len(trials) == 6 and "params_muon_lr" in trials
    assert importances == {"lr": 0.9, "weight_decay": 0.1}


@pytest.mark.slow
def test_report_on_an_experiment_with_studies(studied, tmp_path):
    md = write_report(collect(studied.uri, studied.experiment), tmp_path).read_text()
    for arm in ("gpt+adamw", "kimi+muon"):
        assert f"Optuna history: {arm}" in md
        assert (tmp_path / "figures" / f"optuna_{arm.replace('+', '_')}_history.png").is_file()
