"""Named model variants, optimizers and size presets, and the TrialSpec that ties them to one training run.

A variant is a function of generic dimensions (`ModelDims`): every variant reads the same fields, so a
matrix row logs comparable params (`model.dim`, `model.n_layer`, ...) and `matching.py` can solve one free
dimension per variant against a parameter budget.

| variant  | attention | FFN                          | backbone                                  |
|----------|-----------|------------------------------|-------------------------------------------|
| gpt      | MHA       | GELU MLP 4x                  | nanoGPT: LayerNorm, learned positions, tied head |
| gpt-mla  | MLA       | GELU MLP 4x                  | nanoGPT (only the attention changes)      |
| gpt-moe  | MHA       | MoE (shared + routed SwiGLU) | nanoGPT (only the FFN changes)            |
| kimi     | MLA       | MoE, first n_dense_layers dense SwiGLU | DeepSeek-V3/Kimi-K2: RMSNorm, RoPE, untied head |
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError
from torch import nn

from arch.gpt import GPT, GPTConfig
from arch.kimi import Kimi, KimiConfig
from arch.mla import MLAConfig
from arch.moe import MoEConfig
from arch.optimizers import OPTIMIZERS, OptimizerConfig
from harness.errors import UserError

CODE_VERSION = "1"  # bump when a change alters what a trial computes: it enters every trial key


@dataclass(frozen=True)
class ModelDims:
    """Generic dimensions; each variant uses the subset it needs (see VARIANT_FIELDS)."""

    n_layer: int
    dim: int
    n_heads: int
    block_size: int
    # MLA (gpt-mla, kimi)
    q_lora_rank: int = 0
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # MoE (gpt-moe, kimi)
    n_routed_experts: int = 4
    n_activated_experts: int = 2
    moe_inter_dim: int = 64
    n_shared_experts: int = 1
    shared_inter_dim: int | None = None  # None: n_shared_experts * moe_inter_dim (DeepSeek-V3's convention)
    n_dense_layers: int = 1  # kimi only: leading dense layers (K2: 1, V3: 3)
    dense_inter_dim: int = 0  # kimi's dense SwiGLU width; 0 = 8/3 * dim rounded to 8 (GPT-MLP params)
    score_func: str = "sigmoid"
    route_scale: float = 1.0
    bias_update_speed: float = 1e-3
    aux_loss_alpha: float = 0.0
    # misc
    bias: bool = True  # GPT LayerNorm/Linear biases (nanoGPT default)
    tie_embeddings: bool | None = None  # None: gpt family tied (nanoGPT), kimi untied (K2/V3)
    dropout: float = 0.0
    vocab_size: int | None = None  # None: the tokenizer's vocabulary


COMMON = ("n_layer", "dim", "n_heads", "block_size", "vocab_size", "dropout", "tie_embeddings")
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
MOE_FIELDS = (
    "n_routed_experts", "n_activated_experts", "moe_inter_dim", "n_shared_experts", "shared_inter_dim", "score_func",
    "route_scale", "bias_update_speed", "aux_loss_alpha",
)
VARIANT_FIELDS: dict[str, tuple[str, ...]] = {
    "gpt": COMMON + ("bias",),
    "gpt-mla": COMMON + ("bias",) + MLA_FIELDS,
    "gpt-moe": COMMON + ("bias",) + MOE_FIELDS,
    "kimi": COMMON + MLA_FIELDS + MOE_FIELDS + ("n_dense_layers", "dense_inter_dim"),
}


def dense_swiglu_width(dim: int) -> int:
    """SwiGLU hidden width with the parameters of GPT's 4x GELU MLP (3*d*h = 8*d^2), rounded up to 8."""
    return -(-(8 * dim) // 3 // 8) * 8


def _mla_config(d: ModelDims) -> MLAConfig:
    return MLAConfig(
        dim=d.dim, n_heads=d.n_heads, q_lora_rank=d.q_lora_rank, kv_lora_rank=d.kv_lora_rank,
        qk_nope_head_dim=d.qk_nope_head_dim, qk_rope_head_dim=d.qk_rope_head_dim, v_head_dim=d.v_head_dim,
        max_seq_len=d.block_size, dropout=d.dropout,
    )


def _moe_config(d: ModelDims) -> MoEConfig:
    return MoEConfig(
        dim=d.dim, n_routed_experts=d.n_routed_experts, n_activated_experts=d.n_activated_experts,
        moe_inter_dim=d.moe_inter_dim, n_shared_experts=d.n_shared_experts, shared_inter_dim=d.shared_inter_dim,
        score_func=d.score_func, route_scale=d.route_scale, bias_update_speed=d.bias_update_speed,
        aux_loss_alpha=d.aux_loss_alpha,
    )


def _gpt_config(d: ModelDims, attn: str, mlp: str) -> GPTConfig:
    return GPTConfig(
        block_size=d.block_size, vocab_size=d.vocab_size, n_layer=d.n_layer, n_head=d.n_heads, n_embd=d.dim,
        dropout=d.dropout, bias=d.bias, tie_embeddings=True if d.tie_embeddings is None else d.tie_embeddings,
        attn=attn, mla=_mla_config(d) if attn == "mla" else None,
        mlp=mlp, moe=_moe_config(d) if mlp == "moe" else None,
    )


def _kimi_config(d: ModelDims) -> KimiConfig:
    return KimiConfig(
        vocab_size=d.vocab_size, block_size=d.block_size, n_layer=d.n_layer, dim=d.dim, n_heads=d.n_heads,
        q_lora_rank=d.q_lora_rank, kv_lora_rank=d.kv_lora_rank, qk_nope_head_dim=d.qk_nope_head_dim,
        qk_rope_head_dim=d.qk_rope_head_dim, v_head_dim=d.v_head_dim,
        inter_dim=d.dense_inter_dim or dense_swiglu_width(d.dim), n_dense_layers=d.n_dense_layers,
        n_routed_experts=d.n_routed_experts, n_activated_experts=d.n_activated_experts,
        moe_inter_dim=d.moe_inter_dim, n_shared_experts=d.n_shared_experts, shared_inter_dim=d.shared_inter_dim,
        score_func=d.score_func, route_scale=d.route_scale, bias_update_speed=d.bias_update_speed,
        aux_loss_alpha=d.aux_loss_alpha, tie_embeddings=bool(d.tie_embeddings), dropout=d.dropout,
    )


VARIANTS: dict[str, Callable[[ModelDims], nn.Module]] = {
    "gpt": lambda d: GPT(_gpt_config(d, "mha", "dense")),
    "gpt-mla": lambda d: GPT(_gpt_config(d, "mla", "dense")),
    "gpt-moe": lambda d: GPT(_gpt_config(d, "mha", "moe")),
    "kimi": lambda d: Kimi(_kimi_config(d)),
}

# Size presets. `paper` is the nanoKimi paper's Kimi config (REFERENCES.md: n_layer 6, n_embd 384, 4 heads,
# kv_lora 128, q_lora 192, rope 32, 8 experts top-2 of width 512, a shared expert of width 768, every layer
# MoE, GPT-2 vocabulary, block 1024): 75.1M parameters here against nanoKimi's 75.35M (arch/kimi.py explains
# the 0.23M: nanoKimi's per-head rope keys and biases). Budget matching is what makes the arms comparable.
# A preset's vocab_size (paper: GPT-2's) is kept when it covers the tokenizer's; None takes the tokenizer's.
PRESETS: dict[str, ModelDims] = {
    "tiny": ModelDims(
        n_layer=2, dim=64, n_heads=4, block_size=64, q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=64,
    ),
    "small": ModelDims(
        n_layer=6, dim=320, n_heads=5, block_size=256, q_lora_rank=160, kv_lora_rank=96, qk_nope_head_dim=48,
        qk_rope_head_dim=16, v_head_dim=64, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=320,
    ),
    "paper": ModelDims(
        n_layer=6, dim=384, n_heads=4, block_size=1024, q_lora_rank=192, kv_lora_rank=128,
        qk_nope_head_dim=96, qk_rope_head_dim=32, v_head_dim=96, n_routed_experts=8, n_activated_experts=2,
        moe_inter_dim=512, n_shared_experts=1, shared_inter_dim=768, n_dense_layers=0, vocab_size=50257,
    ),
    "gpt2-124m": ModelDims(
        n_layer=12, dim=768, n_heads=12, block_size=1024, q_lora_rank=384, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8, n_activated_experts=2,
        moe_inter_dim=1024, vocab_size=50304,
    ),
}


def show_key(part) -> str:
    """A field path part as printed: plain names as they are, anything odd (spaces, control chars) quoted."""
    text = str(part)
    return text if text.isprintable() and text and not any(c.isspace() for c in text) else repr(text)


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}(choices: {', '.join(choices)})"


