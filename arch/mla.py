"""Multi-head Latent Attention (DeepSeek-V2/V3), with a latent KV cache and the absorbed-weight decode.

Per token t (H heads, c = kv_lora_rank, r = qk_rope_head_dim):
    q_t             = wq(x_t) or wq_b(q_norm(wq_a(x_t)))    -> per head [q_nope (qk_nope) | q_rope (r)]
    [c_kv | k_rope] = wkv_a(x_t); c_kv = kv_norm(c_kv)      (k_rope: ONE r-dim key shared by all heads)
    [k_nope | v]    = wkv_b(c_kv)                           -> per head [qk_nope | v_head]
    logit_h(i, j)  = (q_nope_i . k_nope_j + rope(q_rope_i) . rope(k_rope_j)) / sqrt(qk_nope + r)

Training (no cache) materializes k and v and runs F.scaled_dot_product_attention.
Inference caches only c_kv and roped k_rope (c + r values per token per layer). Writing W_UK, W_UV for
head h's key / value blocks of wkv_b, q_nope . k_nope = (q_nope W_UK) . c_kv, so the query is folded into
the latent space ("absorb") and the per-head keys and values are never materialized; the value block is
applied after attention: o_h = (attn_h @ c_kv) W_UV^T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from arch.common import RMSNorm, Rotary, compute_dtype


@dataclass
class MLAConfig:
    dim: int
    n_heads: int
    q_lora_rank: int  # 0: plain wq projection; else wq_a -> q_norm -> wq_b
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_seq_len: int
    rope_theta: float = 10000.0
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("dim", "n_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MLAConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.q_lora_rank < 0 or self.qk_nope_head_dim < 0:
            raise ValueError("MLAConfig: q_lora_rank and qk_nope_head_dim must be >= 0")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MLAConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class MLACache:
    """Per-layer latent cache: normalized c_kv [B, max_len, kv_lora_rank] and roped k_rope [B, max_len, r]."""

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        self.max_len = max_len
        self.c_kv = torch.zeros(batch_size, max_len, kv_lora_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(batch_size, max_len, rope_dim, device=device, dtype=dtype)

    def update(self, c_new: torch.Tensor, kr_new: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write [B, T, *] at positions pos..pos+T-1; return views over 0..pos+T-1."""
        T, B = c_new.size(1), c_new.size(0)
        if pos + T > self.max_len:
            raise ValueError(f"MLACache: writing positions up to {pos + T} exceeds max_len {self.max_len}")
        self.c_kv[:B, pos : pos + T] = c_new
        self.k_rope[:B, pos : pos + T] = kr_new
        return self.c_kv[:B, : pos + T], self.k_rope[:B, : pos + T]

    def values_per_token(self) -> int:
        return self.c_kv.size(-1) + self.k_rope.size(-1)

    def num_bytes(self) -> int:
        return self.c_kv.numel() * self.c_kv.element_size() + self.k_rope.numel() * self.k_rope.element_size()


