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
import functools
import hashlib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import nn

from arch.common import default_of
from arch.gpt import GPT, GPTConfig
from arch.kimi import Kimi, KimiConfig
from arch.mla import MLAConfig
from arch.moe import MoEConfig
from arch.muon import ADJUST_LR_FNS
from arch.optimizers import OPTIMIZERS, OptimizerConfig
from harness import schema
from harness.errors import UserError, show_key, suggest

__all__ = ["suggest", "show_key"]  # re-exported for callers that imported them from here

BUDGET_FIELDS = ("steps", "tokens", "seconds")
CODE_VERSION = "1"  # bump when a change alters what a trial computes: it enters every trial key


def _kimi(name: str):
    return default_of(KimiConfig, name)


@dataclass(frozen=True)
class ModelDims:
    """Generic dimensions; each variant uses the subset it needs (see VARIANT_FIELDS)."""

    n_layer: int
    dim: int
    n_heads: int
    block_size: int
    # MLA (gpt-mla, kimi) and MoE (gpt-moe, kimi): defaults are KimiConfig's (which takes the routing ones from
    # MoEConfig), written once there; every preset below sets the sizes it needs.
    q_lora_rank: int = _kimi("q_lora_rank")
    kv_lora_rank: int = _kimi("kv_lora_rank")
    qk_nope_head_dim: int = _kimi("qk_nope_head_dim")
    qk_rope_head_dim: int = _kimi("qk_rope_head_dim")
    v_head_dim: int = _kimi("v_head_dim")
    n_routed_experts: int = _kimi("n_routed_experts")
    n_activated_experts: int = _kimi("n_activated_experts")
    moe_inter_dim: int = _kimi("moe_inter_dim")
    n_shared_experts: int = _kimi("n_shared_experts")
    shared_inter_dim: int | None = _kimi("shared_inter_dim")  # None: n_shared_experts * moe_inter_dim
    n_dense_layers: int = _kimi("n_dense_layers")  # kimi only: leading dense layers (K2: 1, V3: 3)
    dense_inter_dim: int = 0  # kimi's dense SwiGLU width; 0 = 8/3 * dim rounded to 8 (GPT-MLP params)
    score_func: str = _kimi("score_func")
    route_scale: float = _kimi("route_scale")
    bias_update_speed: float = _kimi("bias_update_speed")
    aux_loss_alpha: float = _kimi("aux_loss_alpha")
    # misc
    bias: bool = True  # GPT LayerNorm/Linear biases (nanoGPT default)
    tie_embeddings: bool | None = None  # None: gpt family tied (nanoGPT), kimi untied (K2/V3)
    dropout: float = _kimi("dropout")
    vocab_size: int | None = None  # None: the tokenizer's vocabulary


