"""One arm's study: its Optuna study (opened with the matrix's attrs), counts and best trial, and its MLflow
study run (the best value/params, trials.csv and importances.json at the end).

MLflow: per study a run `study <name>` (kb.kind=study, in the matrix's experiment; its id is kept in the
study's user attrs so every worker nests under the same run) and per Optuna trial a child run
(kb.kind=tune-trial) trained and logged by `harness.trial.loop.run_trial`, like a matrix trial.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from harness import schema
from harness.errors import UserError
from harness.spec.matrix import Matrix
from harness.spec.registry import TrialSpec
from harness.stores.tracking import Tracker, strip_credentials
from harness.tune.sampler import make_sampler, sampler_description
from harness.tune.spaces import Dim, space_attr
from harness.tune.storage import StudyStorage

OBJECTIVE = schema.VAL_LOSS_FINAL
RUN_ATTR = "mlflow_run_id"  # trial user attr: its MLflow run


class TrialFailed(Exception):
    """A trial that crashed or ran out of memory: Optuna records it FAIL."""


@dataclass
class ArmStudy:
    arm: str
    name: str
    base: TrialSpec
    study: optuna.Study
    space: tuple[Dim, ...]
    matrix: Matrix
    run_id: str | None = None  # the MLflow study run
    added: int = 0  # trials this worker added
    consecutive_fail: int = 0
    done: bool = False

    def counts(self) -> dict[str, int]:
        out = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "diverged": 0}
        for t in self.study.get_trials(deepcopy=False):
            out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
            if t.state == TrialState.COMPLETE and not math.isfinite(t.value):
                out["diverged"] += 1
        return out

    def best(self) -> optuna.trial.FrozenTrial | None:
        finite = [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)
        ]
        return min(finite, key=lambda t: (t.value, t.number)) if finite else None


def open_study(
    st: StudyStorage,
    name: str,
    base: TrialSpec,
    space: tuple[Dim, ...],
    pruner_obj,
    pruner_desc: str,
    seed: int,
    target: int,
    matrix: Matrix,
    note: Callable[[str], None],
) -> optuna.Study:
    """Create or join the study; refuse one made with another search space, seed or preset."""
    study = optuna.create_study(
        study_name=name,
        storage=st.storage,
        direction="minimize",
        sampler=make_sampler(seed, target),
        pruner=pruner_obj,
        load_if_exists=True,
    )
    attrs = study.user_attrs
    wanted = {
        schema.TAG_MATRIX: matrix.name,
        schema.TAG_ARM: base.arm,
        schema.TAG_PRESET: base.preset,
        schema.TAG_SEED: base.seed,
        schema.TAG_OBJECTIVE: f"{OBJECTIVE} at the budget, minimized; diverged trials = +inf",
        schema.TAG_SEARCH_SPACE: space_attr(space),
        schema.TAG_SAMPLER: sampler_description(seed, target),
        schema.TAG_PRUNER: pruner_desc,
    }
    if schema.TAG_SEARCH_SPACE in attrs and attrs[schema.TAG_SEARCH_SPACE] != wanted[schema.TAG_SEARCH_SPACE]:
        raise UserError(
            f"--study-prefix: study {name} in {st.display} was created with another search "
            "space; use a new --study-prefix (or storage) to tune with this one"
        )
    if schema.TAG_SEED in attrs and (attrs[schema.TAG_SEED], attrs.get(schema.TAG_PRESET)) != (base.seed, base.preset):
        raise UserError(
            f"--seed: study {name} tunes seed {attrs[schema.TAG_SEED]} at preset "
            f"{attrs.get(schema.TAG_PRESET)}; use the same --seed or a new --study-prefix"
        )
    if attrs.get(schema.TAG_PRUNER, pruner_desc) != pruner_desc:
        note(f"study {name} was started with pruner {attrs[schema.TAG_PRUNER]}; this worker prunes with {pruner_desc}")
    for key, value in wanted.items():
        if key not in attrs:
            study.set_user_attr(key, value)
    return study


# -----------------------------------------------------------------------------------------------------------
# MLflow


class StudyRuns:
    """The study runs and tune-trial runs of one tune invocation."""

    def __init__(
        self, tracker: Tracker, experiment_id: str, common_tags: dict[str, str], st: StudyStorage, system_metrics: bool
    ):
        self.tracker, self.experiment_id, self.common_tags = tracker, experiment_id, common_tags
        self.st, self.system_metrics = st, system_metrics
        self.attr_key = f"mlflow_study_run:{strip_credentials(tracker.uri)}"  # one run per tracking store

    def study_run(self, arm: ArmStudy, command: str, extra: dict[str, str]) -> str:
        """The study's MLflow run: the one a worker already made (study user attr) or a new one."""
        client = self.tracker.client
        run_id = arm.study.user_attrs.get(self.attr_key)
        if run_id:
            with contextlib.suppress(Exception):
                run = client.get_run(run_id)
                if run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id:
                    client.update_run(run_id, status="RUNNING")
                    return run_id
        b = arm.base
        tags = {
            **self.common_tags,
            schema.KIND: schema.KIND_STUDY,
            schema.TAG_STUDY: arm.name,
            schema.TAG_ARM: arm.arm,
            schema.TAG_VARIANT: b.variant,
            schema.TAG_OPTIMIZER: b.optimizer,
            schema.TAG_PRESET: b.preset,
            schema.TAG_SEED: str(b.seed),
            schema.TAG_EXPERIMENT: b.experiment,
            schema.TAG_OPTUNA_STORAGE: self.st.display,
            schema.TAG_COMMAND: command,
            schema.TAG_OBJECTIVE: OBJECTIVE,
            **extra,
        }
        run_id = client.create_run(self.experiment_id, run_name=f"study {arm.name}", tags=tags).info.run_id
        arm.study.set_user_attr(self.attr_key, run_id)
        # Two workers creating the run at once: the last write wins; the other drops its own run.
        stored = optuna.load_study(study_name=arm.name, storage=self.st.storage).user_attrs.get(self.attr_key)
        if stored and stored != run_id:
            client.delete_run(run_id)
            return stored
        return run_id

    def mark_killed(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Stale-trial callback: the dead worker's run is killed, not running forever."""
        run_id = trial.user_attrs.get(RUN_ATTR)
        if not run_id:
            return
        client = self.tracker.client
        run = client.get_run(run_id)
        if run.data.tags.get(schema.TAG_STATUS) == schema.RUNNING:
            client.set_tag(run_id, schema.TAG_STATUS, schema.KILLED)
            client.set_tag(run_id, schema.TAG_ERROR, "worker stopped beating; failed as stale by another worker")
            client.set_terminated(run_id, "KILLED")

    def summarize(self, arm: ArmStudy, status: str) -> None:
        """Best value/params as tags and metrics, trials.csv and importances.json on the study run."""
        if arm.run_id is None:
            return
        from mlflow.entities import Metric, RunTag

        client = self.tracker.client
        counts = arm.counts()
        n_done = counts["complete"] + counts["pruned"]
        ts = int(time.time() * 1000)
        metrics = [Metric(schema.study_count(k), float(v), ts, n_done) for k, v in counts.items() if k != "running"]
        n_trials = len(arm.study.get_trials(deepcopy=False))
        tags = [RunTag(schema.TAG_STATUS, status), RunTag(schema.TAG_N_TRIALS, str(n_trials))]
        best = arm.best()
        if best is not None:
            metrics.append(Metric(schema.STUDY_BEST_VALUE, float(best.value), ts, n_done))
            tags += [
                RunTag(schema.TAG_BEST_VALUE, f"{best.value:.6g}"),
                RunTag(schema.TAG_BEST_TRIAL, str(best.number)),
                RunTag(schema.TAG_BEST_PARAMS, json.dumps(best.params, sort_keys=True)),
                RunTag(schema.TAG_BEST_RUN_ID, str(best.user_attrs.get(RUN_ATTR, ""))),
            ]
        client.log_batch(arm.run_id, metrics=metrics, tags=tags)
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "trials.csv"
            arm.study.trials_dataframe().to_csv(csv, index=False)
            imp = Path(tmp) / "importances.json"
            imp.write_text(json.dumps(param_importances(arm.study), indent=2, sort_keys=True))
            space = Path(tmp) / "search_space.json"
            space.write_text(json.dumps(space_attr(arm.space), indent=2))
            for path in (csv, imp, space):
                client.log_artifact(arm.run_id, str(path))
        client.set_terminated(arm.run_id, {schema.FINISHED: "FINISHED", schema.KILLED: "KILLED"}.get(status, "FAILED"))


def param_importances(study: optuna.Study) -> dict[str, Any]:
    """fANOVA importances over COMPLETE trials with a finite value; needs 2 or more."""
    finite = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
    ]
    if len(finite) < 2:
        return {
            "importances": None,
            "n_trials": len(finite),
            "reason": f"{len(finite)} complete trial(s) with a finite value; importances need 2",
        }
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except Exception as e:  # e.g. every trial at the same point: nothing to attribute
        return {"importances": None, "n_trials": len(finite), "reason": f"{type(e).__name__}: {e}"[:300]}
    return {
        "importances": {k: float(v) for k, v in values.items()},
        "n_trials": len(finite),
        "evaluator": "fanova(seed=0)",
        "objective": OBJECTIVE,
    }
