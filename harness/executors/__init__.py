"""Where trials run: `local` (harness.executors.local, in this process, the default) or `ray`
(harness.executors.ray, every trial a Ray task), behind one dispatch, `run_matrix(..., executor=...)`.

Ray is an optional extra: nothing here imports it; `harness.executors.ray` imports it only when it is chosen.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from harness.console import mlflow_logs_to
from harness.data import PreparedData
from harness.errors import UserError, suggest
from harness.executors.matrix_run import MatrixOutcome
from harness.spec.matrix import Matrix
from harness.spec.registry import TrialSpec
from harness.trial.dist import DistInfo

EXECUTORS = ("local", "ray")


def check_executor(name: str) -> str:
    if name not in EXECUTORS:
        raise UserError(f"--executor: unknown executor {name!r}; {suggest(name, EXECUTORS)}")
    return name


def run_matrix(
    matrix: Matrix,
    trials: list[TrialSpec],
    data: PreparedData,
    tracking_uri: str | None,
    out_root: Path,
    console: Console,
    dist_info: DistInfo = DistInfo(),
    peak_tflops: float | None = None,
    keep_state: bool = False,
    executor: str = "local",
    ray_options=None,
    cache_dir: str | None = None,
) -> MatrixOutcome:
    """Run every trial of `trials` on `executor`, with the same trial code and MLflow layout either way.
    MLflow's own log lines go to <out>/<experiment>/mlflow.log while the bars draw."""
    with mlflow_logs_to(out_root / matrix.name / "mlflow.log"):
        if check_executor(executor) == "ray":
            from harness.executors.ray.driver import run_matrix_ray
            from harness.executors.ray.options import RayOptions

            return run_matrix_ray(
                matrix,
                trials,
                data,
                tracking_uri,
                out_root,
                console,
                ray_options or RayOptions(),
                peak_tflops,
                cache_dir,
            )
        from harness.executors.local import run_matrix_local

        return run_matrix_local(
            matrix, trials, data, tracking_uri, out_root, console, dist_info, peak_tflops, keep_state
        )
