"""Tuning on Ray: N Optuna workers as Ray tasks on one shared storage (Optuna's distributed pattern), each
the tuning package's own worker (harness.tune.tune); the tuning package never imports an executor."""

from __future__ import annotations

import contextlib
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from harness.errors import UserError
from harness.executors.ray import cluster
from harness.executors.ray.cluster import (
    check_shared_stores,
    connect,
    resolve_secret,
    secret_arg,
    trial_resources,
    warn_sqlite_writers,
    where,
)
from harness.executors.ray.options import RayOptions, import_ray
from harness.stores.tracking import strip_credentials


def worker_quotas(n_trials: int | None, n_workers: int) -> list[int | None]:
    """Each worker's --n-trials so that the workers add exactly n_trials per arm together (None: no cap)."""
    if n_trials is None:
        return [None] * n_workers
    return [q for q in (n_trials // n_workers + (i < n_trials % n_workers) for i in range(n_workers)) if q > 0]


def run_tune_worker(config: dict, worker_id: int):
    """One Optuna worker, the same entry a hand-started `kimi-bench tune` uses; the one place a Ray study
    worker calls the tuner (worker_id: which of the N; today's tune() needs none)."""
    from harness.tune import tune

    return tune(config["matrix"], **config["kwargs"])


def _tune_task(config: dict, worker_id: int, secret_storage: bool, secret_tracking: bool) -> dict:
    """A study worker's Ray task: the real URIs from this node's environment, then run_tune_worker."""
    from rich.console import Console as _Console

    kwargs = dict(config["kwargs"])
    kwargs["storage"] = resolve_secret("storage", kwargs.get("storage"), secret_storage)
    kwargs["tracking_uri"] = resolve_secret("tracking", kwargs.get("tracking_uri"), secret_tracking)
    kwargs["console"] = _Console(quiet=True)
    outcome = run_tune_worker({**config, "kwargs": kwargs}, worker_id)
    return {
        "added": {arm: s.added for arm, s in outcome.studies.items()},
        "interrupted": outcome.interrupted,
        **where(),
    }


def tune_ray(
    matrix,
    *,
    n_workers: int,
    opts: RayOptions,
    n_trials: int | None,
    total_trials: int | None,
    storage: str | None,
    tracking_uri: str | None,
    console: Console,
    arms: list[str] | None = None,
    study_prefix: str | None = None,
    **tune_kwargs: Any,
):
    """`kimi-bench tune --executor ray --n-workers N`: N workers share the studies; together they add exactly
    --n-trials per arm (split between them; --total-trials caps every worker, retried ones included)."""
    from harness.spec.matrix import Matrix, load_matrix
    from harness.stores.tracking import resolve_tracking_uri
    from harness.tune import TuneConfig, TuneOutcome
    from harness.tune.run import _parse_arms
    from harness.tune.storage import _storage_url

    if n_workers < 1:
        raise UserError(f"--n-workers: must be >= 1, got {n_workers}")
    matrix = matrix if isinstance(matrix, Matrix) else load_matrix(matrix)
    checked = TuneConfig(
        matrix,
        n_trials=n_trials,
        total_trials=total_trials,  # one-line errors, the defaults
        timeout=tune_kwargs.get("timeout"),
        heartbeat_s=tune_kwargs.get("heartbeat_s", 60),
    )
    n_trials, total_trials = checked.n_trials, checked.total_trials
    selected = _parse_arms(matrix, arms)
    url = _storage_url(storage)
    uri = resolve_tracking_uri(tracking_uri)
    shown_storage, env_storage = secret_arg("storage", url)
    shown_uri, env_uri = secret_arg("tracking", uri)
    started = connect(opts, {**env_storage, **env_uri})
    ray = import_ray()
    try:
        hosts = cluster.cluster_hosts()
        check_shared_stores(hosts, tracking_uri=uri, storage=url)
        warn_sqlite_writers(console, uri, n_workers)
        quotas = worker_quotas(n_trials, n_workers)
        cap = total_trials if total_trials is not None else n_trials
        from harness.trial.step import resolve_device

        resources = trial_resources(resolve_device(matrix.train_config().device).type == "cuda", opts)
        task = ray.remote(_tune_task).options(max_retries=opts.max_retries, retry_exceptions=False, **resources)
        refs = []
        for worker_id, quota in enumerate(quotas):
            kwargs = {
                **tune_kwargs,
                "n_trials": quota,
                "total_trials": cap,
                "storage": shown_storage,
                "tracking_uri": shown_uri,
                "arms": arms,
                "study_prefix": study_prefix,
            }
            refs.append(task.remote({"matrix": matrix, "kwargs": kwargs}, worker_id, bool(env_storage), bool(env_uri)))
        console.print(
            f"ray: {len(refs)} Optuna worker(s) on {sum(len(v) for v in hosts.values())} node(s); "
            f"{n_trials or total_trials} trial(s) per arm; storage {strip_credentials(url)}"
        )
        prefix = study_prefix or matrix.name
        names = [f"{prefix}/{v}+{o}" for v, o in selected]
        interrupted = _wait_tune(
            ray, refs, names, url, tracking_uri, (n_trials or total_trials) * len(names), console, opts
        )
        results, failures = worker_results(ray, refs)
        if failures and not interrupted:
            for line in failures:
                console.print(f"[red]failed[/] {line}")
            raise UserError(
                f"ray: {len(failures)} of {len(refs)} tuning worker(s) failed (above), so their share of the "
                f"trials never ran; the trials that did are in {strip_credentials(url)}; fill each study with "
                f"the same command and --total-trials {cap}"
            )
        outcome = _tune_outcome(names, url, tracking_uri, matrix, results, interrupted)
        return outcome if outcome is not None else TuneOutcome(strip_credentials(url), {}, interrupted)
    finally:
        if started:
            ray.shutdown()


def _study_counts(url: str, tracking_uri: str | None, names: list[str]) -> dict[str, dict[str, int]]:
    import optuna

    from harness.tune import open_storage

    st = open_storage(url, tracking_uri)
    out = {}
    for name in names:
        try:
            trials = optuna.load_study(study_name=name, storage=st.storage).get_trials(deepcopy=False)
        except KeyError:  # not created yet
            trials = []
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        out[name] = counts
    return out


def _wait_tune(
    ray,
    refs: list,
    names: list[str],
    url: str,
    tracking_uri: str | None,
    total: int,
    console: Console,
    opts: RayOptions,
) -> bool:
    """Wait for the workers with one bar (trials that ended, all arms) and a row per study; Ctrl-C cancels."""
    bar = Progress(
        TextColumn("[bold]study[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("trials"),
        TimeElapsedColumn(),
        TextColumn("remaining"),
        TimeRemainingColumn(),
        console=console,
    )
    task = bar.add_task("study", total=total)
    pending = list(refs)
    try:
        with Live(
            Group(bar), console=console, refresh_per_second=2, redirect_stdout=False, redirect_stderr=False
        ) as live:
            while pending:
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=max(opts.poll_s, 1.0))
                with contextlib.suppress(Exception):
                    counts = _study_counts(url, tracking_uri, names)
                    if opts.observer is not None:
                        opts.observer(counts)
                    ended = sum(c.get("complete", 0) + c.get("pruned", 0) + c.get("fail", 0) for c in counts.values())
                    bar.update(task, completed=min(ended, total))
                    table = Table(header_style="bold", box=None)
                    for col in ("study", "running", "complete", "pruned", "fail"):
                        table.add_column(col, justify="left" if col == "study" else "right")
                    for name, c in counts.items():
                        table.add_row(name, *(str(c.get(k, 0)) for k in ("running", "complete", "pruned", "fail")))
                    live.update(Group(bar, table))
        return False
    except KeyboardInterrupt:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=False)  # KeyboardInterrupt in tune(): its trial FAIL, its run killed
        with contextlib.suppress(Exception):
            ray.wait(pending, num_returns=len(pending), timeout=30)
        console.print(
            "[yellow]interrupted[/]: the workers' current trials are failed in Optuna and killed in "
            "MLflow; run the same command to go on"
        )
        return True


def worker_results(ray, refs: list) -> tuple[list[dict], list[str]]:
    """What each finished worker returned, and one line per worker that raised (its task failed for good,
    or was cancelled): a lost worker is reported, never dropped in silence."""
    from harness.stores.tracking import first_line

    results, failures = [], []
    for worker_id, ref in enumerate(refs):
        try:
            results.append(ray.get(ref, timeout=0))
        except Exception as e:  # a RayTaskError carries the worker's own exception as .cause
            cause = getattr(e, "cause", None) or e
            failures.append(f"tuning worker {worker_id} on Ray: {type(cause).__name__}: {first_line(cause)}")
    return results, failures


def _tune_outcome(names: list[str], url: str, tracking_uri: str | None, matrix, results: list[dict], interrupted: bool):
    """The workers' studies, read back from the storage, for the CLI's summary (added = all workers)."""
    import optuna

    from harness.tune import ArmStudy, TuneOutcome, open_storage

    added: dict[str, int] = {}
    for out in results:
        for arm, n in out["added"].items():
            added[arm] = added.get(arm, 0) + n
    st = open_storage(url, tracking_uri)
    studies = {}
    for name in names:
        arm = name.rsplit("/", 1)[-1]
        with contextlib.suppress(KeyError):
            study = optuna.load_study(study_name=name, storage=st.storage)
            studies[arm] = ArmStudy(arm, name, None, study, (), matrix, added=added.get(arm, 0))
    return TuneOutcome(st.display, studies, interrupted)