def check_choice(field_name: str, value: str, choices) -> str:
    if value not in choices:
        raise UserError(f"{field_name}: unknown name {value!r}; {suggest(value, tuple(choices))}")
    return value


def resolve_dims(preset: str, vocab_size: int, overrides: dict[str, Any] | None = None) -> ModelDims:
    """Preset dims with the tokenizer's vocabulary and any per-matrix overrides applied."""
    base = PRESETS[check_choice("preset", preset, PRESETS)]
    known = {f.name for f in dataclasses.fields(ModelDims)}
    for key in overrides or {}:
        if key not in known:
            raise UserError(f"model.{show_key(key)}: unknown model field; {suggest(key, sorted(known))}")
    dims = dataclasses.replace(base, **(overrides or {}))
    try:  # types of the overrides (TOML gives any type): pydantic checks them against the dataclass fields
        dims = TypeAdapter(ModelDims).validate_python(dataclasses.asdict(dims))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(show_key(p) for p in err["loc"])
        raise UserError(f"model.{where}: {err['msg']} (got {err.get('input')!r})") from None
    for name in ("n_layer", "dim", "n_heads", "block_size"):
        if getattr(dims, name) <= 0:
            raise UserError(f"model.{name}: must be > 0 (got {getattr(dims, name)})")
    if dims.vocab_size is None:
        return dataclasses.replace(dims, vocab_size=vocab_size)
    if dims.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size: {dims.vocab_size} is smaller than the tokenizer's {vocab_size}; "
                        "raise it or leave it unset")
    return dims