COMMON = ("n_layer", "dim", "n_heads", "block_size", "vocab_size", "dropout", "tie_embeddings")
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
MOE_FIELDS = (
    "n_routed_experts",
    "n_activated_experts",
    "moe_inter_dim",
    "n_shared_experts",
    "shared_inter_dim",
    "score_func",
    "route_scale",
    "bias_update_speed",
    "aux_loss_alpha",
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


def arch_config(cls: type, d: ModelDims, **renamed: Any):
    """An arch/ config dataclass from the dims: every field both share by name is copied, `renamed` gives the
    rest (fields the arch config spells differently or derives); the arch config's own defaults fill the remainder
    (e.g. rope_theta)."""
    dims_fields = {f.name for f in dataclasses.fields(ModelDims)}
    shared = {f.name: getattr(d, f.name) for f in dataclasses.fields(cls) if f.name in dims_fields}
    return cls(**{**shared, **renamed})


def _gpt_config(d: ModelDims, attn: str, mlp: str) -> GPTConfig:
    return arch_config(
        GPTConfig,
        d,
        n_head=d.n_heads,
        n_embd=d.dim,
        tie_embeddings=True if d.tie_embeddings is None else d.tie_embeddings,
        attn=attn,
        mla=arch_config(MLAConfig, d, max_seq_len=d.block_size) if attn == "mla" else None,
        mlp=mlp,
        moe=arch_config(MoEConfig, d) if mlp == "moe" else None,
    )


def _kimi_config(d: ModelDims) -> KimiConfig:
    return arch_config(
        KimiConfig, d, inter_dim=d.dense_inter_dim or dense_swiglu_width(d.dim), tie_embeddings=bool(d.tie_embeddings)
    )


VARIANTS: dict[str, Callable[[ModelDims], nn.Module]] = {
    "gpt": lambda d: GPT(_gpt_config(d, "mha", "dense")),
    "gpt-mla": lambda d: GPT(_gpt_config(d, "mla", "dense")),
    "gpt-moe": lambda d: GPT(_gpt_config(d, "mha", "moe")),
    "kimi": lambda d: Kimi(_kimi_config(d)),
}

# Size presets. `paper` is the nanoKimi paper's Kimi config (docs/references.md: n_layer 6, n_embd 384, 4 heads,
# kv_lora 128, q_lora 192, rope 32, 8 experts top-2 of width 512, a shared expert of width 768, every layer
# MoE, GPT-2 vocabulary, block 1024): 75.1M parameters here against nanoKimi's 75.35M (arch/kimi.py explains
# the 0.23M: nanoKimi's per-head rope keys and biases). Budget matching is what makes the arms comparable.
# A preset's vocab_size (paper: GPT-2's) is kept when it covers the tokenizer's; None takes the tokenizer's.
PRESETS: dict[str, ModelDims] = {
    # micro < tiny < mini: three CPU-sized models for a loss-vs-compute fit in minutes (scaling-cpu.toml)
    "micro": ModelDims(
        n_layer=2,
        dim=32,
        n_heads=2,
        block_size=64,
        q_lora_rank=0,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        n_activated_experts=2,
        moe_inter_dim=32,
    ),
    "tiny": ModelDims(
        n_layer=2,
        dim=64,
        n_heads=4,
        block_size=64,
        q_lora_rank=0,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        n_activated_experts=2,
        moe_inter_dim=64,
    ),
    "mini": ModelDims(
        n_layer=3,
        dim=96,
        n_heads=4,
        block_size=64,
        q_lora_rank=0,
        kv_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=24,
        n_routed_experts=4,
        n_activated_experts=2,
        moe_inter_dim=96,
    ),
    "small": ModelDims(
        n_layer=6,
        dim=320,
        n_heads=5,
        block_size=256,
        q_lora_rank=160,
        kv_lora_rank=96,
        qk_nope_head_dim=48,
        qk_rope_head_dim=16,
        v_head_dim=64,
        n_routed_experts=8,
        n_activated_experts=2,
        moe_inter_dim=320,
    ),
    "paper": ModelDims(
        n_layer=6,
        dim=384,
        n_heads=4,
        block_size=1024,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=96,
        qk_rope_head_dim=32,
        v_head_dim=96,
        n_routed_experts=8,
        n_activated_experts=2,
        moe_inter_dim=512,
        n_shared_experts=1,
        shared_inter_dim=768,
        n_dense_layers=0,
        vocab_size=50257,
    ),
    "gpt2-124m": ModelDims(
        n_layer=12,
        dim=768,
        n_heads=12,
        block_size=1024,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=8,
        n_activated_experts=2,
        moe_inter_dim=1024,
        vocab_size=50304,
    ),
}


def check_choice(field_name: str, value: str, choices) -> str:
    if value not in choices:
        raise UserError(f"{field_name}: unknown name {value!r}; {suggest(value, tuple(choices))}")
    return value


@functools.cache
def _adapter(hint: Any) -> TypeAdapter:
    return TypeAdapter(hint)


def check_fields(cls: type, values: dict[str, Any], where: str, kind: str) -> dict[str, Any]:
    """Validate user-typed values against a dataclass's field types (strict: no "5" for 5, no true for 1; an
    int is a valid float, a TOML array a valid tuple). Unknown names get a suggestion; errors read
    `<where>.<field>: problem (got value)`."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"{where}.{show_key(key)}: unknown {kind} field; {suggest(key, sorted(known))}")
        if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        try:
            out[key] = _adapter(hints[key]).validate_python(value, strict=True)
        except ValidationError as e:
            err = e.errors()[0]
            raise UserError(f"{where}.{key}: {err['msg'].lower()} (got {value!r})") from None
    return out


def resolve_dims(preset: str, vocab_size: int, overrides: dict[str, Any] | None = None) -> ModelDims:
    """Preset dims with the tokenizer's vocabulary and any per-matrix overrides applied."""
    base = PRESETS[check_choice("preset", preset, PRESETS)]
    dims = dataclasses.replace(base, **check_fields(ModelDims, dict(overrides or {}), "model", "model"))
    for name in ("n_layer", "dim", "n_heads", "block_size"):
        if getattr(dims, name) <= 0:
            raise UserError(f"model.{name}: must be > 0 (got {getattr(dims, name)})")
    if dims.vocab_size is None:
        return dataclasses.replace(dims, vocab_size=vocab_size)
    if dims.vocab_size < vocab_size:
        raise UserError(
            f"model.vocab_size: {dims.vocab_size} is smaller than the tokenizer's {vocab_size}; "
            "raise it or leave it unset"
        )
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


def shape_key(variant: str, dims: ModelDims) -> str:
    """12 hex digits of sha256 over the variant and its model params as logged (`model.*`): two optimizers on
    one architecture and dims share it. Recipe: sha256(json.dumps({"variant": v, "model.<field>": value, ...},
    sort_keys=True, default=str))."""
    blob = {"variant": variant, **{f"model.{k}": v for k, v in variant_params(variant, dims).items()}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


# A view of the optimizer defaults, one entry per registered name. They are defined once, on
# arch.optimizers.OptimizerConfig (with their sources); a matrix's [optim.NAME] table overrides any field.
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    name: {k: v for k, v in dataclasses.asdict(OptimizerConfig(name=name)).items() if k != "name"}
    for name in OPTIMIZERS
}


def resolve_optimizer(name: str, overrides: dict[str, Any] | None = None) -> OptimizerConfig:
    """OptimizerConfig(name, **overrides), every field checked here first so each error is one line with a
    suggestion (arch/ raises plain errors: it cannot import the harness's helpers)."""
    check_choice("optimizer", name, OPTIMIZERS)
    fields = check_fields(
        OptimizerConfig, {k: v for k, v in (overrides or {}).items() if k != "name"}, f"optim.{name}", "optimizer"
    )
    if "muon_scaling" in fields:
        check_choice(f"optim.{name}.muon_scaling", fields["muon_scaling"], ADJUST_LR_FNS)
    try:
        return OptimizerConfig(name=name, **fields)
    except (ValueError, TypeError) as e:  # arch/ checks raise plain errors that name "optim.<field>"
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if message.startswith("optim."):
            message = f"optim.{name}." + message.removeprefix("optim.")
        else:
            message = f"optim.{name}: {message}"
        raise UserError(message) from None


# Field types of the user-typed configs: strict (TOML's "5" is not 5, true is not 1; an int is a valid float).
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
Fraction = Annotated[float, Strict(), Field(ge=0, lt=1)]


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class TrainConfig:
    """Budget, batch and schedule of one trial; identical across the arms of a matrix.

    The one definition of the [train] table: the TOML loader validates it (pydantic, on construction and on
    dataclasses.replace) and the trial reads it. Defaults follow nanoGPT's train.py unless noted.
    """

    steps: PositiveInt | None = None  # exactly one of steps / tokens / seconds sets the budget
    tokens: PositiveInt | None = None
    seconds: Annotated[float, Strict(), Field(gt=0)] | None = None
    micro_batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    warmup_steps: NonNegInt | None = None  # None: warmup_frac of the step budget
    warmup_frac: Fraction = 0.05  # this project's choice: 5% of the budget, scale-free (nanoGPT: 2000 of 600k)
    min_lr_ratio: Annotated[float, Strict(), Field(ge=0, le=1)] = 0.1  # cosine decays to lr * 0.1 (nanoGPT)
    # "wsd": warmup, constant, then linear decay over the last cooldown_frac (compute-to-target reads the constant
    # phase: docs/verdicts.md); "cosine" (nanoGPT's) stays the default so existing trials keep their keys
    schedule: Literal["cosine", "wsd"] = "cosine"
    cooldown_frac: Annotated[float, Strict(), Field(gt=0, le=1)] = 0.2
    grad_clip: Annotated[float, Strict(), Field(ge=0)] = 1.0  # 0 disables clipping; grad/norm is measured before
    eval_interval: PositiveInt = 50
    eval_tokens: PositiveInt = 65536  # the fixed validation set: the first eval_tokens tokens of the val split
    log_interval: PositiveInt = 10  # steps between metric flushes (no host sync in between on CUDA)
    checkpoint_interval: NonNegInt = 0  # 0: only at the end; >0 every N steps (resume points)
    device: Annotated[str, Strict()] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: Annotated[bool, Strict()] = False
    infer_batch_sizes: tuple[PositiveInt, ...] = (1, 8)
    infer_new_tokens: PositiveInt = 32

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        given = [k for k in BUDGET_FIELDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one budget of steps / tokens / seconds (got {', '.join(given) or 'none'})")
        return self

    def tokens_per_step(self, block_size: int, world_size: int = 1) -> int:
        return self.micro_batch_size * self.grad_accum * world_size * block_size

    def total_steps(self, block_size: int, world_size: int = 1) -> int | None:
        """Step budget; None for a wall-clock budget (the schedule then runs on elapsed time)."""
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, self.tokens // self.tokens_per_step(block_size, world_size))
        return None


def _train_params(train: TrainConfig) -> dict[str, Any]:
    """The [train] fields as params; a cosine schedule omits schedule/cooldown_frac (cooldown means nothing
    there), so trials from before the schedule option keep their keys and their groups."""
    out = dataclasses.asdict(train)
    if out["schedule"] == "cosine":
        out.pop("schedule")
        out.pop("cooldown_frac")
    return out


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
        top = {
            "variant": self.variant,
            "optimizer": self.optimizer,
            "preset": self.preset,
            "seed": self.seed,
            "data_seed": self.effective_data_seed,
        }
        return schema.flatten_params(
            top,
            {
                "model": variant_params(self.variant, self.dims),
                "optim": dataclasses.asdict(self.optim),
                "train": _train_params(self.train),
                "data": self.data,
            },
        )

    @property
    def effective_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def key(self, data_hash: str) -> str:
        """Hash of the resolved spec + data hash + code version (device/compile excluded: same trial)."""
        return schema.trial_key(self.flat_params(), data_hash, CODE_VERSION, self.experiment)
