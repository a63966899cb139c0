"""harness/tune.py: shared studies, trial counting, stale trials, storage rules, tuned params, pruning.

Trials are tiny (1 layer, block 32, 6 steps, eval every 3) on a small text corpus; one MLflow store is
migrated once per session and every test uses its own experiment (matrix name) in it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from arch.optimizers import OPTIMIZERS
from harness.errors import UserError
from harness.matrix import load_matrix
from harness.registry import VARIANTS
from harness.tracking import Tracker
from harness.tune import (
    FAMILY,
    HEARTBEAT_ATTR,
    MOE_SPACE,
    RUN_ATTR,
    SEARCH_SPACES,
    apply_params,
    best_params_for_arms,
    make_pruner,
    open_storage,
    search_space,
    study_name,
    tune,
)

REPO = Path(__file__).resolve().parents[2]
optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """A corpus folder, its token cache and a migrated MLflow store shared by the tests."""
    root = tmp_path_factory.mktemp("tune")
    corpus = root / "corpus"
    corpus.mkdir()
    words = ["def", "return", "self", "x", "y", "lambda", "(", ")", ":", "\n", "    ", "import", "for"]
    for i in range(6):
        (corpus / f"f{i}.py").write_text(" ".join(words[(j * 7 + i * 3) % len(words)] for j in range(2500)))
    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates and migrates the store once
    from harness.data import DataConfig, prepare

    prepare(DataConfig(corpus=f"text:{corpus}", tokenizer="byte", cache_dir=root / "cache"))
    return {"root": root, "corpus": corpus, "uri": uri, "cache": str(root / "cache")}


ARMS_2 = '[{ variant = "gpt", optimizer = "adamw" }, { variant = "kimi", optimizer = "muon" }]'


def write_matrix(env, tmp_path: Path, name: str, arms: str = ARMS_2, extra: str = "") -> Path:
    """A tiny matrix; its MLflow experiment is created here so artifacts land under tmp_path."""
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
name = "{name}"
[data]
corpus = "text:{env['corpus']}"
tokenizer = "byte"
[train]
steps = 6
micro_batch_size = 2
eval_interval = 3
eval_tokens = 256
log_interval = 3
infer_batch_sizes = [1]
infer_new_tokens = 2
[matrix]
presets = ["tiny"]
arms = {arms}
seeds = [0]
[model]
block_size = 32
n_layer = 1
{extra}
""")
    MlflowClient(env["uri"]).create_experiment(name, artifact_location=(tmp_path / "art").as_uri())
    return path


def run_tune(env, tmp_path, matrix, **kw):
    kw.setdefault("storage", f"sqlite:///{tmp_path}/optuna.db")
    return tune(matrix, tracking_uri=env["uri"], cache_dir=env["cache"], out=tmp_path / "runs",
                system_metrics=False, **kw)


def runs_of(env, experiment: str, kind: str) -> list:
    client = MlflowClient(env["uri"])
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`kb.kind` = '{kind}'",
                              max_results=1000)


def artifact_json(env, run_id: str, name: str):
    client = MlflowClient(env["uri"])
    return json.loads(Path(client.download_artifacts(run_id, name)).read_text())


# ----------------------------------------------------------------------------------------------- search space


def test_search_space_same_kind_for_every_arm():
    by_family: dict[str, set[frozenset]] = {}
    for variant in VARIANTS:
        for opt in OPTIMIZERS:
            names = [d.name for d in search_space(variant, opt)]
            assert len(names) == len(set(names))
            moe = {d.name for d in MOE_SPACE}
            assert moe <= set(names) if variant in ("gpt-moe", "kimi") else not moe & set(names)
            by_family.setdefault(FAMILY[opt], set()).add(frozenset(set(names) - moe))
    assert by_family == {
        "adamw": {frozenset({"lr", "weight_decay", "warmup_frac", "beta2"})},
        "muon": {frozenset({"muon_lr", "lr", "weight_decay", "warmup_frac", "momentum", "muon_scaling"})},
    }
    for dim in (d for space in SEARCH_SPACES.values() for d in space):
        assert dim.choices or (dim.low < dim.high and (not dim.log or dim.low > 0)), dim


def test_apply_params_reaches_optimizer_train_and_model(env, tmp_path):
    matrix = load_matrix(write_matrix(env, tmp_path, "apply", extra="[optim.adamw]\nbetas = [0.8, 0.99]"))
    base = {s.arm: s for s in matrix.expand(256)}
    a = apply_params(base["gpt+adamw"], matrix, {"lr": 2e-3, "weight_decay": 0.05, "warmup_frac": 0.1,
                                                 "beta2": 0.95}, experiment="apply/gpt+adamw")
    assert (a.optim.lr, a.optim.weight_decay, a.optim.betas) == (2e-3, 0.05, (0.8, 0.95))
    assert (a.train.warmup_frac, a.train.warmup_steps) == (0.1, None)
    assert a.key("h") != base["gpt+adamw"].key("h")  # the study name is the experiment: no key collision
    k = apply_params(base["kimi+muon"], matrix, {"muon_lr": 0.03, "lr": 1e-3, "weight_decay": 0.0,
                                                 "warmup_frac": 0.0, "momentum": 0.9,
                                                 "muon_scaling": "match_rms_adamw",
                                                 "bias_update_speed": 5e-3},
                     experiment="apply/kimi+muon")
    assert (k.optim.muon_lr, k.optim.momentum, k.optim.muon_scaling) == (0.03, 0.9, "match_rms_adamw")
    assert k.dims.bias_update_speed == 5e-3 and k.optim.betas == base["kimi+muon"].optim.betas


