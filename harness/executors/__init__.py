"""Where trials run: `local` (the in-process loop of harness.runner, the default) or `ray` (harness.executors.ray).

Ray is an optional extra: nothing here imports it; `harness.executors.ray` imports it only when it is chosen.
"""

from __future__ import annotations

from harness.errors import UserError, suggest

EXECUTORS = ("local", "ray")


def check_executor(name: str) -> str:
    if name not in EXECUTORS:
        raise UserError(f"--executor: unknown executor {name!r}; {suggest(name, EXECUTORS)}")
    return name
