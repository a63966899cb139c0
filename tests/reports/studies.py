"""Study runs (kb.kind=study) as `kimi-bench tune` logs them, added to a test store: trials.csv from a real
Optuna study (a known objective, no training), importances.json, search_space.json, the summary tags and
metrics, and one tune-trial child run per trial with its tokens and FLOPs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from harness import schema
from harness.tune.spaces import search_space, space_attr

TOKENS_PER_TRIAL = 20_480.0
FLOPS_PER_TOKEN = {"gpt": 4.4e8, "kimi": 2.4e8}


def objective_for(best_lr: float):
    """val loss = 3 + (log10 lr - log10 best_lr)^2: the best trial is the one closest to best_lr."""
    def objective(trial: optuna.Trial) -> float:
        params = {d.name: d.suggest(trial) for d in trial.study.user_attrs["space"]}
        return 3.0 + (math.log10(params["lr"]) - math.log10(best_lr)) ** 2
    return objective


def add_study(uri: str, experiment_id: str, root: Path, arm: str, n_trials: int, best_lr: float = 1e-3,
              n_fail: int = 0, seed: int = 99, start: int = 1_750_010_000_000) -> str:
    """One study run for `arm` with n_trials COMPLETE trials (+ n_fail FAIL ones); -> the study run id."""
    variant, optimizer = arm.split("+")
    space = search_space(variant, optimizer)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("space", space)
    study.optimize(objective_for(best_lr), n_trials=n_trials)
    for _ in range(n_fail):
        t = study.ask()
        for d in space:
            d.suggest(t)
        study.tell(t, state=optuna.trial.TrialState.FAIL)
    client = MlflowClient(uri)
    best = study.best_trial
    counts = {"complete": n_trials, "pruned": 0, "fail": n_fail, "diverged": 0}
    tags = {schema.KIND: schema.KIND_STUDY, schema.TAG_ARM: arm, schema.TAG_VARIANT: variant,
            schema.TAG_OPTIMIZER: optimizer, schema.TAG_STUDY: f"exp/{arm}", schema.TAG_SEED: str(seed),
            schema.TAG_SEARCH_SPACE: json.dumps(space_attr(space)), schema.TAG_STATUS: schema.FINISHED,
            schema.TAG_N_TRIALS: str(n_trials + n_fail), schema.TAG_BEST_VALUE: f"{best.value:.6g}",
            schema.TAG_BEST_TRIAL: str(best.number), schema.TAG_BEST_PARAMS: json.dumps(best.params)}
    run = client.create_run(experiment_id, start_time=start, tags=tags, run_name=f"study exp/{arm}")
    rid = run.info.run_id
    client.log_batch(rid, metrics=[Metric(schema.study_count(k), float(v), start, 0) for k, v in counts.items()])
    folder = root / f"study-{rid}"
    folder.mkdir(parents=True)
    study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
    (folder / "importances.json").write_text(json.dumps({"importances": {"lr": 0.9, "weight_decay": 0.1}}))
    (folder / "search_space.json").write_text(json.dumps(space_attr(space)))
    for name in ("trials.csv", "importances.json", "search_space.json"):
        client.log_artifact(rid, str(folder / name))
    for t in study.trials:
        child = client.create_run(experiment_id, start_time=start + 1 + t.number, tags={
            schema.KIND: schema.KIND_TUNE_TRIAL, "mlflow.parentRunId": rid, schema.TAG_ARM: arm,
            schema.TAG_STUDY: f"exp/{arm}", schema.TAG_OPTUNA_TRIAL: str(t.number),
            schema.TAG_OPTUNA_STATE: t.state.name})
        done = t.state == optuna.trial.TrialState.COMPLETE
        tokens = TOKENS_PER_TRIAL if done else TOKENS_PER_TRIAL / 4
        client.log_batch(child.info.run_id, metrics=[
            Metric(schema.TRAIN_TOKENS, tokens, start, 10),
            Metric(schema.FLOPS_PER_TOKEN, FLOPS_PER_TOKEN[variant], start, 10)],
            tags=[RunTag(schema.TAG_STATUS, schema.FINISHED if done else schema.FAILED)])
        client.set_terminated(child.info.run_id, "FINISHED" if done else "FAILED")
    client.set_terminated(rid, "FINISHED")
    return rid
