"""harness/tune/results.py: each arm's best finite trial for run --tuned; every arm needs its study."""

import math

import optuna
import pytest
from optuna.trial import TrialState

from harness.errors import UserError
from harness.spec.matrix import load_matrix
from harness.tune import best_params_for_arms, open_storage, search_space, study_name
from tests.harness.tune.common import write_matrix


def _add(study, params, dists, value=None, state=TrialState.COMPLETE, inter=None):
    study.add_trial(
        optuna.trial.create_trial(
            params=params, distributions=dists, value=value, state=state, intermediate_values=inter or {}
        )
    )


def test_best_params_for_arms_and_expand(env, tmp_path):
    matrix = load_matrix(write_matrix(env, tmp_path, "best"))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    st = open_storage(storage)
    for variant, opt in matrix.arms():
        space = search_space(variant, opt)
        dists = {
            d.name: (
                optuna.distributions.CategoricalDistribution(list(d.choices))
                if d.choices
                else optuna.distributions.FloatDistribution(d.low, d.high, log=d.log)
            )
            for d in space
        }
        study = optuna.create_study(study_name=study_name("best", f"{variant}+{opt}"), storage=st.storage)

        def params(lr, space=space):
            return {d.name: d.choices[-1] if d.choices else lr if d.name == "lr" else d.low for d in space}

        _add(study, params(1e-3), dists, value=3.0)
        _add(study, params(2e-3), dists, value=2.5)  # the best
        _add(study, params(3e-3), dists, value=math.inf)  # diverged: never the best
        _add(study, params(4e-3), dists, state=TrialState.PRUNED, inter={3: 1.0})  # pruned: never the best
        _add(study, params(5e-3), dists, state=TrialState.FAIL)
    tuned = best_params_for_arms(matrix, storage)
    assert set(tuned) == {"gpt+adamw", "kimi+muon"}
    g, k = tuned["gpt+adamw"], tuned["kimi+muon"]
    assert g["params"]["lr"] == 2e-3 and g["params"]["betas"][1] == 0.9 and g["train"]["warmup_frac"] == 0.0
    assert k["params"]["muon_scaling"] == "match_rms_adamw" and k["model"] == {"bias_update_speed": 1e-4}
    assert g["source"] == f"optuna:{storage}#best/gpt+adamw/trial1 value=2.5"
    specs = {s.arm: s for s in matrix.expand(256, tuned=tuned)}
    assert specs["gpt+adamw"].optim.lr == 2e-3 and specs["gpt+adamw"].tuned_from == g["source"]
    assert specs["kimi+muon"].optim.muon_scaling == "match_rms_adamw"
    assert specs["kimi+muon"].optim.muon_lr == k["params"]["muon_lr"]
    # every arm needs its study; a missing storage file is one line, not an empty new database
    other = load_matrix(write_matrix(env, tmp_path, "other"))
    with pytest.raises(UserError, match=r"^--tuned: other/gpt\+adamw \(no study\)"):
        best_params_for_arms(other, storage)
    with pytest.raises(UserError, match="no Optuna storage"):
        best_params_for_arms(matrix, f"sqlite:///{tmp_path}/nope.db")
    assert not (tmp_path / "nope.db").exists()
