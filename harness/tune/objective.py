"""The objective: one Optuna trial = one harness trial (run_trial), logged as a tune-trial child of the study run.

The objective is the trial's `val/loss_final` (minimized). A diverged trial (non-finite training loss) is
COMPLETE with value +inf, not FAIL: it spent its share of the budget, so it counts toward the trial totals,
and TPE sees its parameters as bad (TPE ignores FAIL trials and would keep sampling the diverging region).
Trials that crash or run out of memory are FAIL. The tune-trial specs carry the study name as `experiment`,
so their trial keys never collide with the matrix's trials.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import optuna

from harness import schema
from harness.tune.progress import OnEvent, TuneEvent
from harness.tune.spaces import apply_params
from harness.tune.storage import JournalHeartbeat, StudyStorage
from harness.tune.study import OBJECTIVE, RUN_ATTR, ArmStudy, StudyRuns, TrialFailed


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


class Objective:
    """Trains one trial of `arm` with the sampled params; returns its value or raises Optuna's outcome."""

    def __init__(
        self,
        arm: ArmStudy,
        st: StudyStorage,
        runs: StudyRuns,
        data,
        out: Path,
        on_event: OnEvent,
        keep_checkpoints: bool,
        worker_id: int = 0,
    ):
        self.arm, self.st, self.runs, self.data, self.out = arm, st, runs, data, out
        self.on_event, self.keep, self.worker_id = on_event, keep_checkpoints, worker_id
        self.number: int | None = None

    def _event(self, kind: str, **fields: Any) -> None:
        self.on_event(TuneEvent(kind, self.worker_id, self.arm.arm, self.number, **fields))

    def __call__(self, trial: optuna.Trial) -> float:
        from harness.trial.loop import Pruned, run_trial
        from harness.trial.runs import trial_tags

        self.number = trial.number
        arm = self.arm
        params = {d.name: d.suggest(trial) for d in arm.space}
        spec = apply_params(arm.base, arm.matrix, params, experiment=arm.name)
        key = spec.key(self.data.data_hash)
        tags = {
            **self.runs.common_tags,
            **trial_tags(spec, key),
            schema.TAG_EXPERIMENT: arm.base.experiment,
            schema.TAG_STUDY: arm.name,
            schema.TAG_OPTUNA_TRIAL: str(trial.number),
            schema.TAG_OPTUNA_STORAGE: self.st.display,
        }
        run_params = {
            **spec.flat_params(),
            **{f"tune.{k}": v for k, v in params.items()},
            "tune.study": arm.name,
            "tune.trial": trial.number,
        }
        run = self.runs.tracker.start_trial(
            self.runs.experiment_id,
            arm.run_id,
            f"{arm.arm} t{trial.number}",
            tags,
            run_params,
            system_metrics=self.runs.system_metrics,
            kind=schema.KIND_TUNE_TRIAL,
        )
        trial.set_user_attr(RUN_ATTR, run.run_id)
        trial.set_user_attr("trial_key", key)
        run.log_dataset(self.data.corpus_name, self.data.data_hash, str(self.data.path))
        total = spec.train.total_steps(spec.dims.block_size)
        self._event("trial_start", total=total)

        def on_progress(step: int, total_: int | None, info: dict) -> None:
            self._event("step", step=step, total=total, info={"loss": info["loss"]})

        def on_eval(step: int, metrics: dict) -> None:
            value = metrics.get(schema.VAL_LOSS)
            if step <= 0 or value is None or not math.isfinite(value):
                return  # step 0 is the untrained model: the same for every trial
            trial.report(value, step)
            if (total is None or step < total) and trial.should_prune():
                raise Pruned(f"pruned at step {step} (val loss {value:.4f})")

        out_dir = self.out / arm.name / f"trial{trial.number:04d}-{key}"
        try:
            with JournalHeartbeat(self.st, trial._trial_id):
                result = run_trial(spec, self.data, out_dir, run, progress=on_progress, on_eval=on_eval, resume=False)
        except BaseException:  # run_trial only raises KeyboardInterrupt (run ended killed) or on a bug here
            with contextlib.suppress(Exception):
                run.end(schema.KILLED)
            raise
        if not self.keep:
            for name in ("model.pt", "trial_state.pt"):
                with contextlib.suppress(OSError):
                    (out_dir / name).unlink()
        trial.set_user_attr("kb_status", result.status)
        value = result.metrics.get(OBJECTIVE)
        shown = format_params(params)
        if result.status == schema.FINISHED and value is not None:
            value = float(value) if math.isfinite(value) else math.inf
            self._done(run.run_id, "COMPLETE", value, f"{OBJECTIVE} {value:.4f}", shown)
            return value
        if result.status == schema.DIVERGED:
            self._done(run.run_id, "COMPLETE", math.inf, f"diverged ({result.error}): value inf", shown)
            return math.inf
        if result.status == schema.PRUNED:
            self._done(run.run_id, "PRUNED", None, result.error or "pruned", shown)
            raise optuna.TrialPruned(result.error)
        self._done(run.run_id, "FAIL", None, f"{result.status}: {result.error}", shown)
        raise TrialFailed(f"{result.status}: {result.error}")

    def _done(self, run_id: str, state: str, value: float | None, what: str, shown: str) -> None:
        tags = {schema.TAG_OPTUNA_STATE: state}
        if value is not None:
            tags[schema.TAG_OPTUNA_VALUE] = f"{value:.6g}"
        with contextlib.suppress(Exception):
            for k, v in tags.items():
                self.runs.tracker.client.set_tag(run_id, k, v)
        self._event("trial_end", text=what, info={"state": state, "params": shown})