def build_model(variant: str, dims: ModelDims) -> nn.Module:
    check_choice("variant", variant, VARIANTS)
    if dims.vocab_size is None:
        raise UserError("model.vocab_size: not set; it comes from the tokenizer or the preset")
    try:
        return VARIANTS[variant](dims)
    except (ValueError, AssertionError, TypeError) as e:  # config checks inside arch/ raise plain errors
        raise UserError(f"model ({variant}): {e}") from None


def variant_params(variant: str, dims: ModelDims) -> dict[str, Any]:
    """The dims a variant actually uses (what gets logged as `model.*` params)."""
    return {k: getattr(dims, k) for k in VARIANT_FIELDS[variant]}


# Optimizer defaults per registered name; a matrix's [optim.NAME] table overrides any field.
# Sources: AdamW lr 1e-3 / beta2 0.99 for the small char/byte models (nanoGPT shakespeare_char), wd 0.1
# (nanoGPT); Muon lr 0.02, momentum 0.95, Nesterov, 5 NS steps (Keller Jordan's Muon); QK-Clip tau 100
# (Kimi K2 report). Muon arms keep AdamW (same lr) for embeddings, head, gains, biases and the router. Muon's
# own weight decay is 0 with the "original" scaling (Keller Jordan's Muon default): wd 0.1 at lr 0.02 would
# shrink hidden weights 0.2% per step, ~30x AdamW's; with "match_rms_adamw" set muon_weight_decay to AdamW's.
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1},
    "muon": {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1, "muon_lr": 0.02, "muon_weight_decay": 0.0},
    "muonclip": {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1, "muon_lr": 0.02, "muon_weight_decay": 0.0,
                 "qk_clip_tau": 100.0},
}


