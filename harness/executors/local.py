"""The local executor: every trial of a matrix in turn, in this process (or this torchrun group).

Re-running the same matrix skips trials whose key already has a terminal run (finished, diverged, oom) and
resumes interrupted or failed ones into the same MLflow run, from their last checkpoint when one exists.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from harness import schema
from harness.console import MatrixProgress
from harness.data import PreparedData
from harness.executors.matrix_run import (
    MatrixOutcome,
    StoreLost,
    print_interrupted,
    skipped_line,
    start_matrix_run,
    trial_line,
)
from harness.schema import MLFLOW_RUN_STATUS, TERMINAL
from harness.spec.matrix import Matrix
from harness.spec.registry import TrialSpec
from harness.stores.runrecord import open_tracker
from harness.stores.tracking import Tracker, TrackingLost
from harness.trial.dist import DistInfo, barrier, broadcast_object
from harness.trial.loop import STATE_FILE, TrialResult, run_trial
from harness.trial.runs import run_tags, start_trial_run, trial_dir_name
from harness.trial.step import resolve_device


def run_matrix_local(
    matrix: Matrix,
    trials: list[TrialSpec],
    data: PreparedData,
    tracking_uri: str | None,
    out_root: Path,
    console: Console,
    dist_info: DistInfo,
    peak_tflops: float | None,
    keep_state: bool,
) -> MatrixOutcome:
    """Run every trial; Ctrl-C marks the current run killed and stops with a resume hint."""
    tracker = open_tracker(tracking_uri) if dist_info.is_main else None  # record:DIR -> harness.stores.runrecord
    description = matrix.spec.description
    experiment_id = tracker.ensure_experiment(matrix.name, description) if tracker else ""
    device = resolve_device(trials[0].train.device) if trials else torch.device("cpu")
    common_tags = run_tags(data, device)
    parent = start_matrix_run(tracker, experiment_id, matrix, trials, data, common_tags) if tracker else None
    outcome = MatrixOutcome(experiment_id, parent, [])
    steps = [t.train.total_steps(t.dims.block_size, dist_info.world_size) or 1 for t in trials]
    progress = MatrixProgress(console, len(trials), sum(steps), enabled=dist_info.is_main)
    lost = False
    try:
        with progress:
            for i, spec in enumerate(trials, 1):
                result = _run_one(
                    spec,
                    i,
                    len(trials),
                    data,
                    tracker,
                    experiment_id,
                    parent,
                    common_tags,
                    out_root,
                    console,
                    dist_info,
                    peak_tflops,
                    progress,
                    keep_state,
                )
                outcome.results.append((spec, result))
        # After the trials, every distinct model shape of this invocation (skipped trials too) is benchmarked
        # under control in this process and logged as children of `parent` (harness/measure/speed_runs.py).
        if tracker and parent:
            from harness.measure.speed_runs import measure_matrix_speed

            measure_matrix_speed(trials, data, device, tracker, experiment_id, parent, common_tags, console)
    except KeyboardInterrupt:
        outcome.interrupted = True
        done = len(outcome.results)
        stopped = (
            f"trial {trials[done].name} stopped and marked killed (its last checkpoint is kept)"
            if done < len(trials)
            else "the speed measurement stopped"
        )
        print_interrupted(console, f"{stopped}; {done} trial(s) before it are kept")
    except StoreLost:  # the store went away mid-trial: it cannot take the parent's end status either
        lost = True
        raise
    finally:
        if tracker and parent and not lost:
            tracker.end_parent(parent, schema.KILLED if outcome.interrupted else schema.FINISHED)
    return outcome


def _run_one(
    spec: TrialSpec,
    i: int,
    n: int,
    data: PreparedData,
    tracker: Tracker | None,
    experiment_id: str,
    parent: str | None,
    common_tags: dict,
    out_root: Path,
    console: Console,
    dist_info: DistInfo,
    peak_tflops: float | None,
    progress: MatrixProgress,
    keep_state: bool,
) -> TrialResult | None:
    key = spec.key(data.data_hash)
    total = spec.train.total_steps(spec.dims.block_size, dist_info.world_size)
    existing = tracker.find_trial(experiment_id, key) if tracker else None
    skip = broadcast_object(existing is not None and existing.data.tags.get(schema.TAG_STATUS) in TERMINAL)
    if skip:
        status = existing.data.tags[schema.TAG_STATUS] if existing else ""
        if existing is not None and existing.info.status == "RUNNING":
            # killed between its kb.status tag and its MLflow end status (TrialRun.end): finish the bookkeeping
            tracker.client.set_terminated(existing.info.run_id, MLFLOW_RUN_STATUS.get(status, "FINISHED"))
        if existing is not None and parent:
            tracker.join_matrix(existing.info.run_id, parent)  # listed in this invocation's MLflow view
        console.print(
            skipped_line(
                i,
                n,
                spec.name,
                existing.data.tags[schema.TAG_STATUS] if existing else "done",
                existing.info.run_id if existing else "?",
            )
        )
        progress.skip(total or 1)
        return None
    run = None
    if tracker:
        run = start_trial_run(tracker, experiment_id, parent, spec, key, common_tags, existing)
        run.log_dataset(data.corpus_name, data.data_hash, str(data.path))
    barrier()
    label = f"[{i}/{n}] {spec.name}"
    progress.start_trial(label, total)

    def on_progress(step: int, total: int | None, info: dict) -> None:
        progress.update_trial(label, step, total, f"loss {info['loss']:.3f}  {info['tok/s']:,.0f} tok/s")

    out_dir = out_root / spec.experiment / trial_dir_name(spec, key)
    result = run_trial(spec, data, out_dir, run, dist_info, on_progress, peak_tflops=peak_tflops)
    progress.end_trial(total or 1)
    if result.error and TrackingLost.PREFIX in result.error:  # every later call would fail the same way
        raise StoreLost(
            f"{spec.name}: {result.error} at step {result.step}; the trial stopped and its last "
            "checkpoint is kept; run the same command again once the store answers (it resumes there)"
        )
    if result.status in TERMINAL and not keep_state and dist_info.is_main:
        # a rerun never resumes an ended trial: its optimizer state (GBs at paper scale) is dead weight
        (out_dir / STATE_FILE).unlink(missing_ok=True)
    if not dist_info.is_main:
        return result
    console.print(trial_line(spec.name, result))
    return result
