"""What a tune worker reports while it runs (TuneEvent), and the console view of it (RichTuneProgress).

run_worker knows nothing of consoles: it calls `on_event(TuneEvent)`; a Ray task can forward the events to
its driver, the CLI renders them with RichTuneProgress (one bar per arm, one for the running trial).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@dataclass(frozen=True)
class TuneEvent:
    """kind: "note" (text, style) | "data" (text, step, total: preparing the corpus)
    | "arm" (arm, total, info done/best) | "trial_start" (arm, trial, total steps)
    | "step" (arm, trial, step, total, info loss) | "trial_end" (arm, trial, text, info state/params)."""

    kind: str
    worker_id: int = 0
    arm: str = ""
    trial: int | None = None
    step: int | None = None
    total: int | None = None
    text: str = ""
    style: str = ""
    info: dict[str, Any] = field(default_factory=dict)


OnEvent = Callable[[TuneEvent], None]


def ignore_events(event: TuneEvent) -> None:
    pass


STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow"}


class RichTuneProgress:
    """Renders a worker's events on a rich console; use as a context manager around run_worker."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
        )
        self.bar = Progress(*columns, console=self.console)
        self.arms: dict[str, Any] = {}
        self.step_task = None
        self.data_task = None

    def __enter__(self) -> RichTuneProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def __call__(self, event: TuneEvent) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            handler(event)

    def _on_note(self, e: TuneEvent) -> None:
        self.console.print(f"[{e.style}]{e.info.get('label', '')}[/]{e.text}" if e.style else e.text)

    def _on_data(self, e: TuneEvent) -> None:
        self.bar.start()
        if self.data_task is None:
            self.data_task = self.bar.add_task("data", total=None, info="")
        self.bar.update(self.data_task, description=f"data {e.text}", completed=e.step, total=e.total)

    def _on_arm(self, e: TuneEvent) -> None:
        self.bar.start()
        if self.data_task is not None:
            self.bar.remove_task(self.data_task)
            self.data_task = None
        if self.step_task is None:
            self.step_task = self.bar.add_task("  trial", total=None, info="", visible=False)
        best = e.info.get("best")
        info = f"best {best[1]:.4f} (#{best[0]})" if best else ""
        if e.arm not in self.arms:
            self.arms[e.arm] = self.bar.add_task(e.arm, total=e.total, info=info, completed=e.info["done"])
        else:
            self.bar.update(self.arms[e.arm], completed=e.info["done"], info=info)

    def _on_trial_start(self, e: TuneEvent) -> None:
        self.bar.update(
            self.step_task, description=f"  {e.arm} #{e.trial}", total=e.total, completed=0, visible=True, info=""
        )

    def _on_step(self, e: TuneEvent) -> None:
        self.bar.update(self.step_task, completed=e.step, info=f"loss {e.info['loss']:.3f}")

    def _on_trial_end(self, e: TuneEvent) -> None:
        self.bar.update(self.step_task, visible=False)
        state = e.info["state"]
        style = STATE_STYLE.get(state, "red")
        self.console.print(f"[{style}]{state.lower()}[/] {e.arm} #{e.trial}: {e.text}  [dim]{e.info['params']}[/]")