def test_pruner_choices():
    spec = next(iter(load_matrix(REPO / "experiments" / "tune-smoke.toml").expand(256)))
    assert isinstance(make_pruner("median", 20, spec)[0], optuna.pruners.MedianPruner)
    hb, desc = make_pruner("hyperband", 20, spec)
    assert isinstance(hb, optuna.pruners.HyperbandPruner) and "max_resource=60" in desc
    assert isinstance(make_pruner("none", 20, spec)[0], optuna.pruners.NopPruner)
    with pytest.raises(UserError, match="--pruner"):
        make_pruner("medain", 20, spec)


# ------------------------------------------------------------------------------------------------ storage


def test_refuses_the_mlflow_store(env, tmp_path):
    path = write_matrix(env, tmp_path, "refuse")
    for bad in (env["uri"], f"sqlite:///{tmp_path}/mlflow.db", f"journal:{tmp_path}/mlflow.db"):
        with pytest.raises(UserError, match=r"^--storage: .* is the MLflow store") as e:
            open_storage(bad, env["uri"])
        assert "\n" not in str(e.value)
    renamed = tmp_path / "renamed.db"  # MLflow's tables under another name are still MLflow's
    shutil.copy(env["uri"].removeprefix("sqlite:///"), renamed)
    with pytest.raises(UserError, match="MLflow store"):
        open_storage(str(renamed), env["uri"])
    # through the CLI command's signature (what the lead registers)
    from typer.testing import CliRunner

    from cli import app

    argv = ["tune", "--matrix", str(path), "--storage", env["uri"], "--tracking-uri", env["uri"]]
    result = CliRunner().invoke(app, argv)
    assert isinstance(result.exception, UserError) and "MLflow store" in str(result.exception)
    assert not (tmp_path / "runs").exists()  # refused before any work


# ------------------------------------------------------------------------------------------------ run --tuned


def _add(study, params, dists, value=None, state=TrialState.COMPLETE, inter=None):
    study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value, state=state,
                                              intermediate_values=inter or {}))


def test_best_params_for_arms_and_expand(env, tmp_path):
    matrix = load_matrix(write_matrix(env, tmp_path, "best"))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    st = open_storage(storage)
    for variant, opt in matrix.arms():
        space = search_space(variant, opt)
        dists = {d.name: (optuna.distributions.CategoricalDistribution(list(d.choices)) if d.choices else
                          optuna.distributions.FloatDistribution(d.low, d.high, log=d.log)) for d in space}
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


# ------------------------------------------------------------------------------------------------ workers


WORKER = """
import sys, torch
torch.set_num_threads(1)
from harness.tune import tune
tune(sys.argv[1], n_trials=2, storage=sys.argv[2], tracking_uri=sys.argv[3], cache_dir=sys.argv[4],
     out=sys.argv[5], pruner="none", system_metrics=False)
"""


