"""How many writers a local sqlite MLflow store holds, and the warning when a command would exceed it.

sqlite serializes writers with one file lock; MLflow's SQLAlchemy store waits for it (a 30 s busy timeout)
and then raises "database is locked". reports/benchmarks/tracking_load.py measured it with kimi-bench's own
logging path (reports/benchmarks/tracking_load.md); SQLITE_MAX_WRITERS is the largest writer count there that
lost nothing and raised nothing at the trial loop's cadence and in bursts.
"""

from __future__ import annotations

SQLITE_MAX_WRITERS = 16
SERVER_SETUP = (
    "an MLflow server on PostgreSQL (`mlflow server --backend-store-uri postgresql://...`, then "
    "--tracking-uri http://HOST:5000; docs/ray.md, 'The tested team setup')"
)


def sqlite_writers_warning(uri: str, writers: int) -> str | None:
    """The line to print before `writers` processes log to `uri` at once, or None when the store holds them."""
    if not uri.startswith("sqlite:") or writers <= SQLITE_MAX_WRITERS:
        return None
    return (
        f"warning: {writers} trials would log at once to the sqlite store {uri.removeprefix('sqlite:///')}; "
        f"sqlite was measured to hold {SQLITE_MAX_WRITERS} writers (reports/benchmarks/tracking_load.md); "
        f"beyond that use {SERVER_SETUP}"
    )


def parallel_slots(cluster: dict[str, float], per_trial: dict[str, float]) -> int:
    """How many trials needing `per_trial` (num_cpus / num_gpus) a cluster with `cluster` resources runs at once."""
    gpus, cpus = per_trial.get("num_gpus", 0) or 0, per_trial.get("num_cpus", 0) or 0
    if gpus > 0:
        return int(cluster.get("GPU", 0) // gpus)
    if cpus > 0:
        return int(cluster.get("CPU", 0) // cpus)
    return int(cluster.get("CPU", 1))  # the task only launches DDP workers: bounded by the CPUs all the same
