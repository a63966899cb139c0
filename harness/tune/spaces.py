"""Search spaces as data: every searched range in one place, and how a trial's params reach a TrialSpec.

Ranges: around the defaults in registry.OPTIMIZER_DEFAULTS / arch.optimizers, wide enough to hold the tiny
and the paper presets' optima. Every arm of a family (adamw; muon, muonclip) searches the same dims; MoE
variants add the router's bias step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import optuna

from harness.errors import UserError
from harness.matrix import Matrix
from harness.registry import TrialSpec, resolve_optimizer

MOE_VARIANTS = ("gpt-moe", "kimi")


@dataclass(frozen=True)
class Dim:
    """One searched hyperparameter: where it goes (optim / train / model field) and its range."""

    name: str
    target: str  # "optim" | "train" | "model"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[str, ...] = ()
    why: str = ""

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> dict[str, Any]:
        if self.choices:
            return {"name": self.name, "target": self.target, "choices": list(self.choices)}
        return {"name": self.name, "target": self.target, "low": self.low, "high": self.high, "log": self.log}


# Ranges: around the defaults in registry.OPTIMIZER_DEFAULTS / arch.optimizers, wide enough to hold the tiny
# and the paper presets' optima. Muon's muon_lr spans both scalings: "original" wants ~0.02 (Keller Jordan),
# "match_rms_adamw" an AdamW-like lr (Moonlight), so one log range 1e-3..1e-1 covers both.
_LR = Dim("lr", "optim", 1e-4, 1e-2, log=True, why="AdamW lr (Muon arms: the AdamW groups' lr)")
_WD = Dim("weight_decay", "optim", 0.0, 0.3,
          why="decoupled weight decay of the AdamW groups (Muon's own stays at its default, 0)")
_WARMUP = Dim("warmup_frac", "train", 0.0, 0.2, why="linear warmup share of the budget (warmup_steps unset)")
SEARCH_SPACES: dict[str, tuple[Dim, ...]] = {
    "adamw": (_LR, _WD, _WARMUP, Dim("beta2", "optim", 0.9, 0.999, why="AdamW beta2 (beta1 kept)")),
    "muon": (
        Dim("muon_lr", "optim", 1e-3, 1e-1, log=True, why="Muon lr (hidden matrices)"),
        _LR, _WD, _WARMUP,
        Dim("momentum", "optim", 0.85, 0.99, why="Muon momentum (Nesterov)"),
        Dim("muon_scaling", "optim", choices=("original", "match_rms_adamw"), why="Muon update scale rule"),
    ),
}
MOE_SPACE: tuple[Dim, ...] = (
    Dim("bias_update_speed", "model", 1e-4, 1e-2, log=True, why="router bias step gamma (K2/V3: 1e-3)"),
)
FAMILY = {"adamw": "adamw", "muon": "muon", "muonclip": "muon"}  # optimizer -> search space


def search_space(variant: str, optimizer: str) -> tuple[Dim, ...]:
    """The searched dims of one arm: its optimizer family's space, plus the router's for MoE variants."""
    if optimizer not in FAMILY:
        raise UserError(f"optimizer {optimizer!r}: no search space; add it to harness.tune.spaces.FAMILY "
                        f"(families: {', '.join(SEARCH_SPACES)})")
    return SEARCH_SPACES[FAMILY[optimizer]] + (MOE_SPACE if variant in MOE_VARIANTS else ())


def arm_search_space(matrix: Matrix, variant: str, optimizer: str) -> tuple[Dim, ...]:
    """search_space with the matrix's [tune.ranges."<arm>"] overrides applied (checked by harness.tune_section)."""
    from harness.tune_section import range_overrides

    ranges = range_overrides(matrix.spec.tune, f"{variant}+{optimizer}")
    return tuple(dataclasses.replace(d, low=ranges[d.name][0], high=ranges[d.name][1]) if d.name in ranges else d
                 for d in search_space(variant, optimizer))


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
    return dataclasses.replace(base, experiment=experiment, optim=optim,
                               train=dataclasses.replace(base.train, **parts["train"]),
                               dims=dataclasses.replace(base.dims, **parts["model"]))


def study_name(prefix: str, arm: str) -> str:
    return f"{prefix}/{arm}"


def space_attr(space: tuple[Dim, ...]) -> list[dict[str, Any]]:
    """The space as JSON-able data (a study user attr and an artifact): a study keeps the space it began with."""
    return [d.describe() for d in space]
