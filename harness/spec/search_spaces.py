"""Search spaces as data: every searched range of a tuning study, one tuple of Dims per optimizer family.

Ranges: around the defaults in registry.OPTIMIZER_DEFAULTS / arch.optimizers, wide enough to hold the tiny
and the paper presets' optima. Every arm of a family (adamw; muon, muonclip) searches the same dims; MoE
variants add the router's bias step. harness.tune.spaces turns them into Optuna suggestions and TrialSpecs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.errors import UserError

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

    def suggest(self, trial) -> Any:  # an optuna.Trial
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
_WD = Dim(
    "weight_decay",
    "optim",
    0.0,
    0.3,
    why="decoupled weight decay of the AdamW groups (Muon's own stays at its default, 0)",
)
_WARMUP = Dim("warmup_frac", "train", 0.0, 0.2, why="linear warmup share of the budget (warmup_steps unset)")
SEARCH_SPACES: dict[str, tuple[Dim, ...]] = {
    "adamw": (_LR, _WD, _WARMUP, Dim("beta2", "optim", 0.9, 0.999, why="AdamW beta2 (beta1 kept)")),
    "muon": (
        Dim("muon_lr", "optim", 1e-3, 1e-1, log=True, why="Muon lr (hidden matrices)"),
        _LR,
        _WD,
        _WARMUP,
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
        raise UserError(
            f"optimizer {optimizer!r}: no search space; add it to harness.spec.search_spaces.FAMILY "
            f"(families: {', '.join(SEARCH_SPACES)})"
        )
    return SEARCH_SPACES[FAMILY[optimizer]] + (MOE_SPACE if variant in MOE_VARIANTS else ())
