"""Prepare a corpus with a progress bar on the console (the commands' way to call harness.data.prepare)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.data.config import DataConfig
from harness.data.pipeline import PreparedData, prepare


def prepare_data(fields: dict, cache_dir: str | None, console: Console) -> PreparedData:
    cfg = DataConfig(**fields, **({"cache_dir": Path(cache_dir)} if cache_dir else {}))
    with Progress(
        TextColumn("[bold]data[/]"),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("preparing", total=None)

        def on_progress(description: str, completed: int, total: int | None) -> None:
            bar.update(task, description=description, completed=completed, total=total)

        return prepare(cfg, progress=on_progress)
