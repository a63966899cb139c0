"""Run a matrix: prepare data once, size the arms, then each trial in turn with MLflow tracking.

Re-running the same matrix skips trials whose key already has a terminal run (finished, diverged, oom) and
resumes interrupted or failed ones into the same MLflow run, from their last checkpoint when one exists.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness import schema
from harness.console import MatrixProgress, mlflow_logs_to
from harness.data import DataConfig, PreparedData, prepare
from harness.dist import DistInfo, barrier, broadcast_object
from harness.errors import UserError
from harness.matrix import Matrix
from harness.record import open_tracker
from harness.registry import TrialSpec
from harness.schema import MLFLOW_RUN_STATUS, TERMINAL
from harness.tracking import Tracker, TrackingLost, git_commit, source_tags, strip_credentials
from harness.trial import STATE_FILE, TrialResult, resolve_device, run_trial


class StoreLost(UserError):
    """The tracking store stopped answering mid-trial (harness.tracking.TrackingLost): the matrix stops."""


@dataclass
class MatrixOutcome:
    experiment_id: str
    parent_run_id: str | None
    results: list[tuple[TrialSpec, TrialResult | None]]  # None: skipped (already finished)
    interrupted: bool = False


def prepare_data(fields: dict, cache_dir: str | None, console: Console) -> PreparedData:
    cfg = DataConfig(**fields, **({"cache_dir": Path(cache_dir)} if cache_dir else {}))
    with Progress(TextColumn("[bold]data[/]"), TextColumn("{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("preparing", total=None)

        def on_progress(description: str, completed: int, total: int | None) -> None:
            bar.update(task, description=description, completed=completed, total=total)

        return prepare(cfg, progress=on_progress)


def run_tags(data: PreparedData, device: torch.device) -> dict[str, str]:
    commit = git_commit()
    return {schema.TAG_GIT: commit, schema.TAG_TORCH: torch.__version__,
            schema.TAG_DEVICE: torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            schema.TAG_DATA_HASH: data.data_hash, **source_tags(commit)}


def trial_dir_name(spec: TrialSpec, key: str) -> str:
    """`<variant>+<optimizer>-<preset>-s<seed>-<short key>`: readable, and unique through the key (a resume
    finds the same folder). Folders of the older hash-only scheme are not looked at."""
    data_seed = f"-d{spec.data_seed}" if spec.data_seed is not None else ""
    return f"{spec.arm}-{spec.preset}-s{spec.seed}{data_seed}-{key[:8]}"


def trial_list(trials: list[TrialSpec], data_hash: str) -> list[dict]:
    """The resolved trials as logged on the parent run (trials.json): name, key, folder, full spec."""
    return [{"name": t.name, "trial_key": t.key(data_hash), "folder": trial_dir_name(t, t.key(data_hash)),
             "params": t.flat_params()} for t in trials]


def matrix_params(matrix: Matrix) -> dict:
    """The matrix file's settings, flattened (`train.steps`, `matrix.seeds`, ...), as the parent run's params."""
    out = {"name": matrix.name}
    for section, value in matrix.spec.model_dump(exclude={"name", "description"}).items():
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        elif value is not None:
            out[section] = value
    return out


def trial_tags(spec: TrialSpec, key: str) -> dict[str, str]:
    tags = {schema.TAG_TRIAL_KEY: key, schema.TAG_ARM: spec.arm, schema.TAG_VARIANT: spec.variant,
            schema.TAG_OPTIMIZER: spec.optimizer, schema.TAG_PRESET: spec.preset, schema.TAG_SEED: str(spec.seed),
            schema.TAG_EXPERIMENT: spec.experiment}
    if spec.tuned_from:
        tags[schema.TAG_TUNED_FROM] = spec.tuned_from
    return tags


def last_logged_step(tracker: Tracker, run_id: str) -> int:
    """The last step a killed run logged, a train step or an eval (the step-0 eval comes before any
    train/loss): the resumed trial logs only later steps."""
    history = tracker.client.get_metric_history
    steps = [m.step for key in (schema.TRAIN_LOSS, schema.VAL_LOSS) for m in history(run_id, key)]
    return max(steps, default=-1)


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["kimi-bench", *sys.argv[1:]])


def run_matrix(matrix: Matrix, trials: list[TrialSpec], data: PreparedData, tracking_uri: str | None,
               out_root: Path, console: Console, dist_info: DistInfo = DistInfo(),
               peak_tflops: float | None = None, keep_state: bool = False, executor: str = "local",
               ray_options=None, cache_dir: str | None = None) -> MatrixOutcome:
    """Run every trial; Ctrl-C marks the current run killed and stops with a resume hint. MLflow's own log
    lines go to <out>/<experiment>/mlflow.log while the bars draw. `executor="ray"` runs every trial as a Ray
    task instead (harness/executors/ray.py), with the same trial code and MLflow layout."""
    if executor == "ray":
        from harness.executors.ray import RayOptions, run_matrix_ray

        with mlflow_logs_to(out_root / matrix.name / "mlflow.log"):
            return run_matrix_ray(matrix, trials, data, tracking_uri, out_root, console,
                                  ray_options or RayOptions(), peak_tflops, cache_dir)
    with mlflow_logs_to(out_root / matrix.name / "mlflow.log"):
        return _run_matrix(matrix, trials, data, tracking_uri, out_root, console, dist_info, peak_tflops,
                           keep_state)


def _run_matrix(matrix: Matrix, trials: list[TrialSpec], data: PreparedData, tracking_uri: str | None,
                out_root: Path, console: Console, dist_info: DistInfo, peak_tflops: float | None,
                keep_state: bool) -> MatrixOutcome:
    tracker = open_tracker(tracking_uri) if dist_info.is_main else None  # record:DIR -> harness.record
    description = matrix.spec.description
    experiment_id = tracker.ensure_experiment(matrix.name, description) if tracker else ""
    device = resolve_device(trials[0].train.device) if trials else torch.device("cpu")
    common_tags = run_tags(data, device)
    parent = None
    if tracker:
        parent = tracker.start_parent(experiment_id, matrix.name, strip_credentials(_command_line()), {
            **common_tags, schema.TAG_MATRIX_FILE: str(matrix.path), schema.TAG_N_TRIALS: str(len(trials))},
            description)
        tracker.log_matrix(parent, matrix.path.read_text(encoding="utf-8"), matrix_params(matrix),
                           trial_list(trials, data.data_hash))
    outcome = MatrixOutcome(experiment_id, parent, [])
    steps = [t.train.total_steps(t.dims.block_size, dist_info.world_size) or 1 for t in trials]
    progress = MatrixProgress(console, len(trials), sum(steps), enabled=dist_info.is_main)
    lost = False
    try:
        with progress:
            for i, spec in enumerate(trials, 1):
                result = _run_one(spec, i, len(trials), data, tracker, experiment_id, parent, common_tags,
                                  out_root, console, dist_info, peak_tflops, progress, keep_state)
                outcome.results.append((spec, result))
        # After the trials, every distinct model shape of this invocation (skipped trials too) is benchmarked
        # under control in this process and logged as children of `parent` (harness/measure.py).
        if tracker and parent:
            from harness.measure import measure_matrix_speed

            measure_matrix_speed(trials, data, device, tracker, experiment_id, parent, common_tags, console)
    except KeyboardInterrupt:
        from harness.signals import interrupt_name

        outcome.interrupted = True
        done = len(outcome.results)
        stopped = f"trial {trials[done].name} stopped and marked killed (its last checkpoint is kept)" \
            if done < len(trials) else "the speed measurement stopped"
        console.print(f"[yellow]interrupted ({interrupt_name()})[/]: {stopped}; {done} trial(s) before it are "
                      "kept. Resume with the same command:")
        console.print(strip_credentials(_command_line()), markup=False, highlight=False)
    except StoreLost:  # the store went away mid-trial: it cannot take the parent's end status either
        lost = True
        raise
    finally:
        if tracker and parent and not lost:
            tracker.end_parent(parent, schema.KILLED if outcome.interrupted else schema.FINISHED)
    return outcome


def _run_one(spec: TrialSpec, i: int, n: int, data: PreparedData, tracker: Tracker | None, experiment_id: str,
             parent: str | None, common_tags: dict, out_root: Path, console: Console, dist_info: DistInfo,
             peak_tflops: float | None, progress: MatrixProgress, keep_state: bool) -> TrialResult | None:
    key = spec.key(data.data_hash)
    total = spec.train.total_steps(spec.dims.block_size, dist_info.world_size)
    existing = tracker.find_trial(experiment_id, key) if tracker else None
    skip = broadcast_object(existing is not None and existing.data.tags.get(schema.TAG_STATUS) in TERMINAL)
    if skip:
        status = existing.data.tags[schema.TAG_STATUS] if existing else ""
        if existing is not None and existing.info.status == "RUNNING":
            # killed between its kb.status tag and its MLflow end status (TrialRun.end): finish the bookkeeping
            tracker.client.set_terminated(existing.info.run_id, MLFLOW_RUN_STATUS.get(status, "FINISHED"))
        console.print(f"[dim][{i}/{n}] {spec.name}: "
                      f"already {existing.data.tags[schema.TAG_STATUS] if existing else 'done'}"
                      f" (run {existing.info.run_id[:8] if existing else '?'}), skipped[/]")
        progress.skip(total or 1)
        return None
    run = None
    if tracker:
        resume_id = existing.info.run_id if existing is not None else None
        run = tracker.start_trial(experiment_id, parent, spec.name, {**common_tags, **trial_tags(spec, key)},
                                  spec.flat_params(), resume_run_id=resume_id)
        if resume_id:
            run.min_step = last_logged_step(tracker, resume_id)
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
        raise StoreLost(f"{spec.name}: {result.error} at step {result.step}; the trial stopped and its last "
                        "checkpoint is kept; run the same command again once the store answers (it resumes there)")
    if result.status in TERMINAL and not keep_state and dist_info.is_main:
        # a rerun never resumes an ended trial: its optimizer state (GBs at paper scale) is dead weight
        (out_dir / STATE_FILE).unlink(missing_ok=True)
    if not dist_info.is_main:
        return result
    style = {schema.FINISHED: "green", schema.DIVERGED: "red", schema.OOM: "red", schema.FAILED: "red"}.get(
        result.status, "yellow")
    ppl = result.metrics.get(schema.VAL_PPL_FINAL)
    detail = f"val ppl {ppl:.3f}" if ppl else (result.error or "")
    console.print(f"[{style}]{result.status}[/] {spec.name} at step {result.step}: {detail}")
    return result


def summary_table(outcome: MatrixOutcome) -> Table:
    table = Table(title="matrix summary", header_style="bold")
    # Speed and memory under control are in the speed table printed before this one; here tok/s is what
    # the trial observed while training (a shared host makes it noisy), memory the exact state bytes.
    for col in ("trial", "status", "step", "params total", "params active", "val ppl", "val bpb",
                "train tok/s (observed)", "param+grad+optim MB"):
        table.add_column(col, justify="left" if col in ("trial", "status") else "right")
    for spec, result in outcome.results:
        if result is None:
            table.add_row(spec.name, "skipped (done)", *[""] * 7)
            continue
        m = result.metrics

        def fmt(key: str, spec_: str = ",.0f", scale: float = 1.0, m=m) -> str:
            return format(m[key] / scale, spec_) if key in m else "-"

        table.add_row(spec.name, result.status, str(result.step), fmt(schema.PARAMS_TOTAL), fmt(schema.PARAMS_ACTIVE),
                      fmt(schema.VAL_PPL_FINAL, ".3f"), fmt(schema.VAL_BPB_FINAL, ".3f"),
                      fmt(schema.TRAIN_TOKENS_PER_S), _state_mb(m))
    return table


def _state_mb(m: dict) -> str:
    keys = (schema.MEM_PARAM, schema.MEM_GRAD, schema.MEM_OPTIM)
    return f"{sum(m[k] for k in keys) / 1e6:,.2f}" if all(k in m for k in keys) else "-"


def check_trials(trials: list[TrialSpec]) -> None:
    if not trials:
        raise UserError("matrix: expands to no trials; list at least one arm, preset and seed")
