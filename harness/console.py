"""What the terminal shows: the consoles, the matrix + trial progress bars, MLflow's log lines kept in a file,
and the hints printed after a command (each carrying the options the user gave, so it can be pasted)."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Piped output (logs, CI) gets a wide console so tables are not squeezed into rich's 80-column default.
console = Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=160)
err_console = Console(stderr=True)


def print_error(message: str) -> None:
    """The one error format of the CLI: `kimi-bench: error: <label>: <what>; <fix>` on one line."""
    err_console.print(f"kimi-bench: error: {message}", markup=False, highlight=False, soft_wrap=True)


class MatrixProgress:
    """Two bars: the whole matrix (trials done, steps left, remaining time) and the current trial. A console
    that is not a terminal (a log file) gets a line every ~10% of a trial instead of live bars."""

    def __init__(self, console: Console, n_trials: int, total_steps: int, enabled: bool = True):
        self.console, self.n_trials, self.enabled = console, n_trials, enabled
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.matrix: TaskID = self.bar.add_task("[bold]matrix[/]", total=max(1, total_steps), info="")
        self.trial: TaskID | None = None
        self.done_trials = 0
        self._trial_base = 0  # matrix steps completed before the current trial
        self._last_line = 0

    def __enter__(self) -> MatrixProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def _matrix_info(self) -> str:
        return f"{self.done_trials}/{self.n_trials} trials"

    def skip(self, steps: int) -> None:
        """A trial that is already done: its steps count as completed."""
        self.done_trials += 1
        self.bar.advance(self.matrix, steps)
        self.bar.update(self.matrix, info=self._matrix_info())

    def start_trial(self, label: str, total: int | None) -> None:
        self._trial_base = int(self.bar.tasks[self.matrix].completed)
        self._last_line = 0
        if self.trial is not None:
            self.bar.remove_task(self.trial)
        self.trial = self.bar.add_task(label, total=total, info="")
        self.bar.update(self.matrix, info=self._matrix_info())

    def update_trial(self, label: str, step: int, total: int | None, info: str) -> None:
        self.bar.update(self.trial, completed=step, info=info)
        self.bar.update(self.matrix, completed=self._trial_base + step)
        if not self.console.is_terminal and self.enabled and step - self._last_line >= max(1, (total or 100) // 10):
            self._last_line = step
            self.console.print(f"{label} step {step}/{total or '?'}  {info}")

    def end_trial(self, steps: int) -> None:
        self.done_trials += 1
        self.bar.update(self.matrix, completed=self._trial_base + steps, info=self._matrix_info())


class _LazyFileHandler(logging.FileHandler):
    """A file handler that creates its folder and file at the first record, so a command that fails before
    MLflow logs anything leaves no folder behind."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextlib.contextmanager
def mlflow_logs_to(log_file: Path) -> Iterator[Path]:
    """Send MLflow's (and alembic's) log records to `log_file` while the bars draw; warnings and errors still
    reach stderr. MLflow installs its own stderr handler on import, so it is imported first; where MLflow is
    absent (a `record:` tracker on a machine without it) there is nothing to quiet."""
    try:
        import mlflow  # noqa: F401  (configures its loggers; replaced below, restored after)
    except ImportError:
        yield log_file
        return

    to_file = _LazyFileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    to_stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = {}
    for name in ("mlflow", "alembic"):
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate)
        logger.handlers, logger.propagate = [to_file, to_stderr], False
    try:
        yield log_file
    finally:
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        to_file.close()


def _tracking_arg(tracking_uri: str | None) -> str:
    return f" --tracking-uri {shlex.quote(tracking_uri)}" if tracking_uri else ""


def report_hint(experiment: str, tracking_uri: str | None) -> str:
    """`kimi-bench report ...` with the same --tracking-uri the run was given."""
    return f"kimi-bench report --experiment {shlex.quote(experiment)}{_tracking_arg(tracking_uri)}"


def status_hint(matrix: Path, tracking_uri: str | None) -> str:
    return f"kimi-bench status --matrix {shlex.quote(str(matrix))}{_tracking_arg(tracking_uri)}"


def browse_lines(display_uri: str, experiment_id: str, view_key: str | None = None) -> list[str]:
    """Where to look at the runs: a server's runs page URL, or the `mlflow ui` command for a local store.
    The URL opens MLflow 3's training-runs view, with `view_key` the invocation's saved view (harness.stores.views)."""
    from harness.stores.views import view_url

    if display_uri.startswith(("http://", "https://")):
        return [f"runs: {view_url(display_uri, experiment_id, view_key)}"]
    return [
        f"browse: mlflow ui --backend-store-uri {shlex.quote(display_uri)}",
        f"runs: {view_url('http://127.0.0.1:5000', experiment_id, view_key)}",
    ]
