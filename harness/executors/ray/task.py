"""One trial in a Ray task (every attempt): the same run_trial and MLflow layout as the local executor; a
trial of several processes runs DDP through Ray Train's TorchTrainer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import schema
from harness.executors.ray.cluster import resolve_secret, where
from harness.executors.ray.progress_board import BoardReporter, board_start
from harness.trial.runs import is_ended, open_trial_run

DDP_RESULT = "ddp_result.json"  # rank 0's TrialResult, in the trial folder


@dataclass
class TrialJob:
    """Everything a task needs, credential-free (Ray's dashboard and logs show task arguments)."""

    spec: Any  # TrialSpec
    index: int
    data_fields: dict
    cache_dir: str | None
    tracking_uri: str | None  # credential-free; the real one comes from the environment when it had any
    tracking_secret: bool
    experiment_id: str
    parent_run_id: str | None
    common_tags: dict[str, str]
    out_dir: str
    nproc: int = 1
    peak_tflops: float | None = None
    board: Any = None


def _prepare_quietly(fields: dict, cache_dir: str | None):
    from harness.data import DataConfig, prepare

    return prepare(DataConfig(**fields, **({"cache_dir": Path(cache_dir)} if cache_dir else {})))


def _open_run(job: TrialJob, tracker, key: str):
    """The trial's child run, as the local executor opens it (harness.trial.runs); None: it already ended."""
    return open_trial_run(tracker, job.experiment_id, job.parent_run_id, job.spec, key, job.common_tags)


def train_trial(job: TrialJob) -> dict:
    """The body of one trial's Ray task (every attempt): same code and MLflow layout as the local executor."""
    from harness.stores.tracking import Tracker
    from harness.trial.loop import run_trial

    data = _prepare_quietly(job.data_fields, job.cache_dir)
    key = job.spec.key(data.data_hash)
    node = where()
    attempt = board_start(job.board, key, {**node, "arm": job.spec.arm})
    tracker = Tracker(resolve_secret("tracking", job.tracking_uri, job.tracking_secret))
    if job.nproc > 1:  # rank 0 of the DDP workers opens (or resumes) the run and logs
        existing = tracker.find_trial(job.experiment_id, key)
        if is_ended(existing):
            return {"status": "skipped", "trial_key": key, "attempt": attempt, **node}
        result = _train_ddp(job, key)
    else:
        run = _open_run(job, tracker, key)
        if run is None:
            return {"status": "skipped", "trial_key": key, "attempt": attempt, **node}
        run.log_dataset(data.corpus_name, data.data_hash, str(data.path))
        progress = BoardReporter(job.board, key) if job.board else None
        result = run_trial(job.spec, data, Path(job.out_dir), run, progress=progress, peak_tflops=job.peak_tflops)
    return {
        "status": result.status,
        "trial_key": key,
        "step": result.step,
        "metrics": result.metrics,
        "run_id": result.run_id,
        "error": result.error,
        "out_dir": str(result.out_dir),
        "attempt": attempt,
        **node,
    }


def _ddp_worker_loop(config: dict) -> None:
    """A TorchTrainer worker: Ray Train has set up the process group; rank 0 reopens the run and logs."""
    import ray.train

    from harness.stores.tracking import Tracker
    from harness.trial.dist import DistInfo
    from harness.trial.loop import run_trial

    job: TrialJob = config["job"]
    ctx = ray.train.get_context()
    info = DistInfo(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
    data = _prepare_quietly(job.data_fields, job.cache_dir)
    key = job.spec.key(data.data_hash)
    run = None
    if info.is_main:
        run = _open_run(job, Tracker(resolve_secret("tracking", job.tracking_uri, job.tracking_secret)), key)
        if run is not None:
            run.log_dataset(data.corpus_name, data.data_hash, str(data.path))
    progress = BoardReporter(job.board, key) if job.board and info.is_main else None
    result = run_trial(job.spec, data, Path(job.out_dir), run, info, progress=progress, peak_tflops=job.peak_tflops)
    if info.is_main:  # the trial folder is shared: the task that launched the trainer reads it back
        out = {
            "status": result.status,
            "step": result.step,
            "error": result.error,
            "run_id": result.run_id,
            "metrics": result.metrics,
        }
        (Path(job.out_dir) / DDP_RESULT).write_text(json.dumps(out, default=float))
    ray.train.report({"status": result.status})  # every rank: a collective in Ray Train


def _train_ddp(job: TrialJob, key: str):
    """A trial on several GPUs (or CPU processes): DDP through Ray Train's TorchTrainer."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from harness.trial.loop import TrialResult
    from harness.trial.step import resolve_device

    use_gpu = resolve_device(job.spec.train.device).type == "cuda"
    trainer = TorchTrainer(
        _ddp_worker_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=job.nproc, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"kb-{key}",
            storage_path=str(Path(job.out_dir).parent.resolve()),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    result_file = Path(job.out_dir) / DDP_RESULT
    result_file.unlink(missing_ok=True)
    trainer.fit()
    out = (
        json.loads(result_file.read_text())
        if result_file.is_file()
        else {
            "status": schema.FAILED,
            "step": 0,
            "error": "the DDP workers ended without a result",
            "run_id": None,
            "metrics": {},
        }
    )
    status, step, error, run_id, numeric = out["status"], out["step"], out["error"], out["run_id"], out["metrics"]
    return TrialResult(status, key, step, numeric, run_id, error, Path(job.out_dir))
