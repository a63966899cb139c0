"""Kimi-K2 / DeepSeek-V3 style language model: MLA attention + MoE feed-forward, RMSNorm pre-norm blocks.

    x = embed(idx)                                   (no position embedding: RoPE lives inside MLA)
    for each layer:  x = x + attn(attn_norm(x));  x = x + ffn(ffn_norm(x))
    logits = head(norm(x))
The first `n_dense_layers` blocks use a dense SwiGLU FFN, the rest a MoE (routed + shared experts).
Parameter names follow DeepSeek-V3's reference code (see docs/references.md), so optimizer rules match on them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from arch.common import Cache, RMSNorm, SwiGLU, _init_all_weights, default_of, logits_and_loss
from arch.mla import MLA, MLAConfig
from arch.moe import MoE, MoEConfig, moe_modules


@dataclass
class KimiConfig:
    # Sizes default to a small Kimi; the routing and attention details take MoEConfig's and MLAConfig's
    # defaults (each written once, there).
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 6
    dim: int = 384
    n_heads: int = 4
    # MLA
    q_lora_rank: int = 192  # 0: plain wq projection
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 96
    qk_rope_head_dim: int = 32
    v_head_dim: int = 96
    rope_theta: float = default_of(MLAConfig, "rope_theta")
    # FFN: the first n_dense_layers are dense SwiGLU of width inter_dim, the rest MoE
    inter_dim: int = 1536
    n_dense_layers: int = 1
    n_routed_experts: int = 8
    n_activated_experts: int = 2
    moe_inter_dim: int = 512
    n_shared_experts: int = default_of(MoEConfig, "n_shared_experts")
    # Width of the shared expert; None means n_shared_experts * moe_inter_dim (DeepSeek-V3's rule). The
    # nanoKimi paper's shared expert (768) is 1.5x its routed width (512), which that rule cannot express.
    shared_inter_dim: int | None = default_of(MoEConfig, "shared_inter_dim")
    score_func: str = default_of(MoEConfig, "score_func")
    route_scale: float = default_of(MoEConfig, "route_scale")
    bias_update_speed: float = default_of(MoEConfig, "bias_update_speed")
    aux_loss_alpha: float = default_of(MoEConfig, "aux_loss_alpha")
    tie_embeddings: bool = False
    dropout: float = default_of(MLAConfig, "dropout")

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "dim", "n_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not 0 <= self.n_dense_layers <= self.n_layer:
            raise ValueError(f"n_dense_layers: must be in [0, n_layer={self.n_layer}], got {self.n_dense_layers}")
        if self.n_dense_layers > 0 and self.inter_dim <= 0:
            raise ValueError(f"inter_dim: dense layers need inter_dim > 0, got {self.inter_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        self.mla_config()  # validates the MLA fields
        if self.n_dense_layers < self.n_layer:
            self.moe_config()  # validates the MoE fields

    def mla_config(self) -> MLAConfig:
        return MLAConfig(
            dim=self.dim,
            n_heads=self.n_heads,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            max_seq_len=self.block_size,
            rope_theta=self.rope_theta,
            dropout=self.dropout,
        )

    def moe_config(self) -> MoEConfig:
        return MoEConfig(
            dim=self.dim,
            n_routed_experts=self.n_routed_experts,
            n_activated_experts=self.n_activated_experts,
            moe_inter_dim=self.moe_inter_dim,
            n_shared_experts=self.n_shared_experts,
            shared_inter_dim=self.shared_inter_dim,
            score_func=self.score_func,
            route_scale=self.route_scale,
            bias_update_speed=self.bias_update_speed,
            aux_loss_alpha=self.aux_loss_alpha,
        )


# The nanoKimi paper's model (amanmurari/nanokimi config.py): 6 layers, 384 dims, 4 heads, q_lora 192,
# kv_lora 128, rope 32, 8 routed experts of width 512 (top-2), one shared expert of width 768, every layer
# MoE, vocab 50257, block 1024, untied head, dropout 0.1. Its head dim is 384/4 = 96 for q/k content and
# v, so qk_nope = v_head = 96. nanoKimi reports 75,351,936 parameters; this config has 75,118,080, i.e.
# 38,976 fewer per layer (x6 = 233,856), because nanoKimi's attention is not DeepSeek's MLA in two ways
# and its layers carry biases:
#   - its rope key is per head, projected from x (384 -> 4*32); MLA shares ONE 32-d rope key across heads
#     (a 32-wide slice of wkv_a): -36,864;
#   - biases on its attention output (384) and shared-expert SwiGLU (768 + 768 + 384): -2,304;
#   - MLA has an RMSNorm on the query latent (q_norm, 192 gains) that nanoKimi lacks: +192.
# Embedding (19,298,688), head (19,298,688), routed experts, router and the other norms match exactly.
NANOKIMI_PAPER = KimiConfig(
    vocab_size=50257,
    block_size=1024,
    n_layer=6,
    dim=384,
    n_heads=4,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_nope_head_dim=96,
    qk_rope_head_dim=32,
    v_head_dim=96,
    inter_dim=1536,
    n_dense_layers=0,  # nanoKimi has no dense layers (inter_dim unused)
    n_routed_experts=8,
    n_activated_experts=2,
    moe_inter_dim=512,
    n_shared_experts=1,
    shared_inter_dim=768,
    tie_embeddings=False,
    dropout=0.1,
)
NANOKIMI_PAPER_REPORTED_PARAMS = 75_351_936


class Block(nn.Module):
    def __init__(self, layer_id: int, config: KimiConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim)
        self.attn = MLA(config.mla_config())  # applies its own residual dropout
        self.ffn_norm = RMSNorm(config.dim)
        if layer_id < config.n_dense_layers:
            self.ffn = SwiGLU(config.dim, config.inter_dim)
        else:
            self.ffn = MoE(config.moe_config())
        self.ffn_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, layer_cache=None, pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), layer_cache, pos)
        x = x + self.ffn_drop(self.ffn(self.ffn_norm(x)))
        return x


class Kimi(nn.Module):
    def __init__(self, config: KimiConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([Block(i, config) for i in range(config.n_layer)])
        self.norm = RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self._init_all_weights()

    @classmethod
    def paper_config(cls) -> KimiConfig:
        """A fresh copy of NANOKIMI_PAPER (the nanoKimi paper's model, see the comment there)."""
        return dataclasses.replace(NANOKIMI_PAPER)

    @torch.no_grad()
    def _init_all_weights(self) -> None:
        """Every >= 2-D parameter (embedding, projections, router, stacked experts) N(0, 0.02); the
        residual output projections (wo, w2, experts.w2, shared.w2) N(0, 0.02/sqrt(2*n_layer)); norm gains 1.
        DeepSeek-V3 initializes differently; we keep the same init family as the GPT baseline (nanoGPT's)
        so that the comparison is not an init comparison. The router's selection bias (a buffer) stays 0."""
        _init_all_weights(self, self.config.n_layer)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None):
        B, T = idx.size()
        pos = cache.pos if cache is not None else 0
        if pos + T > self.config.block_size:
            raise ValueError(f"idx: positions up to {pos + T} exceed block_size {self.config.block_size}")
        x = self.drop(self.embed(idx))
        for i, layer in enumerate(self.layers):
            x = layer(x, cache.layers[i] if cache is not None else None, pos)
        logits, loss = logits_and_loss(x, self.norm, self.head, targets)
        if cache is not None:
            cache.pos = pos + T
        return logits, loss

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' auxiliary (sequence balance) losses from the last forward."""
        total = torch.zeros((), device=self.head.weight.device)
        for m in moe_modules(self):
            total = total + m.aux_loss.to(total.device)
        return total

    def make_cache(self, batch_size: int, max_len: int) -> Cache:
        """Latent cache per layer (c_kv and the shared rope key), on the model's device and dtype."""
        if max_len > self.config.block_size:
            raise ValueError(f"max_len: {max_len} exceeds block_size {self.config.block_size}")
        w = self.head.weight
        return Cache(
            pos=0, layers=[layer.attn.make_cache(batch_size, max_len, w.device, w.dtype) for layer in self.layers]
        )
