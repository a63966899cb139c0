"""Search spaces as data: every searched range in one place, and how a trial's params reach a TrialSpec.

Ranges: around the defaults in registry.OPTIMIZER_DEFAULTS / arch.optimizers, wide enough to hold the tiny
and the paper presets' optima. Every arm of a family (adamw; muon, muonclip) searches the same dims; MoE
variants add the router's bias step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from harness.spec.matrix import Matrix
from harness.spec.registry import TrialSpec, resolve_optimizer

# the data of the spaces lives in the spec layer (a matrix's [tune] section is checked against it)
from harness.spec.search_spaces import (  # noqa: E402, F401  (re-exported)
    FAMILY,
    MOE_SPACE,
    MOE_VARIANTS,
    SEARCH_SPACES,
    Dim,
    search_space,
)
from harness.spec.tune_section import range_overrides


def arm_search_space(matrix: Matrix, variant: str, optimizer: str) -> tuple[Dim, ...]:
    """search_space with the matrix's [tune.ranges."<arm>"] overrides applied (checked by harness.spec.tune_section)."""
    ranges = range_overrides(matrix.spec.tune, f"{variant}+{optimizer}")
    return tuple(
        dataclasses.replace(d, low=ranges[d.name][0], high=ranges[d.name][1]) if d.name in ranges else d
        for d in search_space(variant, optimizer)
    )


def split_params(space: tuple[Dim, ...], params: dict[str, Any], beta1: float) -> dict[str, dict[str, Any]]:
    """Optuna params -> {"optim": OptimizerConfig overrides, "train": TrainConfig fields, "model": dims}."""
    out: dict[str, dict[str, Any]] = {"optim": {}, "train": {}, "model": {}}
    for dim in space:
        if dim.name not in params:
            continue
        value = params[dim.name]
        if dim.name == "beta2":
            out["optim"]["betas"] = (beta1, value)
        else:
            out[dim.target][dim.name] = value
    if "warmup_frac" in out["train"]:
        out["train"]["warmup_steps"] = None  # a fixed warmup_steps would override the tuned fraction
    return out


def apply_params(base: TrialSpec, matrix: Matrix, params: dict[str, Any], experiment: str) -> TrialSpec:
    """The arm's base spec with one trial's params applied (optimizer rebuilt from the matrix's overrides)."""
    parts = split_params(search_space(base.variant, base.optimizer), params, base.optim.betas[0])
    optim = resolve_optimizer(base.optimizer, {**matrix.spec.optim.get(base.optimizer, {}), **parts["optim"]})
    return dataclasses.replace(
        base,
        experiment=experiment,
        optim=optim,
        train=dataclasses.replace(base.train, **parts["train"]),
        dims=dataclasses.replace(base.dims, **parts["model"]),
    )


def study_name(prefix: str, arm: str) -> str:
    return f"{prefix}/{arm}"


def space_attr(space: tuple[Dim, ...]) -> list[dict[str, Any]]:
    """The space as JSON-able data (a study user attr and an artifact): a study keeps the space it began with."""
    return [d.describe() for d in space]
