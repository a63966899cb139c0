"""harness/tune/sampler.py: TPE seeded per trial through public Optuna API; the pruner choices.

The property the studies rely on: a trial's draws depend only on (sampler seed, trial number) and the study's
history, so one worker is reproducible, a resumed study draws what an uninterrupted one would have, workers
sharing a study never repeat each other's start points, and arms with one search space start alike.
"""

import inspect
import json
import math

import optuna
import pytest

from harness.errors import UserError
from harness.spec.matrix import load_matrix
from harness.tune import make_pruner, make_sampler, search_space
from tests.harness.tune.common import REPO

SPACE = search_space("kimi", "muon")  # floats, a log range and a categorical
N, TARGET = 10, 12  # 4 random start trials (n_startup_trials(12)), then 6 TPE trials


def _objective(shift=0.0):
    def f(trial):
        p = {d.name: d.suggest(trial) for d in SPACE}
        return (math.log10(p["lr"]) + 3 + shift) ** 2 + (p["momentum"] - 0.95) ** 2 + (p["muon_scaling"] == "original")

    return f


def _params(study):
    return [json.dumps(t.params, sort_keys=True) for t in study.trials]


def _fresh(seed=0, storage=None, name=None):
    return optuna.create_study(storage=storage, study_name=name, sampler=make_sampler(seed, TARGET))


def test_one_worker_is_reproducible_and_seeds_differ():
    a, b, other = _fresh(), _fresh(), _fresh(seed=1)
    for s in (a, b, other):
        s.optimize(_objective(), n_trials=N)
    assert _params(a) == _params(b) and len(set(_params(a))) == N
    assert _params(other)[0] != _params(a)[0]


def test_a_resumed_study_draws_what_an_uninterrupted_one_would():
    whole = _fresh()
    whole.optimize(_objective(), n_trials=N)
    storage = optuna.storages.InMemoryStorage()
    first = _fresh(storage=storage, name="s")
    first.optimize(_objective(), n_trials=3)
    again = optuna.load_study(study_name="s", storage=storage, sampler=make_sampler(0, TARGET))  # a rerun
    again.optimize(_objective(), n_trials=N - 3)
    assert _params(again) == _params(whole)


def test_two_workers_on_one_study_never_repeat_and_match_one_worker():
    storage = optuna.storages.InMemoryStorage()
    w1 = _fresh(storage=storage, name="s")
    w2 = optuna.load_study(study_name="s", storage=storage, sampler=make_sampler(0, TARGET))
    for i in range(N):
        (w1 if i % 2 == 0 else w2).optimize(_objective(), n_trials=1)
    single = _fresh()
    single.optimize(_objective(), n_trials=N)
    assert len(set(_params(w1))) == N and _params(w1) == _params(single)


def test_arms_with_one_space_start_from_the_same_points():
    a, b = _fresh(), _fresh()
    a.optimize(_objective(), n_trials=4)
    b.optimize(_objective(shift=1.5), n_trials=4)  # other values: the random start does not look at them
    assert _params(a) == _params(b)


def test_no_private_optuna_state():
    import harness.tune.sampler as sampler

    source = inspect.getsource(sampler)
    assert "_rng" not in source and "_random_sampler" not in source


def test_pruner_choices():
    spec = next(iter(load_matrix(REPO / "experiments" / "tune-smoke.toml").expand(256)))
    assert isinstance(make_pruner("median", 20, spec)[0], optuna.pruners.MedianPruner)
    hb, desc = make_pruner("hyperband", 20, spec)
    assert isinstance(hb, optuna.pruners.HyperbandPruner) and "max_resource=60" in desc
    assert isinstance(make_pruner("none", 20, spec)[0], optuna.pruners.NopPruner)
    with pytest.raises(UserError, match="--pruner"):
        make_pruner("medain", 20, spec)
