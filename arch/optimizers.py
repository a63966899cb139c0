"""Optimizer construction: which tensor is trained by Muon and which by AdamW, and with what defaults.

Param groups follow an ordered rule list (torchtitan style): the first rule whose name pattern and
dimension condition match a parameter decides its group. With name="adamw" every tensor goes to AdamW
(the two Muon groups fold into "adamw"), which is exactly nanoGPT's configure_optimizers.

| # | matches (parameter name / ndim)                            | group          | weight decay |
|---|------------------------------------------------------------|----------------|--------------|
| 1 | `wte.weight`, `wpe.weight`, `embed.weight`                 | adamw          | yes          |
| 2 | `lm_head.weight`, `head.weight`                            | adamw          | yes          |
| 3 | `gate.weight` (MoE router, [E, dim])                       | adamw          | yes          |
| 4 | ndim < 2: norm gains, biases                               | adamw_no_decay | no           |
| 5 | `attn.c_attn.weight` (nanoGPT's fused q,k,v, [3C, C])      | muon_qkv       | yes          |
| 6 | ndim >= 2: attention, MLP, shared expert, stacked experts  | muon           | yes          |

Why:
1, 2. "Muon is an optimizer for the hidden weights of a neural network. Other parameters, such as
   embeddings, classifier heads, and hidden gains/biases should be optimized using standard AdamW"
   (Keller Jordan, Muon README; its exclude table is exactly the token embedding and lm_head).
   Position embeddings are embeddings too. Moonlight's example script (MoonshotAI/Moonlight) sends
   p.ndim >= 2 minus embed_tokens and lm_head to Muon, the same split.
3. This project's choice, not from a source: the router has only E rows (8 in nanoKimi), and
   orthogonalizing would equalize the update over every expert's score direction whatever its
   gradient. A recipe that sends every hidden matrix to Muon would give it to Muon.
4. Muon needs matrices (README above). No decay on gains/biases: nanoGPT's rule (the Muon README's
   example decays them at 0.01).
5. Muon with split=3: W_q, W_k, W_v are orthogonalized as three [C, C] matrices, as if stored apart
   (modded-nanogpt stores them as one [3, C, C] tensor). `muon_split_qkv=False` folds it into "muon".
6. Hidden matrices. A 3-D expert tensor [E, m, n] is E matrices, each orthogonalized on its own.

Weight decay (nanoGPT's rule): every >= 2-D weight decays, including the embeddings (nanoGPT decays
the tied wte/lm_head and wpe since they are 2-D), gains and biases do not. AdamW applies
p *= 1 - lr * wd; Muon applies p *= 1 - muon_lr * muon_weight_decay (unscaled muon_lr, like
torch.optim.Muon and Moonlight).

Defaults: the ones below are the tool's (a matrix's [optim.NAME] table overrides any field; kimi-bench
defines no other layer of defaults). Sources, more in docs/references.md:
- lr 1e-3, betas (0.9, 0.99): nanoGPT's shakespeare_char config, the recipe for small char/byte models
  (its GPT-2 124M recipe uses lr 6e-4, betas (0.9, 0.95): set them in the matrix at that scale).
  weight_decay 0.1: nanoGPT train.py. eps 1e-8: torch.optim.AdamW's default. In the Muon arms lr and
  weight_decay are those of the AdamW groups (embeddings, head, router, gains and biases).
- Muon momentum 0.95, Nesterov, 5 Newton-Schulz steps, muon_lr 0.02 with scale max(1, rows/cols)**0.5
  (muon_scaling "original"): Keller Jordan's Muon (github.com/KellerJordan/Muon).
- muon_scaling "match_rms_adamw": lr * 0.2 * sqrt(max(rows, cols)), so the update RMS matches AdamW's and
  AdamW's lr carries over (Moonlight, "Muon is Scalable for LLM Training", arXiv 2502.16982): muon_lr
  then defaults to lr.
- muon_weight_decay 0 (Keller Jordan's Muon default): wd 0.1 at muon_lr 0.02 would shrink the hidden
  weights 0.2% per step, ~20x AdamW's at lr 1e-3. Moonlight pairs "match_rms_adamw" with AdamW's weight
  decay: set muon_weight_decay = weight_decay for that recipe.
- qk_clip_tau 100: Kimi K2 report (MuonClip, Algorithm 1).
muon_lr and muon_weight_decay are given for the Muon arms (they are None, unused, for "adamw"), so what
a run logs is what it used.

Errors: arch/ does not import harness/, so invalid fields raise ValueError with a one-line
"optim.<field>: problem; choices" message; the harness checks names first (with a "did you mean")
and re-raises the rest as harness.errors.UserError.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from arch.muon import ADJUST_LR_FNS, Muon, enable_max_logit_tracking


class Rule(NamedTuple):
    pattern: str  # regex searched in the parameter name ("" matches every name)
    ndim: str  # "any" | "<2" | ">=2"
    group: str
    why: str


PARAM_RULES: list[Rule] = [
    Rule(r"(^|\.)(wte|wpe|embed)\.weight$", "any", "adamw", "embedding: lookup table, not a hidden layer"),
    Rule(r"(^|\.)(lm_head|head)\.weight$", "any", "adamw", "output layer"),
    Rule(r"(^|\.)gate\.weight$", "any", "adamw", "MoE router"),
    Rule(r"", "<2", "adamw_no_decay", "norm gain or bias"),
    Rule(r"(^|\.)attn\.c_attn\.weight$", ">=2", "muon_qkv", "fused q,k,v: three matrices"),
    Rule(r"", ">=2", "muon", "hidden matrix"),
]
GROUPS = ("muon", "muon_qkv", "adamw", "adamw_no_decay")


def _matches(rule: Rule, name: str, p: torch.Tensor) -> bool:
    ndim_ok = {"any": True, "<2": p.ndim < 2, ">=2": p.ndim >= 2}[rule.ndim]
    return ndim_ok and re.search(rule.pattern, name) is not None


def classify(name: str, p: torch.Tensor, split_qkv: bool = True) -> str:
    """The Muon-arm group of one parameter: the first matching rule in PARAM_RULES."""
    for rule in PARAM_RULES:
        if _matches(rule, name, p):
            return "muon" if rule.group == "muon_qkv" and not split_qkv else rule.group
    raise AssertionError(f"no rule matched {name}")  # unreachable: the last two rules cover every ndim


MUON_FAMILY = ("muon", "muonclip")
MUON_LR_ORIGINAL = 0.02  # Keller Jordan's Muon lr with the "original" scale
MUON_WEIGHT_DECAY = 0.0  # Keller Jordan's Muon default (see the module docstring)


@dataclass
class OptimizerConfig:
    """One optimizer arm; every default here is the tool's (sources in the module docstring)."""

    name: str = "adamw"  # "adamw" | "muon" | "muonclip"
    lr: float = 1e-3  # AdamW lr; in the muon arms, the lr of the AdamW groups
    muon_lr: float | None = None  # Muon arms, when not given: 0.02 ("original") or lr ("match_rms_adamw")
    weight_decay: float = 0.1
    muon_weight_decay: float | None = None  # Muon arms, when not given: 0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    muon_scaling: str = "original"  # "original" | "match_rms_adamw"
    muon_split_qkv: bool = True  # orthogonalize nanoGPT's fused c_attn as W_q, W_k, W_v
    qk_clip_tau: float = 100.0  # MuonClip only
    fused: bool | None = None  # AdamW kernels; None: fused on CUDA

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.validate()
        if self.name in MUON_FAMILY:  # written out, so the logged params are the values used
            if self.muon_lr is None:
                self.muon_lr = self.lr if self.muon_scaling == "match_rms_adamw" else MUON_LR_ORIGINAL
            if self.muon_weight_decay is None:
                self.muon_weight_decay = MUON_WEIGHT_DECAY

    def validate(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(unknown_name_message("optim.name", self.name, OPTIMIZERS))
        if self.muon_scaling not in ADJUST_LR_FNS:
            raise ValueError(unknown_name_message("optim.muon_scaling", self.muon_scaling, ADJUST_LR_FNS))
        for field in ("lr", "muon_lr", "qk_clip_tau"):
            value = getattr(self, field)
            if value is not None and not value > 0:
                raise ValueError(f"optim.{field}: must be > 0, got {value}")
        for field in ("weight_decay", "muon_weight_decay", "eps"):
            value = getattr(self, field)
            if value is not None and value < 0:
                raise ValueError(f"optim.{field}: must be >= 0, got {value}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas: need two values in [0, 1), got {self.betas}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"optim.momentum: must be in [0, 1), got {self.momentum}")
        if self.ns_steps < 1:
            raise ValueError(f"optim.ns_steps: must be >= 1, got {self.ns_steps}")

    @property
    def resolved_muon_lr(self) -> float:
        if self.muon_lr is not None:
            return self.muon_lr
        return self.lr if self.muon_scaling == "match_rms_adamw" else MUON_LR_ORIGINAL

    @property
    def resolved_muon_weight_decay(self) -> float:
        return MUON_WEIGHT_DECAY if self.muon_weight_decay is None else self.muon_weight_decay

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        self.validate()
        return OPTIMIZERS[self.name](model, self)


def unknown_name_message(field: str, value: str, choices) -> str:
    """One line: the bad value and all choices (the harness adds a "did you mean" before it gets here)."""
    return f"{field}: unknown {value!r}; choices: {', '.join(choices)}"


# ----------------------------------------------------------------------------- grouping


def _named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # named_parameters() yields a tied tensor once, under its first name (GPT: transformer.wte.weight).
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _arm_group(group: str, cfg: OptimizerConfig) -> str:
    """AdamW arm: the Muon groups become ordinary decayed AdamW weights (nanoGPT)."""
    if cfg.name == "adamw" and group in ("muon", "muon_qkv"):
        return "adamw"
    return group


def assign_params(model: nn.Module, cfg: OptimizerConfig) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Group name -> [(param name, param)], every trainable parameter exactly once."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, p in _named_trainable(model):
        groups[_arm_group(classify(name, p, cfg.muon_split_qkv), cfg)].append((name, p))
    return groups


def describe_param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """[(param name, group, shape)] in model order, for printing."""
    return [
        (n, _arm_group(classify(n, p, cfg.muon_split_qkv), cfg), tuple(p.shape)) for n, p in _named_trainable(model)
    ]


def _adamw_groups(groups, cfg: OptimizerConfig) -> list[dict]:
    specs = [("adamw", cfg.weight_decay), ("adamw_no_decay", 0.0)]
    return [dict(params=[p for _, p in groups[g]], weight_decay=wd, name=g) for g, wd in specs if groups[g]]


def _fused(model: nn.Module, cfg: OptimizerConfig) -> bool:
    if cfg.fused is not None:
        return cfg.fused
    return all(p.is_cuda and p.is_floating_point() for p in model.parameters())


def build_adamw(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """nanoGPT's configure_optimizers: torch.optim.AdamW, decay on >= 2-D weights only."""
    groups = assign_params(model, cfg)
    return torch.optim.AdamW(
        _adamw_groups(groups, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=_fused(model, cfg) or None
    )


def build_muon(model: nn.Module, cfg: OptimizerConfig) -> Muon:
    """One Muon optimizer: Muon groups for hidden matrices, AdamW groups for the rest."""
    groups = assign_params(model, cfg)
    muon_groups = [
        dict(params=[p for _, p in groups[g]], use_muon=True, split=split, name=g)
        for g, split in (("muon", 1), ("muon_qkv", 3))
        if groups[g]
    ]
    adamw_groups = [dict(g, use_muon=False) for g in _adamw_groups(groups, cfg)]
    return Muon(
        muon_groups + adamw_groups,
        lr=cfg.resolved_muon_lr,
        weight_decay=cfg.resolved_muon_weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        ns_steps=cfg.ns_steps,
        adjust_lr_fn=cfg.muon_scaling,
        adamw_lr=cfg.lr,
        adamw_betas=cfg.betas,
        adamw_eps=cfg.eps,
        fused=_fused(model, cfg),
    )


def build_muonclip(model: nn.Module, cfg: OptimizerConfig) -> Muon:
    """Muon + QK-Clip after every step (Kimi K2): turns on max-logit tracking in every attention module.

    The stats of the last clip are in `optimizer.last_qk_clip` ({"max_logit", "heads_clipped", "modules"}).
    """
    opt = build_muon(model, cfg)
    if enable_max_logit_tracking(model, True) == 0:
        raise ValueError(
            "optim.name: 'muonclip' needs attention modules with track_max_logit/qk_clip_; "
            "this model has none, use 'muon'"
        )
    opt.qk_clip_model = model
    opt.qk_clip_tau = cfg.qk_clip_tau
    return opt


OPTIMIZERS: dict[str, Callable[[nn.Module, OptimizerConfig], torch.optim.Optimizer]] = {
    "adamw": build_adamw,
    "muon": build_muon,
    "muonclip": build_muonclip,
}
