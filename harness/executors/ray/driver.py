"""The driver: claim and submit every trial of a matrix as a Ray task, follow them, collect their results;
Ctrl-C cancels them. Same parent run, child runs and MatrixOutcome as the local executor."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live

from harness import schema
from harness.executors.matrix_run import (
    MatrixOutcome,
    print_interrupted,
    skipped_line,
    start_matrix_run,
    trial_line,
)
from harness.executors.ray import cluster
from harness.executors.ray.claim_board import Claims, claims_lock_dir
from harness.executors.ray.cluster import (
    check_shared_dir,
    check_shared_stores,
    connect,
    driver_node,
    secret_arg,
    slots,
    trial_resources,
    warn_sqlite_writers,
)
from harness.executors.ray.options import RayOptions, import_ray
from harness.executors.ray.progress_board import ProgressBoard, progress_view, running_table, snapshot
from harness.executors.ray.task import TrialJob, train_trial
from harness.schema import MLFLOW_RUN_STATUS
from harness.stores.limits import parallel_slots
from harness.stores.tracking import strip_credentials
from harness.trial.loop import TrialResult
from harness.trial.runs import is_ended, run_tags
from harness.trial.step import resolve_device


@dataclass
class Running:
    spec: Any
    key: str
    ref: Any
    index: int
    experiment_id: str
    started: float = field(default_factory=time.time)


def _remote_trial(ray, opts: RayOptions, resources: dict[str, float]):
    return ray.remote(train_trial).options(max_retries=opts.max_retries, retry_exceptions=False, **resources)


def run_matrix_ray(
    matrix,
    trials: list,
    data,
    tracking_uri: str | None,
    out_root: Path,
    console: Console,
    opts: RayOptions,
    peak_tflops: float | None = None,
    cache_dir: str | None = None,
):
    """run_matrix on Ray: every trial a task, as many at once as the cluster has slots. Same MatrixOutcome."""
    from harness.stores.tracking import Tracker, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    shown_uri, secrets = secret_arg("tracking", uri)
    started = connect(opts, secrets)
    ray = import_ray()
    try:
        hosts = cluster.cluster_hosts()  # through the module: tests stand in a cluster of several machines
        check_shared_stores(hosts, tracking_uri=uri)
        cuda = bool(trials) and resolve_device(trials[0].train.device).type == "cuda"
        warn_sqlite_writers(
            console, uri, min(len(trials), parallel_slots(ray.cluster_resources(), trial_resources(cuda, opts)))
        )
        out_root = Path(opts.checkpoint_dir) if opts.checkpoint_dir else Path(out_root)
        check_shared_dir(out_root, hosts)
        tracker = Tracker(uri)
        experiment_id = tracker.ensure_experiment(matrix.name, matrix.spec.description)
        device = resolve_device(trials[0].train.device) if trials else None
        common_tags = run_tags(data, device) if device is not None else {}
        parent = start_matrix_run(tracker, experiment_id, matrix, trials, data, common_tags)
        outcome = MatrixOutcome(experiment_id, parent, [])
        claims = Claims(f"{strip_credentials(uri)}|{experiment_id}", claims_lock_dir(uri))
        board = ray.remote(ProgressBoard).options(num_cpus=0, scheduling_strategy=driver_node()).remote()
        console.print(
            f"ray: {sum(len(v) for v in hosts.values())} node(s) on {len(hosts)} machine(s), "
            f"{slots(ray)}; {len(trials)} trial(s)"
        )
        try:
            _drive(
                ray,
                trials,
                data,
                tracker,
                experiment_id,
                parent,
                common_tags,
                out_root,
                console,
                opts,
                peak_tflops,
                cache_dir,
                shown_uri,
                bool(secrets),
                claims,
                board,
                outcome,
            )
            if device is not None:  # the controlled speed runs, on the driver, as the local executor does
                from harness.measure.speed_runs import measure_matrix_speed

                measure_matrix_speed(trials, data, device, tracker, experiment_id, parent, common_tags, console)
        except KeyboardInterrupt:
            outcome.interrupted = True
            print_interrupted(console, "running trials are cancelled and marked killed; finished trials are kept")
        finally:
            claims.close()
            tracker.end_parent(parent, schema.KILLED if outcome.interrupted else schema.FINISHED)
            with contextlib.suppress(Exception):
                ray.kill(board)
        return outcome
    finally:
        if started:
            ray.shutdown()


def _drive(
    ray,
    trials,
    data,
    tracker,
    experiment_id,
    parent,
    common_tags,
    out_root,
    console,
    opts,
    peak_tflops,
    cache_dir,
    shown_uri,
    secret: bool,
    claims: Claims,
    board,
    outcome,
) -> None:
    """Claim and submit every trial, then wait for them with live progress; Ctrl-C cancels them."""
    n = len(trials)
    results: dict[int, TrialResult | None] = {}
    running: list[Running] = []
    for i, spec in enumerate(trials, 1):
        key = spec.key(data.data_hash)
        existing = tracker.find_trial(experiment_id, key)
        if is_ended(existing):
            console.print(skipped_line(i, n, spec.name, existing.data.tags[schema.TAG_STATUS], existing.info.run_id))
            if parent:
                tracker.join_matrix(existing.info.run_id, parent)  # listed in this invocation's MLflow view
            results[i] = None
            continue
        if not claims.claim(key):
            console.print(f"[dim][{i}/{n}] {spec.name}: claimed by another driver, skipped[/]")
            results[i] = None
            continue
        job = TrialJob(
            spec,
            i,
            data_fields=dict(spec.data),
            cache_dir=cache_dir,
            tracking_uri=shown_uri,
            tracking_secret=secret,
            experiment_id=experiment_id,
            parent_run_id=parent,
            common_tags=common_tags,
            out_dir=str((out_root / spec.experiment / key).resolve()),
            nproc=opts.nproc,
            peak_tflops=peak_tflops,
            board=board,
        )
        on_cuda = resolve_device(spec.train.device).type == "cuda"
        ref = _remote_trial(ray, opts, trial_resources(on_cuda, opts)).remote(job)
        running.append(Running(spec, key, ref, i, experiment_id))
    try:
        _wait_all(ray, running, results, board, console, opts, n, tracker, claims)
    except KeyboardInterrupt:
        _cancel(ray, running, board, tracker, console)
        raise
    finally:
        outcome.results.extend((trials[i - 1], results.get(i)) for i in sorted(results))


def _wait_all(
    ray,
    running: list[Running],
    results: dict,
    board,
    console: Console,
    opts: RayOptions,
    n: int,
    tracker,
    claims: Claims,
) -> None:
    bar, task = progress_view(n, console)
    done_before = sum(1 for v in results.values() if v is None)
    bar.update(task, completed=done_before)
    last_line = 0.0
    with Live(
        Group(bar), console=console, refresh_per_second=4, transient=False, redirect_stdout=False, redirect_stderr=False
    ) as live:
        while running:
            ready, _ = ray.wait([r.ref for r in running], num_returns=1, timeout=opts.poll_s)
            rows_now = snapshot(ray, board)
            if opts.observer is not None:
                opts.observer(rows_now)
            for r in [r for r in running if r.ref in ready]:
                running.remove(r)
                results[r.index] = _collect(ray, r, rows_now.get(r.key, {}), tracker, console)
                claims.release(r.key)
                bar.advance(task)
            rows = [(r, rows_now.get(r.key, {})) for r in running]
            live.update(Group(bar, running_table(rows)) if rows else Group(bar))
            if not console.is_terminal and time.time() - last_line > 30 and running:
                last_line = time.time()  # a log file gets a line every 30 s instead of a live view
                for r in running:
                    row = rows_now.get(r.key, {})
                    console.print(
                        f"[{r.index}/{n}] {r.spec.name} on {row.get('node', 'queued')} step "
                        f"{row.get('step', 0)}/{row.get('total') or '?'}"
                    )


def _collect(ray, r: Running, row: dict, tracker, console: Console):
    """One finished task -> TrialResult (a task that failed for good: failed, its run marked failed)."""
    try:
        out = ray.get(r.ref)
    except Exception as e:  # retries exhausted (system failure) or an error outside run_trial
        from harness.stores.tracking import first_line

        error = f"{type(e).__name__}: {first_line(e)}"
        _end_if_running(tracker, r.experiment_id, r.key, schema.FAILED, error)
        console.print(f"[red]failed[/] {r.spec.name} on Ray: {error}")
        return TrialResult(schema.FAILED, r.key, error=error)
    if out["status"] == "skipped":
        console.print(f"[dim]{r.spec.name}: already ended, skipped[/]")
        return None
    result = TrialResult(
        out["status"], out["trial_key"], out["step"], out["metrics"], out["run_id"], out["error"], Path(out["out_dir"])
    )
    n_retries = out["attempt"] - 1
    retried = f" after {n_retries} retr{'y' if n_retries == 1 else 'ies'}" if n_retries > 0 else ""
    console.print(trial_line(r.spec.name, result, f" on {out['node']}{retried}"))
    return result


def _end_if_running(tracker, experiment_id: str, key: str, status: str, error: str) -> None:
    """Mark a trial's run ended when its task could not (lost for good, cancelled before run_trial)."""

    with contextlib.suppress(Exception):
        run = tracker.find_trial(experiment_id, key)
        if run is not None and run.data.tags.get(schema.TAG_STATUS) == schema.RUNNING:
            run_id = run.info.run_id
            tracker.client.set_tag(run_id, schema.TAG_STATUS, status)
            tracker.client.set_tag(run_id, schema.TAG_ERROR, error[: schema.ERROR_CHARS])
            tracker.client.set_terminated(run_id, MLFLOW_RUN_STATUS.get(status, "FAILED"))


def _cancel(ray, running: list[Running], board, tracker, console: Console, grace_s: float = 30.0) -> None:
    """Ctrl-C: KeyboardInterrupt in every task (run_trial marks its run killed), then force what is left."""
    for r in running:
        with contextlib.suppress(Exception):
            ray.cancel(r.ref, force=False)
    deadline = time.time() + grace_s
    pending = [r.ref for r in running]
    while pending and time.time() < deadline:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
    for r in running:
        if r.ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(r.ref, force=True)
    for r in running:
        _end_if_running(tracker, r.experiment_id, r.key, schema.KILLED, "interrupted (Ctrl-C)")
    console.print(f"cancelled {len(running)} trial(s)")
