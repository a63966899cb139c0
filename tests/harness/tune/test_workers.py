"""harness/tune/run.py with several workers: a shared study, trial counting, stale and killed workers.

Workers here are real processes (two sharing one study; one SIGKILLed mid-trial) or run_worker in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness.errors import UserError
from harness.stores.tracking import Tracker
from harness.tune import HEARTBEAT_ATTR, RUN_ATTR, TuneConfig, TuneEvent, open_storage, run_worker
from tests.harness.tune.common import ARM_GPT, REPO, artifact_json, runs_of, tune_here, write_matrix
from tests.reaper import die_with_parent

WORKER = """
import sys, torch
torch.set_num_threads(1)
from harness.tune import TuneConfig, run_tune
run_tune(TuneConfig(sys.argv[1], n_trials=2, storage=sys.argv[2], tracking_uri=sys.argv[3], cache_dir=sys.argv[4],
                    out=sys.argv[5], pruner="none", system_metrics=False))
"""


@pytest.mark.slow
def test_two_workers_share_one_study_and_add_their_trials(env, tmp_path):
    path = write_matrix(env, tmp_path, "shared", arms=ARM_GPT)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    open_storage(storage)  # the schema exists before the workers start (they would retry otherwise)
    envvars = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = str(tmp_path / "runs")
    args = [sys.executable, "-c", WORKER, str(path), storage, env["uri"], env["cache"], out]
    workers = [
        subprocess.Popen(
            args,
            cwd=tmp_path,
            env=envvars,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=die_with_parent,
        )
        for _ in range(2)
    ]
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
    run = MlflowClient(env["uri"]).get_run(
        study.user_attrs[next(k for k in study.user_attrs if k.startswith("mlflow_study_run:"))]
    )
    assert run.data.tags["kb.kind"] == "study" and run.info.run_name == "study shared/gpt+adamw"
    assert float(run.data.tags["kb.best_value"]) == pytest.approx(study.best_value, rel=1e-5)
    imp = artifact_json(env, run.info.run_id, "importances.json")
    assert set(imp["importances"]) == {"lr", "weight_decay", "warmup_frac", "beta2"}
    csv = Path(MlflowClient(env["uri"]).download_artifacts(run.info.run_id, "trials.csv")).read_text()
    assert csv.count("\n") == 5 and "params_lr" in csv

    # --total-trials counts the study, not the worker: 4 -> 5, then nothing more
    outcome = tune_here(env, tmp_path, path, total_trials=5, storage=storage, pruner="none")
    assert outcome.studies["gpt+adamw"].added == 1
    outcome = tune_here(env, tmp_path, path, total_trials=5, storage=storage, pruner="none")
    assert outcome.studies["gpt+adamw"].added == 0
    assert len(study.get_trials()) == 5


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
@pytest.mark.slow
def test_stale_running_trial_fails_on_next_worker_start(env, tmp_path, kind):
    name = f"stale-{kind}"
    path = write_matrix(env, tmp_path, name, arms=ARM_GPT)
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
    outcome = tune_here(env, tmp_path, path, n_trials=1, storage=storage, pruner="none", heartbeat_s=1)
    trials = optuna.load_study(study_name=f"{name}/gpt+adamw", storage=open_storage(storage).storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert outcome.studies["gpt+adamw"].added == 1
    killed = MlflowClient(env["uri"]).get_run(run.run_id)
    assert killed.data.tags["kb.status"] == "killed" and killed.info.status == "KILLED"
    if kind == "journal":  # our own heartbeat was written for the live trial
        assert HEARTBEAT_ATTR in trials[1].system_attrs


KILLED_WORKER = """
import sys, torch
torch.set_num_threads(1)
from harness.tune import TuneConfig, run_worker
run_worker(TuneConfig(sys.argv[1], n_trials=1, storage=sys.argv[2], tracking_uri=sys.argv[3], cache_dir=sys.argv[4],
                      out=sys.argv[5], pruner="none", system_metrics=False, heartbeat_s=1), worker_id=7)