def resolve_optimizer(name: str, overrides: dict[str, Any] | None = None) -> OptimizerConfig:
    check_choice("optimizer", name, OPTIMIZERS)
    kwargs = {**OPTIMIZER_DEFAULTS.get(name, {}), **(overrides or {})}
    known = {f.name for f in dataclasses.fields(OptimizerConfig)}
    for key in kwargs:
        if key not in known:
            raise UserError(f"optim.{name}.{show_key(key)}: unknown optimizer field; {suggest(key, sorted(known))}")
    try:
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return OptimizerConfig(name=name, **kwargs)
    except (ValueError, TypeError) as e:  # arch/ checks raise plain errors that name "optim.<field>"
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if message.startswith("optim."):
            message = f"optim.{name}." + message.removeprefix("optim.")
        else:
            message = f"optim.{name}: {message}"
        raise UserError(message) from None


@dataclass(frozen=True)
class TrainConfig:
    """Budget, batch and schedule of one trial; identical across the arms of a matrix."""

    steps: int | None = None  # exactly one of steps / tokens / seconds sets the budget
    tokens: int | None = None
    seconds: float | None = None
    micro_batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int | None = None  # None: warmup_frac of the step budget
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (nanoGPT: min_lr = lr / 10)
    grad_clip: float = 1.0  # 0 disables clipping; grad/norm is always measured before clipping
    eval_interval: int = 50
    eval_tokens: int = 65536  # the fixed validation set: the first eval_tokens tokens of the val split
    log_interval: int = 10  # steps between metric flushes (no host sync in between on CUDA)
    checkpoint_interval: int = 0  # 0: only at the end; >0 every N steps (resume points)
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    infer_batch_sizes: tuple[int, ...] = (1, 8)
    infer_new_tokens: int = 32

    def tokens_per_step(self, block_size: int, world_size: int = 1) -> int:
        return self.micro_batch_size * self.grad_accum * world_size * block_size

    def total_steps(self, block_size: int, world_size: int = 1) -> int | None:
        """Step budget; None for a wall-clock budget (the schedule then runs on elapsed time)."""
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, self.tokens // self.tokens_per_step(block_size, world_size))
        return None


@dataclass(frozen=True)
class TrialSpec:
    """Everything that determines one training run. Its key identifies the run across reruns."""

    experiment: str
    variant: str
    optimizer: str
    preset: str
    seed: int
    dims: ModelDims
    optim: OptimizerConfig
    train: TrainConfig
    data: dict[str, Any] = field(default_factory=dict)  # DataConfig fields (cache_dir excluded)
    data_seed: int | None = None  # None: same as seed; separate so data order and init can vary apart
    tuned_from: str | None = None

    @property
    def arm(self) -> str:
        return f"{self.variant}+{self.optimizer}"

    @property
    def name(self) -> str:
        return f"{self.arm} {self.preset} s{self.seed}"

    def flat_params(self) -> dict[str, Any]:
        """The resolved spec as MLflow params (`model.*`, `optim.*`, `train.*`, `data.*`)."""
        out: dict[str, Any] = {"variant": self.variant, "optimizer": self.optimizer, "preset": self.preset,
                               "seed": self.seed, "data_seed": self.effective_data_seed}
        out.update({f"model.{k}": v for k, v in variant_params(self.variant, self.dims).items()})
        out.update({f"optim.{k}": v for k, v in dataclasses.asdict(self.optim).items()})
        out.update({f"train.{k}": v for k, v in dataclasses.asdict(self.train).items()})
        out.update({f"data.{k}": v for k, v in self.data.items()})
        return out

    @property
    def effective_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def key(self, data_hash: str) -> str:
        """Hash of the resolved spec + data hash + code version (device/compile excluded: same trial)."""
        params = self.flat_params()
        for cosmetic in ("train.device", "train.compile", "train.log_interval", "train.checkpoint_interval"):
            params.pop(cosmetic, None)
        blob = json.dumps({"spec": params, "data": data_hash, "code": CODE_VERSION, "exp": self.experiment},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