def test_two_workers_share_one_study_and_add_their_trials(env, tmp_path):
    path = write_matrix(env, tmp_path, "shared", arms='[{ variant = "gpt", optimizer = "adamw" }]')
    storage = f"sqlite:///{tmp_path}/optuna.db"
    open_storage(storage)  # the schema exists before the workers start (they would retry otherwise)
    envvars = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = str(tmp_path / "runs")
    args = [sys.executable, "-c", WORKER, str(path), storage, env["uri"], env["cache"], out]
    workers = [subprocess.Popen(args, cwd=tmp_path, env=envvars, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for w in workers:
        output, _ = w.communicate(timeout=300)
        assert w.returncode == 0, output[-3000:]
    study = optuna.load_study(study_name="shared/gpt+adamw", storage=storage)
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)  # 2 + 2: the sum
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4  # no duplicated start points
    assert study.user_attrs["kb.arm"] == "gpt+adamw" and "kb.search_space" in study.user_attrs

    studies = runs_of(env, "shared", "study")
    runs = runs_of(env, "shared", "tune-trial")
    assert len(runs) == 4 and {r.info.run_id for r in runs} == {t.user_attrs[RUN_ATTR] for t in trials}
    study_ids = {r.info.run_id for r in studies}
    for r in runs:
        assert r.data.tags["mlflow.parentRunId"] in study_ids and r.data.tags["kb.status"] == "finished"
        assert r.data.tags["kb.arm"] == "gpt+adamw" and "val/loss_final" in r.data.metrics
        history = MlflowClient(env["uri"]).get_metric_history(r.info.run_id, "val/loss")
        assert sorted(m.step for m in history) == [0, 3, 6]  # curves logged like matrix trials
        assert float(r.data.params["optim.lr"]) == float(r.data.params["tune.lr"])
    run = MlflowClient(env["uri"]).get_run(study.user_attrs[next(k for k in study.user_attrs
                                                                 if k.startswith("mlflow_study_run:"))])
    assert run.data.tags["kb.kind"] == "study" and run.info.run_name == "study shared/gpt+adamw"
    assert float(run.data.tags["kb.best_value"]) == pytest.approx(study.best_value, rel=1e-5)
    imp = artifact_json(env, run.info.run_id, "importances.json")
    assert set(imp["importances"]) == {"lr", "weight_decay", "warmup_frac", "beta2"}
    csv = Path(MlflowClient(env["uri"]).download_artifacts(run.info.run_id, "trials.csv")).read_text()
    assert csv.count("\n") == 5 and "params_lr" in csv

    # --total-trials counts the study, not the worker: 4 -> 5, then nothing more
    outcome = run_tune(env, tmp_path, path, total_trials=5, storage=storage, pruner="none")
    assert outcome.studies["gpt+adamw"].added == 1
    outcome = run_tune(env, tmp_path, path, total_trials=5, storage=storage, pruner="none")
    assert outcome.studies["gpt+adamw"].added == 0
    assert len(study.get_trials()) == 5


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_stale_running_trial_fails_on_next_worker_start(env, tmp_path, kind):
    name = f"stale-{kind}"
    path = write_matrix(env, tmp_path, name, arms='[{ variant = "gpt", optimizer = "adamw" }]')
    storage = f"sqlite:///{tmp_path}/optuna.db" if kind == "sqlite" else f"journal:{tmp_path}/optuna.journal"
    st = open_storage(storage, heartbeat_s=1)
    study = optuna.create_study(study_name=f"{name}/gpt+adamw", storage=st.storage)
    dead = study.ask()  # a worker that died mid-trial: RUNNING forever, its MLflow run 'running'
    tracker = Tracker(env["uri"])
    exp_id = tracker.ensure_experiment(name)
    run = tracker.start_trial(exp_id, None, "dead", {}, {}, system_metrics=False, kind="tune-trial")
    dead.set_user_attr(RUN_ATTR, run.run_id)
    if kind == "sqlite":
        st.storage.record_heartbeat(dead._trial_id)
        time.sleep(3.5)  # grace period = 2 x heartbeat, + 1 s: sqlite stores heartbeats at whole seconds
    else:
        st.storage.set_trial_system_attr(dead._trial_id, HEARTBEAT_ATTR, time.time() - 100)
    outcome = run_tune(env, tmp_path, path, n_trials=1, storage=storage, pruner="none", heartbeat_s=1)
    trials = optuna.load_study(study_name=f"{name}/gpt+adamw", storage=open_storage(storage).storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert outcome.studies["gpt+adamw"].added == 1
    killed = MlflowClient(env["uri"]).get_run(run.run_id)
    assert killed.data.tags["kb.status"] == "killed" and killed.info.status == "KILLED"
    if kind == "journal":  # our own heartbeat was written for the live trial
        assert HEARTBEAT_ATTR in trials[1].system_attrs


# ------------------------------------------------------------------------------------------------ pruning


def test_pruned_trials_and_equal_trials_per_arm(env, tmp_path):
    path = write_matrix(env, tmp_path, "prune")
    aggressive = optuna.pruners.ThresholdPruner(upper=0.0)  # any val loss > 0: prune at the first eval
    outcome = run_tune(env, tmp_path, path, n_trials=2, pruner=aggressive)
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


def test_diverged_is_inf_and_repeated_failures_stop_the_arm(env, tmp_path, monkeypatch):
    """Without training: gpt+adamw trials diverge (COMPLETE, +inf), kimi+muon trials crash (FAIL)."""
    import harness.trial
    from harness.trial import TrialResult

    def fake_run_trial(spec, data, out_dir, run, progress=None, on_eval=None, resume=True, **kw):
        status = "diverged" if spec.optimizer == "adamw" else "failed"
        run.end(status)
        return TrialResult(status=status, trial_key="k", step=3, error="RuntimeError: boom",
                           metrics={"train/diverged_step": 3} if status == "diverged" else {})

    monkeypatch.setattr(harness.trial, "run_trial", fake_run_trial)
    path = write_matrix(env, tmp_path, "diverge")
    outcome = run_tune(env, tmp_path, path, n_trials=4, pruner="none")
    gpt, kimi = outcome.studies["gpt+adamw"], outcome.studies["kimi+muon"]
    assert [(t.state, t.value) for t in gpt.study.trials] == [(TrialState.COMPLETE, math.inf)] * 4
    assert gpt.counts()["diverged"] == 4 and gpt.best() is None
    assert [t.state for t in kimi.study.trials] == [TrialState.FAIL] * 3 and kimi.added == 3  # gave up
    with pytest.raises(UserError, match=r"diverge/gpt\+adamw \(no finished trial\)"):
        best_params_for_arms(load_matrix(path), f"sqlite:///{tmp_path}/optuna.db")