class MLA(nn.Module):
    def __init__(self, config: MLAConfig):
        super().__init__()
        self.config = config
        c = config
        self.n_heads = c.n_heads
        self.nope, self.rope_dim, self.v_dim, self.rank = (
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        )
        self.qk_head_dim = c.qk_head_dim
        self.softmax_scale = 1.0 / math.sqrt(c.qk_head_dim)
        if c.q_lora_rank == 0:
            self.wq = nn.Linear(c.dim, c.n_heads * c.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(c.dim, c.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(c.q_lora_rank)
            self.wq_b = nn.Linear(c.q_lora_rank, c.n_heads * c.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(c.dim, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(c.kv_lora_rank)
        self.wkv_b = nn.Linear(c.kv_lora_rank, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.wo = nn.Linear(c.n_heads * c.v_head_dim, c.dim, bias=False)
        self.resid_dropout = nn.Dropout(c.dropout)
        self.rotary = Rotary(c.qk_rope_head_dim, c.max_seq_len, c.rope_theta)
        # QK-Clip bookkeeping (contract): when True, a no-cache forward stores the per-head max logit.
        self.track_max_logit: bool = False
        self.max_logit: torch.Tensor | None = None
        # A prefill into an EMPTY cache (pos == 0) uses the expanded SDPA path by default (compute-bound,
        # fewer FLOPs than the absorbed path when kv_lora_rank > qk_nope); set True to absorb there too.
        self.absorb_prefill: bool = False

    # ------------------------------------------------------------------ projections

    def _q_weight(self) -> torch.Tensor:
        """The Linear whose output rows are the per-head queries, viewed [H, qk_head_dim, in]."""
        w = self.wq.weight if self.config.q_lora_rank == 0 else self.wq_b.weight
        return w.view(self.n_heads, self.qk_head_dim, -1)

    def _project(self, x: torch.Tensor, pos: int):
        """x [B,T,dim] -> q_nope [B,H,T,nope], roped q_rope [B,H,T,r], c_kv [B,T,c], roped k_rope [B,T,r]."""
        B, T, _ = x.shape
        q = self.wq(x) if self.config.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, self.n_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_rope = self.wkv_a(x).split([self.rank, self.rope_dim], dim=-1)
        return q_nope, self.rotary(q_rope, pos), self.kv_norm(c_kv), self.rotary(k_rope, pos)

    def _expand_kv(self, c_kv: torch.Tensor, k_rope: torch.Tensor):
        """Materialize per-head k [B,H,T,nope+r] and v [B,H,T,v] from the latent (training path)."""
        B, T, _ = c_kv.shape
        kv = self.wkv_b(c_kv).view(B, T, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, self.n_heads, T, self.rope_dim)], dim=-1)
        return k, v

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, layer_cache: MLACache | None = None, pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_rope, c_kv, k_rope = self._project(x, pos)
        if layer_cache is None or (pos == 0 and not self.absorb_prefill):
            if layer_cache is not None:
                layer_cache.update(c_kv, k_rope, pos)
            q = torch.cat([q_nope, q_rope], dim=-1)
            k, v = self._expand_kv(c_kv, k_rope)
            if layer_cache is None and self.track_max_logit:
                self.max_logit = self._max_logit(q, k)
            # d_qk != d_v rules out the flash kernel, yet torch's default dispatch (cuDNN attention on an H200)
            # beat v zero-padded to d_qk on every backend (reports/benchmarks/2026-12-04-nvidia-h200.md)
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                is_causal=T > 1,
                scale=self.softmax_scale,
                dropout_p=self.config.dropout if self.training else 0.0,
            )
        else:
            c_all, kr_all = layer_cache.update(c_kv, k_rope, pos)
            y = self._absorbed_attention(q_nope, q_rope, c_all, kr_all, pos)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim)
        return self.resid_dropout(self.wo(y))

    def _absorbed_attention(self, q_nope, q_rope, c_all, kr_all, pos: int) -> torch.Tensor:
        """Attention in latent space over the cache; returns per-head outputs [B, H, T, v_head_dim]."""
        T, L = q_nope.size(2), c_all.size(1)
        w = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H, nope, c], [H, v, c]
        q_lat = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)
        # heads folded into the query rows: [B, H*T, c] x [B, c, L] reads the latent cache once, where
        # broadcasting it as [B, 1, L, c] makes matmul copy it once per head
        B, H = q_nope.size(0), q_nope.size(1)
        scores = (
            q_lat.reshape(B, H * T, -1) @ c_all.transpose(1, 2) + q_rope.reshape(B, H * T, -1) @ kr_all.transpose(1, 2)
        ).view(B, H, T, L) * self.softmax_scale
        if T > 1:  # query t sits at absolute position pos + t and sees keys 0..pos+t
            allowed = torch.ones(T, L, dtype=torch.bool, device=scores.device).tril(diagonal=pos)
            scores = scores.masked_fill(~allowed, float("-inf"))
        attn = scores.softmax(dim=-1, dtype=compute_dtype(scores.dtype)).to(q_nope.dtype)
        o_lat = (attn.reshape(B, H * T, L) @ c_all).view(B, H, T, -1)  # [B, H, T, c]
        return torch.einsum("bhtc,hdc->bhtd", o_lat, w_uv)

    @torch.no_grad()
    def _max_logit(self, q: torch.Tensor, k: torch.Tensor, block: int = 256) -> torch.Tensor:
        """Per-head max over batch and causal (i, j) of q_i . k_j * scale, as float32 [H].

        An explicit pass because SDPA does not expose its logits; query rows go in blocks so the
        memory stays O(B * H * block * T) instead of O(B * H * T^2)."""
        T = q.size(2)
        best = torch.full((self.n_heads,), float("-inf"), device=q.device, dtype=compute_dtype(q.dtype))
        for s in range(0, T, block):
            e = min(T, s + block)
            scores = (q[:, :, s:e] @ k[:, :, :e].transpose(-1, -2)).to(best.dtype) * self.softmax_scale
            allowed = torch.ones(e - s, e, dtype=torch.bool, device=q.device).tril(diagonal=s)
            scores = scores.masked_fill(~allowed, float("-inf"))
            best = torch.maximum(best, scores.amax(dim=(0, 2, 3)))
        return best.float()

    # ------------------------------------------------------------------ QK-Clip, cache

    @torch.no_grad()
    def qk_clip_(self, gamma: torch.Tensor) -> None:
        """Kimi K2 Algorithm 1 for MLA: head h's q-nope and k-nope rows times sqrt(gamma_h) (their product,
        the nope logit, times gamma_h), its q-rope rows times gamma_h; the shared k-rope projection (wkv_a),
        values (v rows of wkv_b) and wo are untouched. Every logit of head h is thus scaled by gamma_h."""
        if gamma.shape != (self.n_heads,):
            raise ValueError(f"qk_clip_: gamma must have shape [{self.n_heads}], got {tuple(gamma.shape)}")
        wq = self._q_weight()
        g = gamma.to(device=wq.device, dtype=wq.dtype)
        wq[:, : self.nope].mul_(g.sqrt()[:, None, None])
        wq[:, self.nope :].mul_(g[:, None, None])
        wkv = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        wkv[:, : self.nope].mul_(g.sqrt()[:, None, None])

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype | None = None) -> MLACache:
        w = self.wkv_a.weight
        return MLACache(
            batch_size, max_len, self.rank, self.rope_dim, device=device or w.device, dtype=dtype or w.dtype
        )

    def kv_cache_values_per_token(self) -> int:
        return self.rank + self.rope_dim
