"""Progress: tasks report to an actor fire-and-forget, the driver polls it and draws a bar and a table."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from harness.executors.ray.options import import_ray


class ProgressBoard:
    """Actor holding each trial's latest progress; tasks report fire-and-forget, the driver polls."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def start(self, key: str, info: dict) -> int:
        row = self.rows.setdefault(key, {"attempts": 0, "step": 0})
        row.update(info, attempts=row["attempts"] + 1, started=time.time())
        return row["attempts"]

    def update(self, key: str, info: dict) -> None:
        self.rows.setdefault(key, {"attempts": 1}).update(info)

    def snapshot(self) -> dict[str, dict]:
        return self.rows


class BoardReporter:
    """In a task: the run_trial progress callback that reports to the driver's ProgressBoard."""

    def __init__(self, board, key: str):
        self.board, self.key = board, key

    def __call__(self, step: int, total: int | None, info: dict) -> None:
        with contextlib.suppress(Exception):  # fire-and-forget; a lost board costs the driver's view only
            self._send(step, total, info)

    def _send(self, step: int, total: int | None, info: dict) -> None:
        self.board.update.remote(
            self.key,
            {"step": step, "total": total, "loss": info.get("loss"), "tok_s": info.get("tok/s"), "time": time.time()},
        )


def board_start(board, key: str, info: dict) -> int:
    """This attempt's number (1, 2, ...) from the driver's board; 0 when the board cannot be reached (progress
    is a nicety: the trial runs all the same)."""
    if board is None:
        return 0
    try:
        return int(import_ray().get(board.start.remote(key, info), timeout=60))
    except Exception:
        return 0


def snapshot(ray, board) -> dict:
    try:
        return ray.get(board.snapshot.remote(), timeout=10)
    except Exception:  # the board's node was lost: progress only, the trials go on
        return {}


def progress_view(n: int, console: Console) -> tuple[Progress, Any]:
    bar = Progress(
        TextColumn("[bold]matrix[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("trials"),
        TimeElapsedColumn(),
        TextColumn("remaining"),
        TimeRemainingColumn(),
        console=console,
    )
    return bar, bar.add_task("matrix", total=n)


def running_table(rows: list[tuple[Any, dict]]) -> Table:
    """One row per running trial (driver.Running, its latest progress row)."""
    table = Table(header_style="bold", box=None, pad_edge=False)
    for col in ("trial", "arm", "node", "step", "loss", "tokens/s", "attempt"):
        table.add_column(col, justify="left" if col in ("trial", "arm", "node") else "right")
    for r, row in rows:
        step = f"{row.get('step', 0)}/{row.get('total') or '?'}"
        loss = f"{row['loss']:.3f}" if row.get("loss") is not None else "-"
        tps = f"{row['tok_s']:,.0f}" if row.get("tok_s") else "-"
        table.add_row(
            f"[{r.index}] {r.spec.name}",
            r.spec.arm,
            str(row.get("node", "queued")),
            step,
            loss,
            tps,
            str(row.get("attempts", 0)),
        )
    return table
