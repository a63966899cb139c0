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


def centre(d) -> float:
    return math.sqrt(d.low * d.high)


def objective_for(space, best: dict[str, float]):
    """val loss = 3 + sum over the lr dims of (log10 value - log10 target)^2, target = best[dim] or the range's
    geometric centre: the trial enqueued at the targets is the best one."""
    lrs = [d for d in space if d.log and d.name.endswith("lr")]

    def objective(trial: optuna.Trial) -> float:
        params = {d.name: d.suggest(trial) for d in space}
        return 3.0 + sum((math.log10(params[d.name]) - math.log10(best.get(d.name, centre(d)))) ** 2 for d in lrs)

    return objective


def tuned_from(arm: str, number: int = 0) -> str:
    """The kb.tuned_from tag of a trial trained at the best of add_study's study for `arm`."""
    return f"optuna:sqlite:///optuna.db#exp/{arm}/trial{number} value=3"


def add_study(
    uri: str,
    experiment_id: str,
    root: Path,
    arm: str,
    n_trials: int,
    best: dict | None = None,
    n_fail: int = 0,
    seed: int = 99,
    start: int = 1_750_010_000_000,
) -> str:
    """One study run for `arm` with n_trials COMPLETE trials (+ n_fail FAIL ones), the first enqueued at the
    best lr values (`best`, else each lr range's centre); -> the study run id."""
    variant, optimizer = arm.split("+")
    space = search_space(variant, optimizer)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    best = best or {}
    lrs = [d for d in space if d.log and d.name.endswith("lr")]
    study.enqueue_trial({d.name: best.get(d.name, centre(d)) for d in lrs})
    study.optimize(objective_for(space, best), n_trials=n_trials)
    for _ in range(n_fail):
        t = study.ask()
        for d in space:
            d.suggest(t)
        study.tell(t, state=optuna.trial.TrialState.FAIL)
    client = MlflowClient(uri)
    best = study.best_trial
    counts = {"complete": n_trials, "pruned": 0, "fail": n_fail, "diverged": 0}
    tags = {
        schema.KIND: schema.KIND_STUDY,
        schema.TAG_ARM: arm,
        schema.TAG_VARIANT: variant,
        schema.TAG_OPTIMIZER: optimizer,
        schema.TAG_STUDY: f"exp/{arm}",
        schema.TAG_SEED: str(seed),
        schema.TAG_SEARCH_SPACE: json.dumps(space_attr(space)),
        schema.TAG_STATUS: schema.FINISHED,
        schema.TAG_N_TRIALS: str(n_trials + n_fail),
        schema.TAG_BEST_VALUE: f"{best.value:.6g}",
        schema.TAG_BEST_TRIAL: str(best.number),
        schema.TAG_BEST_PARAMS: json.dumps(best.params),
    }
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
        child = client.create_run(
            experiment_id,
            start_time=start + 1 + t.number,
            tags={
                schema.KIND: schema.KIND_TUNE_TRIAL,
                "mlflow.parentRunId": rid,
                schema.TAG_ARM: arm,
                schema.TAG_STUDY: f"exp/{arm}",
                schema.TAG_OPTUNA_TRIAL: str(t.number),
                schema.TAG_OPTUNA_STATE: t.state.name,
            },
        )
        done = t.state == optuna.trial.TrialState.COMPLETE
        tokens = TOKENS_PER_TRIAL if done else TOKENS_PER_TRIAL / 4
        client.log_batch(
            child.info.run_id,
            metrics=[
                Metric(schema.TRAIN_TOKENS, tokens, start, 10),
                Metric(schema.FLOPS_PER_TOKEN, FLOPS_PER_TOKEN[variant], start, 10),
            ],
            tags=[RunTag(schema.TAG_STATUS, schema.FINISHED if done else schema.FAILED)],
        )
        client.set_terminated(child.info.run_id, "FINISHED" if done else "FAILED")
    client.set_terminated(rid, "FINISHED")
    return rid


def retag(st, tuned: set[str]) -> None:
    """Give the store's trials of the `tuned` arms a kb.tuned_from of add_study's study; drop it elsewhere."""
    client = MlflowClient(st.uri)
    for key, rid in st.runs.items():
        if key[0] == "speed":
            continue
        if key[0] in tuned:
            client.set_tag(rid, schema.TAG_TUNED_FROM, tuned_from(key[0]))
        elif schema.TAG_TUNED_FROM in client.get_run(rid).data.tags:
            client.delete_tag(rid, schema.TAG_TUNED_FROM)
