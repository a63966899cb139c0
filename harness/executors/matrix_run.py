"""What both executors share around the trials: the matrix's parent run (its params, matrix.toml,
trials.json), the outcome they return, the console lines of a trial (skipped, ended) and the summary table."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass

from rich.table import Table

from harness import schema
from harness.data import PreparedData
from harness.errors import UserError
from harness.signals import interrupt_name
from harness.spec.matrix import Matrix
from harness.spec.registry import TrialSpec
from harness.stores.tracking import strip_credentials
from harness.trial.loop import TrialResult
from harness.trial.runs import trial_dir_name


class StoreLost(UserError):
    """The tracking store stopped answering mid-trial (harness.stores.tracking.TrackingLost): the matrix stops."""


@dataclass
class MatrixOutcome:
    experiment_id: str
    parent_run_id: str | None
    results: list[tuple[TrialSpec, TrialResult | None]]  # None: skipped (already finished)
    interrupted: bool = False


def trial_list(trials: list[TrialSpec], data_hash: str) -> list[dict]:
    """The resolved trials as logged on the parent run (trials.json): name, key, folder, full spec."""
    return [
        {
            "name": t.name,
            "trial_key": t.key(data_hash),
            "folder": trial_dir_name(t, t.key(data_hash)),
            "params": t.flat_params(),
        }
        for t in trials
    ]


def matrix_params(matrix: Matrix) -> dict:
    """The matrix file's settings, flattened (`train.steps`, `matrix.seeds`, ...), as the parent run's params."""
    out = {"name": matrix.name}
    for section, value in matrix.spec.model_dump(exclude={"name", "description"}).items():
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        elif value is not None:
            out[section] = value
    return out


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["kimi-bench", *sys.argv[1:]])


def print_interrupted(console, what_stopped: str) -> None:
    """The Ctrl-C / SIGTERM report of either executor: what stopped, then the exact command that resumes it
    (with its --set overrides, which are part of every trial key; credentials stripped)."""
    console.print(f"[yellow]interrupted ({interrupt_name()})[/]: {what_stopped}. Resume with the same command:")
    console.print(strip_credentials(command_line()), markup=False, highlight=False)


def start_matrix_run(
    tracker,
    experiment_id: str,
    matrix: Matrix,
    trials: list[TrialSpec],
    data: PreparedData,
    common_tags: dict[str, str],
) -> str:
    """The parent run of this invocation, with the matrix's settings, the file as given and every trial."""
    parent = tracker.start_parent(
        experiment_id,
        matrix.name,
        strip_credentials(command_line()),
        {**common_tags, schema.TAG_MATRIX_FILE: str(matrix.path), schema.TAG_N_TRIALS: str(len(trials))},
        matrix.spec.description,
    )
    tracker.log_matrix(
        parent, matrix.path.read_text(encoding="utf-8"), matrix_params(matrix), trial_list(trials, data.data_hash)
    )
    return parent


def skipped_line(i: int, n: int, name: str, status: str, run_id: str) -> str:
    return f"[dim][{i}/{n}] {name}: already {status} (run {run_id[:8]}), skipped[/]"


def trial_line(name: str, result: TrialResult, where: str = "") -> str:
    """The one console line of an ended trial: status, step and val ppl (or the error); `where`: " on NODE"."""
    style = {schema.FINISHED: "green", schema.DIVERGED: "red", schema.OOM: "red", schema.FAILED: "red"}.get(
        result.status, "yellow"
    )
    ppl = result.metrics.get(schema.VAL_PPL_FINAL)
    detail = f"val ppl {ppl:.3f}" if ppl else (result.error or "")
    return f"[{style}]{result.status}[/] {name} at step {result.step}{where}: {detail}"


def summary_table(outcome: MatrixOutcome) -> Table:
    table = Table(title="matrix summary", header_style="bold")
    # Speed and memory under control are in the speed table printed before this one; here tok/s is what
    # the trial observed while training (a shared host makes it noisy), memory the exact state bytes.
    for col in (
        "trial",
        "status",
        "step",
        "params total",
        "params active",
        "val ppl",
        "val bpb",
        "train tok/s (observed)",
        "param+grad+optim MB",
    ):
        table.add_column(col, justify="left" if col in ("trial", "status") else "right")
    for spec, result in outcome.results:
        if result is None:
            table.add_row(spec.name, "skipped (done)", *[""] * 7)
            continue
        m = result.metrics

        def fmt(key: str, spec_: str = ",.0f", scale: float = 1.0, m=m) -> str:
            return format(m[key] / scale, spec_) if key in m else "-"

        table.add_row(
            spec.name,
            result.status,
            str(result.step),
            fmt(schema.PARAMS_TOTAL),
            fmt(schema.PARAMS_ACTIVE),
            fmt(schema.VAL_PPL_FINAL, ".3f"),
            fmt(schema.VAL_BPB_FINAL, ".3f"),
            fmt(schema.TRAIN_TOKENS_PER_S),
            _state_mb(m),
        )
    return table


def _state_mb(m: dict) -> str:
    keys = (schema.MEM_PARAM, schema.MEM_GRAD, schema.MEM_OPTIM)
    return f"{sum(m[k] for k in keys) / 1e6:,.2f}" if all(k in m for k in keys) else "-"


def check_trials(trials: list[TrialSpec]) -> None:
    if not trials:
        raise UserError("matrix: expands to no trials; list at least one arm, preset and seed")