"""


def _running_trial_with_run(storage: str, name: str):
    """The study's RUNNING trial once its MLflow run exists, else None (the study may not exist yet)."""
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage).storage)
    except KeyError:
        return None
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return next((t for t in running if RUN_ATTR in t.user_attrs), None)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
@pytest.mark.slow
def test_killed_worker_trial_fails_and_its_run_is_killed(env, tmp_path, monkeypatch, kind):
    """A real worker process SIGKILLed mid-trial: the next worker fails its trial and kills its MLflow run."""
    name = f"killed-{kind}"
    # Trains until it is killed (minutes of steps, yet a budget that ends by itself); dies with pytest too.
    path = write_matrix(env, tmp_path, name, arms=ARM_GPT, steps=5_000)
    storage = f"sqlite:///{tmp_path}/optuna.db" if kind == "sqlite" else f"journal:{tmp_path}/optuna.journal"
    open_storage(storage)
    envvars = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", KILLED_WORKER, str(path), storage, env["uri"], env["cache"], str(tmp_path / "r")]
    worker = subprocess.Popen(
        args,
        cwd=tmp_path,
        env=envvars,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    try:
        deadline, dead = time.monotonic() + 240, None
        while dead is None and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.5)
            dead = _running_trial_with_run(storage, f"{name}/gpt+adamw")
        assert dead is not None, worker.communicate(timeout=30)[0][-3000:] if worker.poll() is not None else "no trial"
        client = MlflowClient(env["uri"])
        while (
            not client.get_metric_history(dead.user_attrs[RUN_ATTR], "train/loss")
            and worker.poll() is None
            and time.monotonic() < deadline
        ):  # killed mid-training, not in its setup
            time.sleep(0.5)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
    dead_run = dead.user_attrs[RUN_ATTR]
    assert MlflowClient(env["uri"]).get_run(dead_run).data.tags["kb.status"] == "running"  # nobody ended it
    time.sleep(3.5)  # past the grace period (2 x 1 s) and sqlite's whole-second heartbeat resolution

    import harness.trial.loop
    from harness.trial.loop import TrialResult

    def quick_trial(spec, data, out_dir, run, **kw):  # the rescuing worker need not train
        run.end("finished")
        return TrialResult(status="finished", trial_key="k", step=1, error=None, metrics={"val/loss_final": 2.0})

    monkeypatch.setattr(harness.trial.loop, "run_trial", quick_trial)
    outcome = tune_here(env, tmp_path, path, n_trials=1, storage=storage, pruner="none", heartbeat_s=1)
    trials = optuna.load_study(study_name=f"{name}/gpt+adamw", storage=open_storage(storage).storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert outcome.studies["gpt+adamw"].added == 1
    killed = MlflowClient(env["uri"]).get_run(dead_run)
    assert killed.data.tags["kb.status"] == "killed" and killed.info.status == "KILLED"
    assert MlflowClient(env["uri"]).get_metric_history(dead_run, "train/loss")  # it had been training


@pytest.mark.slow
def test_run_worker_reports_only_through_its_callback(env, tmp_path, capsys):
    path = write_matrix(env, tmp_path, "events", arms=ARM_GPT)
    events: list[TuneEvent] = []
    config = TuneConfig(
        path,
        n_trials=1,
        storage=f"sqlite:///{tmp_path}/optuna.db",
        tracking_uri=env["uri"],
        cache_dir=env["cache"],
        out=tmp_path / "runs",
        pruner="none",
        system_metrics=False,
    )
    outcome = run_worker(config, worker_id=5, on_event=events.append)
    assert capsys.readouterr().out == ""  # nothing printed: a Ray task's output stays clean
    kinds = [e.kind for e in events]
    assert kinds.index("arm") < kinds.index("trial_start") < kinds.index("step") < kinds.index("trial_end")
    assert {e.worker_id for e in events} == {5} and outcome.worker_id == 5
    end = next(e for e in events if e.kind == "trial_end")
    assert end.arm == "gpt+adamw" and end.trial == 0 and end.info["state"] == "COMPLETE"
    assert [e.step for e in events if e.kind == "step"][-1] == 6


@pytest.mark.parametrize(
    "options,flag",
    [
        ({"n_trials": 0}, "--n-trials"),
        ({"total_trials": -1}, "--total-trials"),
        ({"timeout": 0}, "--timeout"),
        ({"pruner": "medain"}, "--pruner"),
        ({"heartbeat_s": 0}, "--heartbeat"),
    ],
)
def test_config_errors_are_one_line(options, flag):
    with pytest.raises(UserError) as e:
        TuneConfig("unused.toml", **options)
    assert str(e.value).startswith(f"{flag}: ") and "\n" not in str(e.value)
    assert (
        TuneConfig(REPO / "experiments" / "smoke.toml").n_trials == 20
    )  # no [tune]: the default (test_declared: with one)
    assert TuneConfig("m.toml", total_trials=5).n_trials is None  # a budget given: the matrix is not read here
