"""`kimi-bench status`: every trial's state from MLflow, and with a matrix also the trials never started.

It must answer in a few seconds, so it imports neither torch nor the matrix validator on its fast path: the
planned trial names come from the TOML's [matrix] table directly (presets x arms x seeds, the order of
harness.matrix.Matrix.expand). A file the fast path cannot read goes through harness.matrix.load_matrix for
its one-line error.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib
from rich.table import Table

from harness.errors import UserError

ENDED = {"finished", "diverged", "oom", "pruned"}


@dataclass(frozen=True)
class TrialState:
    name: str
    status: str  # finished | running | killed | failed | diverged | oom | pruned | pending
    step: str  # last logged step ("" when none)
    elapsed_s: float | None
    val_ppl: float | None
    run_id: str
    trial_key: str


def planned_trials(path: Path) -> tuple[str, list[str]]:
    """(experiment name, trial names in run order) of a matrix file, without validating it in full."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        m = raw["matrix"]
        arms = [(a["variant"], a["optimizer"]) for a in m.get("arms", [])] or list(
            itertools.product(m["variants"], m["optimizers"]))
        names = [f"{v}+{o} {p} s{s}" for p in m.get("presets", ["tiny"]) for (v, o), s in
                 itertools.product(arms, m.get("seeds", [0])) for _ in (m.get("data_seeds") or [None])]
        return str(raw["name"]), list(dict.fromkeys(names))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        from harness.matrix import load_matrix

        load_matrix(path)  # raises the one-line error that names the problem
        raise UserError(f"--matrix {path}: cannot list its trials; check its [matrix] table") from None


def _last_step(client, run) -> str:
    if "kb.final_step" in run.data.tags:
        return run.data.tags["kb.final_step"]
    steps = [m.step for key in ("train/loss", "val/loss") for m in client.get_metric_history(run.info.run_id, key)]
    return str(max(steps)) if steps else ""


def _elapsed(run) -> float | None:
    start, end = run.info.start_time, run.info.end_time
    if not start:
        return None
    return ((end or time.time() * 1000) - start) / 1000


def trial_states(client, experiment_id: str, planned: list[str] | None = None) -> list[TrialState]:
    """One row per trial: the newest run of each trial name (an ended one first); planned names without a
    run are `pending`."""
    runs = client.search_runs([experiment_id], filter_string="tags.`kb.kind` = 'trial'", max_results=10000,
                              order_by=["attributes.start_time DESC"])
    by_name: dict[str, object] = {}
    for r in runs:
        best = by_name.get(r.info.run_name)
        if best is None or (r.data.tags.get("kb.status") in ENDED and best.data.tags.get("kb.status") not in ENDED):
            by_name[r.info.run_name] = r
    names = list(planned) if planned is not None else sorted(by_name)
    names += [n for n in sorted(by_name) if n not in names] if planned is not None else []
    out = []
    for name in names:
        r = by_name.get(name)
        if r is None:
            out.append(TrialState(name, "pending", "", None, None, "", ""))
            continue
        out.append(TrialState(name, r.data.tags.get("kb.status", "?"), _last_step(client, r), _elapsed(r),
                              r.data.metrics.get("val/ppl_final"), r.info.run_id, r.data.tags.get("kb.trial_key", "")))
    return out


def _open_client(tracking_uri: str | None):
    from harness.tracking import resolve_tracking_uri, strip_credentials

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"--tracking-uri: no MLflow store at {uri.removeprefix('sqlite:///')}; run a matrix "
                        "first or pass the store of one")
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
    except Exception as e:
        from harness.tracking import first_line

        raise UserError(f"--tracking-uri {strip_credentials(uri)}: cannot reach the tracking store "
                        f"({first_line(e)}); start the server or fix the URI") from None
    return client


def _fmt_elapsed(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def status_table(experiment: str | None, matrix: Path | None, tracking_uri: str | None) -> Table:
    """The status command: --experiment NAME (its runs) or --matrix FILE (every planned trial, pending too)."""
    if (experiment is None) == (matrix is None):
        raise UserError("--experiment / --matrix: give one of them (the matrix also lists trials not started)")
    planned = None
    if matrix is not None:
        if not matrix.is_file():
            raise UserError(f"--matrix: no file at {matrix}; pass a TOML file such as experiments/smoke.toml")
        experiment, planned = planned_trials(matrix)
    client = _open_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None and planned is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise UserError(f"--experiment: no experiment {experiment!r}; existing: {names}")
    states = trial_states(client, exp.experiment_id, planned) if exp else \
        [TrialState(n, "pending", "", None, None, "", "") for n in planned]
    counts = {s: sum(t.status == s for t in states) for s in dict.fromkeys(t.status for t in states)}
    title = f"{experiment}: {len(states)} trials (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")"
    table = Table(title=title, header_style="bold")
    for col in ("trial", "status", "step", "elapsed", "val ppl", "run id", "trial key"):
        table.add_column(col, justify="right" if col in ("step", "elapsed", "val ppl") else "left")
    for t in states:
        table.add_row(t.name, t.status, t.step, _fmt_elapsed(t.elapsed_s), f"{t.val_ppl:.3f}" if t.val_ppl else "",
                      t.run_id[:12], t.trial_key)
    return table
