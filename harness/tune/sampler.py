"""The sampler and the pruner of every study.

Sampler: TPE (Optuna's default multivariate TPE for one objective, constant liar for parallel workers) whose
random stream is seeded from (--sampler-seed, trial number), through public Optuna API only: each trial is
sampled by its own `TPESampler(seed=trial_seed(seed, number))`. Trial numbers are unique in a study, so one
worker is reproducible, a resumed study draws what an uninterrupted one would have, two workers sharing a
study never draw the same random start points, and arms with the same search space start from the same
points. TPE keeps no state between trials beyond its random stream (the history is read from the storage),
so a sampler per trial samples what one long-lived, re-seeded sampler would.

Pruning: the trial's evals (every train.eval_interval steps) report val loss to Optuna; the pruner may stop a
trial before its budget (never at step 0 or at the last step). Median (default), Hyperband or none; the choice
is recorded in the study's user attrs.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from harness.spec.registry import TrialSpec, check_choice

PRUNERS = ("median", "hyperband", "none")


def n_startup_trials(target: int) -> int:
    """TPE's random start: a third of the per-arm budget, 2..10 (Optuna's default 10 suits 30+ trials)."""
    return max(2, min(10, target // 3))


def trial_seed(seed: int, number: int) -> int:
    return (seed * 1_000_003 + number) % 2**32


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """A `TPESampler(seed=trial_seed(seed, trial.number), **tpe_kwargs)` for each trial (see the module
    docstring). Built in before_trial, dropped in after_trial; a trial that never got one (sampled before
    before_trial, which Optuna does not do) gets one on first use."""

    def __init__(self, seed: int, **tpe_kwargs: Any):
        self.seed, self.tpe_kwargs = seed, tpe_kwargs
        self._per_trial: dict[int, optuna.samplers.TPESampler] = {}

    def _tpe(self, trial: FrozenTrial) -> optuna.samplers.TPESampler:
        tpe = self._per_trial.get(trial.number)
        if tpe is None:
            tpe = optuna.samplers.TPESampler(seed=trial_seed(self.seed, trial.number), **self.tpe_kwargs)
            self._per_trial[trial.number] = tpe
        return tpe

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._tpe(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._tpe(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._tpe(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._tpe(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: list[float] | None
    ) -> None:
        tpe = self._per_trial.pop(trial.number, None)
        if tpe is not None:
            tpe.after_trial(study, trial, state, values)


def make_sampler(seed: int, target: int) -> optuna.samplers.BaseSampler:
    return TrialSeededTPE(seed, n_startup_trials=n_startup_trials(target), constant_liar=True)


def sampler_description(seed: int, target: int) -> str:
    return (
        f"TPESampler(multivariate, constant_liar, n_startup_trials={n_startup_trials(target)}, "
        f"seed=({seed}, trial number))"
    )


def make_pruner(
    pruner: str | optuna.pruners.BasePruner, target: int, spec: TrialSpec
) -> tuple[optuna.pruners.BasePruner, str]:
    """The pruner and its description (a study user attr). A BasePruner passes through (tests, scripts)."""
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner, type(pruner).__name__
    name = check_choice("--pruner", pruner, PRUNERS)
    if name == "median":
        n = max(2, min(5, target // 4))
        return (
            optuna.pruners.MedianPruner(n_startup_trials=n, n_warmup_steps=0),
            f"median(n_startup_trials={n}, n_warmup_steps=0, checked every eval)",
        )
    if name == "hyperband":
        total = spec.train.total_steps(spec.dims.block_size)
        max_resource: int | str = total if total is not None else "auto"
        hyperband = optuna.pruners.HyperbandPruner(
            min_resource=spec.train.eval_interval, max_resource=max_resource, reduction_factor=3
        )
        return (
            hyperband,
            f"hyperband(min_resource={spec.train.eval_interval}, max_resource={max_resource}, "
            "reduction_factor=3, resource=step)",
        )
    return optuna.pruners.NopPruner(), "none"
