"""Results: each arm's best params for `run --tuned`, and the summary a tune command prints."""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.table import Table

from harness.errors import UserError
from harness.spec.matrix import Matrix
from harness.spec.registry import resolve_optimizer
from harness.tune.objective import format_params
from harness.tune.run import TuneOutcome
from harness.tune.spaces import Dim, search_space, split_params, study_name
from harness.tune.storage import open_storage
from harness.tune.study import RUN_ATTR


def tuned_entry(
    best: optuna.trial.FrozenTrial, space: tuple[Dim, ...], beta1: float, display: str, name: str
) -> dict[str, Any]:
    """One arm's entry for Matrix.expand(tuned=...): optimizer overrides in `params`, the rest beside."""
    parts = split_params(space, best.params, beta1)
    return {
        "params": parts["optim"],
        "train": parts["train"],
        "model": parts["model"],
        "source": f"optuna:{display}#{name}/trial{best.number} value={best.value:.6g}",
        "value": best.value,
        "trial": best.number,
        "run_id": best.user_attrs.get(RUN_ATTR),
    }


def best_params_for_arms(
    matrix: Matrix, storage: str | None, study_prefix: str | None = None
) -> dict[str, dict[str, Any]]:
    """Each arm's best trial (lowest finite val/loss_final) -> {"params", "train", "model", "source", ...}.

    `params` are OptimizerConfig overrides (Matrix.expand merges them over the matrix's [optim.NAME]);
    `train` (warmup_frac, warmup_steps=None) and `model` (bias_update_speed) must be applied to the spec's
    TrainConfig and ModelDims. Every arm of the matrix needs a study with a finished trial: tuning one arm
    and not the other would make the comparison unequal, so a missing one is an error.
    """
    st = open_storage(storage, must_exist=True)
    prefix = study_prefix or matrix.name
    out: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    known = set(optuna.get_all_study_names(st.storage))
    for variant, opt in matrix.arms():
        arm = f"{variant}+{opt}"
        name = study_name(prefix, arm)
        if name not in known:
            missing.append(f"{name} (no study)")
            continue
        study = optuna.load_study(study_name=name, storage=st.storage)
        finite = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)
        ]
        if not finite:
            missing.append(f"{name} (no finished trial)")
            continue
        best = min(finite, key=lambda t: (t.value, t.number))
        beta1 = resolve_optimizer(opt, matrix.spec.optim.get(opt, {})).betas[0]
        out[arm] = tuned_entry(best, search_space(variant, opt), beta1, st.display, name)
    if missing:
        raise UserError(
            f"--tuned: {'; '.join(missing)} in {st.display}; run kimi-bench tune --matrix "
            f"{matrix.path} first (every arm needs its study)"
        )
    return out


def summary_table(outcome: TuneOutcome) -> Table:
    table = Table(title=f"tune summary ({outcome.storage})", header_style="bold")
    for col in ("study", "added", "complete", "pruned", "diverged", "failed", "best val loss", "best"):
        table.add_column(col, justify="left" if col == "study" else "right")
    for arm in outcome.studies.values():
        c = arm.counts()
        best = arm.best()
        table.add_row(
            arm.name,
            str(arm.added),
            str(c["complete"] - c["diverged"]),
            str(c["pruned"]),
            str(c["diverged"]),
            str(c["fail"]),
            f"{best.value:.4f}" if best else "-",
            f"#{best.number}" if best else "-",
        )
    return table


def best_params_lines(outcome: TuneOutcome) -> list[str]:
    lines = []
    for arm in outcome.studies.values():
        best = arm.best()
        if best is not None:
            lines.append(f"{arm.name} #{best.number}: {format_params(best.params)}")
    return lines
