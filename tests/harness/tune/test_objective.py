"""harness/tune/objective.py and run.py: pruned trials, equal trials per arm, diverged = +inf, failures stop an arm."""

import math

import optuna
import pytest
from optuna.trial import TrialState

from harness.errors import UserError
from harness.spec.matrix import load_matrix
from harness.tune import best_params_for_arms, open_storage
from tests.harness.tune.common import artifact_json, runs_of, tune_here, write_matrix


@pytest.mark.slow
def test_pruned_trials_and_equal_trials_per_arm(env, tmp_path):
    path = write_matrix(env, tmp_path, "prune")
    aggressive = optuna.pruners.ThresholdPruner(upper=0.0)  # any val loss > 0: prune at the first eval
    outcome = tune_here(env, tmp_path, path, n_trials=2, pruner=aggressive)
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db").storage
    for arm in ("gpt+adamw", "kimi+muon"):
        study = optuna.load_study(study_name=f"prune/{arm}", storage=storage)
        assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2  # same count for every arm
        assert all(list(t.intermediate_values) == [3] for t in study.trials)  # pruned at the step-3 eval
        assert outcome.studies[arm].added == 2
    runs = runs_of(env, "prune", "tune-trial")
    assert len(runs) == 4 and {r.data.tags["kb.status"] for r in runs} == {"pruned"}
    assert all(r.data.tags["kb.optuna_state"] == "PRUNED" for r in runs)
    kimi = [r for r in runs if r.data.tags["kb.arm"] == "kimi+muon"]
    for r in kimi:  # the router's bias speed went into the model dims, the Muon params into the optimizer
        params = r.data.params
        assert float(params["model.bias_update_speed"]) == float(params["tune.bias_update_speed"])
        assert float(r.data.params["optim.muon_lr"]) == float(r.data.params["tune.muon_lr"])
    study_runs = runs_of(env, "prune", "study")
    assert {r.data.tags["kb.arm"] for r in study_runs} == {"gpt+adamw", "kimi+muon"}
    imp = artifact_json(env, study_runs[0].info.run_id, "importances.json")
    assert imp["importances"] is None and "need 2" in imp["reason"]


@pytest.mark.slow
def test_diverged_is_inf_and_repeated_failures_stop_the_arm(env, tmp_path, monkeypatch):
    """Without training: gpt+adamw trials diverge (COMPLETE, +inf), kimi+muon trials crash (FAIL)."""
    import harness.trial.loop
    from harness.trial.loop import TrialResult

    def fake_run_trial(spec, data, out_dir, run, progress=None, on_eval=None, resume=True, **kw):
        status = "diverged" if spec.optimizer == "adamw" else "failed"
        run.end(status)
        return TrialResult(
            status=status,
            trial_key="k",
            step=3,
            error="RuntimeError: boom",
            metrics={"train/diverged_step": 3} if status == "diverged" else {},
        )

    monkeypatch.setattr(harness.trial.loop, "run_trial", fake_run_trial)
    path = write_matrix(env, tmp_path, "diverge")
    outcome = tune_here(env, tmp_path, path, n_trials=4, pruner="none")
    gpt, kimi = outcome.studies["gpt+adamw"], outcome.studies["kimi+muon"]
    assert [(t.state, t.value) for t in gpt.study.trials] == [(TrialState.COMPLETE, math.inf)] * 4
    assert gpt.counts()["diverged"] == 4 and gpt.best() is None
    assert [t.state for t in kimi.study.trials] == [TrialState.FAIL] * 3 and kimi.added == 3  # gave up
    with pytest.raises(UserError, match=r"diverge/gpt\+adamw \(no finished trial\)"):
        best_params_for_arms(load_matrix(path), f"sqlite:///{tmp_path}/optuna.db")
