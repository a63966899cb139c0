"""`kimi-bench report`: collect an experiment from MLflow, write report.md + figures, and attach them to the
newest matrix (parent) run so `mlflow ui` shows the report beside the trials."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def _attach(collected, out_dir: Path) -> str | None:
    if collected.matrix_runs.empty:
        return None
    run_id = str(collected.matrix_runs.run_id.iloc[-1])  # sorted by start_time: the newest invocation
    for name in ("report.md", "summary.csv", "trials.csv"):
        if (out_dir / name).is_file():
            collected.client.log_artifact(run_id, str(out_dir / name))
    if (out_dir / "figures").is_dir():
        collected.client.log_artifacts(run_id, str(out_dir / "figures"), "figures")
    return run_id


def publish_report(
    experiment: str,
    tracking_uri: str,
    out: Path | None,
    log: bool,
    command: str,
    console: Console,
    all_runs: bool = False,
) -> Path:
    """Write the report of `experiment` to `out` (default reports/out/<experiment>); -> report.md's path."""
    from reports.collect import collect
    from reports.markdown import write_report

    out = out or Path("reports/out") / experiment
    with console.status("collecting runs from MLflow"):
        collected = collect(tracking_uri, experiment)
    with console.status("rendering report"):
        path = write_report(collected, out, command=command, all_runs=all_runs)
    console.print(f"wrote {path}")
    if log and (run_id := _attach(collected, path.parent)):
        console.print(f"logged report.md, summary.csv, trials.csv, figures/ to the matrix run {run_id}")
    return path
