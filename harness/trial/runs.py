"""A trial's MLflow run, as every executor and the tuner open it: the run tags, the trial tags, the trial
folder's name, and starting the child run or resuming a killed one so that it logs only later steps."""

from __future__ import annotations

import torch

from harness import schema
from harness.data import PreparedData
from harness.schema import TERMINAL
from harness.spec.registry import TrialSpec
from harness.stores.tracking import git_commit, source_tags


def run_tags(data: PreparedData, device: torch.device) -> dict[str, str]:
    commit = git_commit()
    return {
        schema.TAG_GIT: commit,
        schema.TAG_TORCH: torch.__version__,
        schema.TAG_DEVICE: torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        schema.TAG_DATA_HASH: data.data_hash,
        **source_tags(commit),
    }


def trial_dir_name(spec: TrialSpec, key: str) -> str:
    """`<variant>+<optimizer>-<preset>-s<seed>-<short key>`: readable, and unique through the key (a resume
    finds the same folder). Folders of the older hash-only scheme are not looked at."""
    data_seed = f"-d{spec.data_seed}" if spec.data_seed is not None else ""
    return f"{spec.arm}-{spec.preset}-s{spec.seed}{data_seed}-{key[:8]}"


def trial_tags(spec: TrialSpec, key: str) -> dict[str, str]:
    tags = {
        schema.TAG_TRIAL_KEY: key,
        schema.TAG_ARM: spec.arm,
        schema.TAG_VARIANT: spec.variant,
        schema.TAG_OPTIMIZER: spec.optimizer,
        schema.TAG_PRESET: spec.preset,
        schema.TAG_SEED: str(spec.seed),
        schema.TAG_EXPERIMENT: spec.experiment,
    }
    if spec.tuned_from:
        tags[schema.TAG_TUNED_FROM] = spec.tuned_from
    return tags


def last_logged_step(tracker, run_id: str) -> int:
    """The last step a killed run logged, a train step or an eval (the step-0 eval comes before any
    train/loss): the resumed trial logs only later steps."""
    history = tracker.client.get_metric_history
    steps = [m.step for key in (schema.TRAIN_LOSS, schema.VAL_LOSS) for m in history(run_id, key)]
    return max(steps, default=-1)


def is_ended(existing) -> bool:
    """A found run whose kb.status is terminal (finished, diverged, oom, pruned): a rerun skips it."""
    return existing is not None and existing.data.tags.get(schema.TAG_STATUS) in TERMINAL


def start_trial_run(
    tracker,
    experiment_id: str,
    parent_id: str | None,
    spec: TrialSpec,
    key: str,
    common_tags: dict[str, str],
    existing=None,
):
    """The trial's child run: `existing` (a run that did not end) resumed, logging only steps after its last
    logged one, or a new run."""
    resume_id = existing.info.run_id if existing is not None else None
    run = tracker.start_trial(
        experiment_id,
        parent_id,
        spec.name,
        {**common_tags, **trial_tags(spec, key)},
        spec.flat_params(),
        resume_run_id=resume_id,
    )
    if resume_id:
        run.min_step = last_logged_step(tracker, resume_id)
    return run


def open_trial_run(
    tracker, experiment_id: str, parent_id: str | None, spec: TrialSpec, key: str, common_tags: dict[str, str]
):
    """The run a lost attempt (or an earlier driver) left, resumed, or a new one; None: the trial already ended."""
    existing = tracker.find_trial(experiment_id, key)
    if is_ended(existing):
        return None
    return start_trial_run(tracker, experiment_id, parent_id, spec, key, common_tags, existing)
