"""Shared building blocks: RMSNorm, RoPE, SwiGLU, KV-cache types, init, the forward tail, and `generate`.

Everything here is model-agnostic; attention/MLP modules in gpt.py, mla.py, moe.py and kimi.py use it,
and `generate` drives any model that follows the model protocol (docs/design.md):
    logits, loss = model(idx, targets=None, cache=None); cache = model.make_cache(batch_size, max_len)
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (bf16/fp16 are upcast for reductions; fp64 stays fp64 for exactness tests)."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------- norms and MLP


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in >= fp32 and cast back to x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x.dtype)
        return F.rms_norm(x.to(dt), (self.dim,), self.weight.to(dt), self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): w1 is the gate, w3 the up projection, w2 the down projection; no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ----------------------------------------------------------------------------- RoPE
# Convention: "rotate-half" (GPT-NeoX / HF Llama). Dimension i of the first half and dimension
# i + D/2 form a rotated pair with frequency theta^(-2i/D). DeepSeek's reference code pairs adjacent
# dimensions (2i, 2i+1) instead; the two are the same rotation up to a fixed permutation of the
# rope dims, which a learned projection absorbs, so nothing downstream depends on the choice.


def precompute_rope(
    head_dim: int, max_len: int, theta: float = 10000.0, device=None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [max_len, head_dim] (each half repeated), computed in fp64 then cast."""
    if head_dim % 2:
        raise ValueError(f"rope head_dim must be even, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    t = torch.arange(max_len, dtype=torch.float64, device=device)
    angles = torch.outer(t, inv_freq)  # [max_len, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [max_len, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int = 0) -> torch.Tensor:
    """Rotate x [..., T, D] as positions pos..pos+T-1 (T is the second-to-last dim).

    cos/sin are the full tables from `precompute_rope`; they are cast to x's dtype so an fp64 model
    stays fp64 end to end.
    """
    T = x.size(-2)
    if pos + T > cos.size(0):
        raise ValueError(f"rope: positions up to {pos + T} exceed the table length {cos.size(0)}")
    c = cos[pos : pos + T].to(x.dtype)
    s = sin[pos : pos + T].to(x.dtype)
    return x * c + rotate_half(x) * s


class Rotary(nn.Module):
    """RoPE tables as a module (no parameters): `rotary(x, pos)` rotates x [..., T, D].

    The cos/sin buffers are non-persistent and always at least fp32: after any .to()/.double()/.cuda()
    they are recomputed from fp64 on the new device, so a bf16 model keeps exact fp32 angles and an fp64
    model gets exact fp64 ones.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_len, self.theta = head_dim, max_len, theta
        cos, sin = precompute_rope(head_dim, max_len, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        dt = compute_dtype(self.cos.dtype)
        self.cos, self.sin = precompute_rope(self.head_dim, self.max_len, self.theta, self.cos.device, dt)
        return self

    def forward(self, x: torch.Tensor, pos: int = 0) -> torch.Tensor:
        return apply_rope(x, self.cos, self.sin, pos)


# ----------------------------------------------------------------------------- caches


@dataclass
class Cache:
    """Whole-model inference cache: `layers[i]` is layer i's cache object, `pos` the tokens seen so far."""

    pos: int = 0
    layers: list = field(default_factory=list)


class KVCache:
    """Standard per-layer MHA cache: k, v preallocated as [B, H, max_len, D]."""

    def __init__(
        self,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        device=None,
        dtype: torch.dtype = torch.float32,
        v_head_dim: int | None = None,
    ):
        self.max_len = max_len
        self.k = torch.zeros(batch_size, n_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch_size, n_heads, max_len, v_head_dim or head_dim, device=device, dtype=dtype)

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k_new, v_new [B, H, T, D] at positions pos..pos+T-1; return views of k, v over 0..pos+T-1."""
        T = k_new.size(2)
        if pos + T > self.max_len:
            raise ValueError(f"KVCache: writing positions up to {pos + T} exceeds max_len {self.max_len}")
        B = k_new.size(0)
        self.k[:B, :, pos : pos + T] = k_new
        self.v[:B, :, pos : pos + T] = v_new
        return self.k[:B, :, : pos + T], self.v[:B, :, : pos + T]

    def num_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


# ----------------------------------------------------------------------------- config defaults


def default_of(cls: type, name: str):
    """The default of dataclass `cls`'s field `name`, so a default written once can seed another config's
    field (KimiConfig's routing fields take MoEConfig's; harness's ModelDims takes KimiConfig's)."""
    f = cls.__dataclass_fields__[name]
    if f.default is MISSING:
        raise TypeError(f"{cls.__name__}.{name} has no plain default")
    return f.default


# ----------------------------------------------------------------------------- init

# Residual-branch output projections: scaled init 0.02/sqrt(2*n_layer), per GPT-2 (nanoGPT's c_proj rule).
# GPT names them c_proj; its ablations reuse the rule for MLA's `wo` and the MoE's down projections (routed
# `experts.w2`, shared `shared.w2`), under `mlp.`; Kimi has the same modules under `attn.` / `ffn.`.
_RESIDUAL_PROJ_SUFFIXES = (
    "c_proj.weight",  # gpt: attention and MLP output projections
    "attn.wo.weight",  # gpt-mla, kimi: MLA output projection
    "mlp.experts.w2",
    "mlp.shared.w2.weight",  # gpt-moe: routed and shared experts' down projections
    "ffn.w2.weight",
    "ffn.experts.w2",
    "ffn.shared.w2.weight",  # kimi: dense SwiGLU, routed, shared
)


@torch.no_grad()
def _init_all_weights(model: nn.Module, n_layer: int, skip: set[int] | frozenset[int] = frozenset()) -> None:
    """In `named_parameters` order: residual output projections N(0, 0.02/sqrt(2*n_layer)), every other
    >= 2-D parameter N(0, 0.02) unless its id is in `skip` (GPT passes the Linear/Embedding weights nanoGPT's
    `_init_weights` already drew, so the random stream is nanoGPT's); 1-D parameters and buffers untouched."""
    std_proj = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith(_RESIDUAL_PROJ_SUFFIXES):
            p.normal_(0.0, std_proj)
        elif p.dim() >= 2 and id(p) not in skip:
            p.normal_(0.0, 0.02)


@torch.no_grad()
def init_normal_(module: nn.Module, std: float = 0.02) -> nn.Module:
    """N(0, std) for every >= 2-D parameter (Linear, Embedding, stacked expert weights, router),
    zeros for parameters named `*bias`; other 1-D parameters (norm gains) are left as they are.
    Buffers (e.g. the MoE router's selection bias) are not touched."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std)
        elif name.endswith("bias"):
            p.zero_()
    return module


# ----------------------------------------------------------------------------- forward tail


def logits_and_loss(
    x: torch.Tensor, final_norm: nn.Module, lm_head: nn.Module, targets: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The end of every model's forward: final norm, LM head over all positions (the model protocol, unlike
    nanoGPT's last-position shortcut at inference), and the mean token cross-entropy (targets -1 ignored)."""
    logits = lm_head(final_norm(x))
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
    return logits, loss


# ----------------------------------------------------------------------------- generation


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """logits [B, V] -> next token ids [B, 1]; temperature 0 means greedy."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -math.inf)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append max_new_tokens sampled tokens to idx [B, T]; returns [B, T + max_new_tokens].

    use_cache=True: prefill the prompt through `model.make_cache`, then feed one token per step.
    use_cache=False: re-run the whole prefix each step (cropped to the last block_size tokens), the
    nanoGPT way. Both give identical greedy tokens. When the context outgrows block_size, a cache cannot
    slide (learned position embeddings), so the cached path then re-prefills a fresh cache with the
    cropped context every step, which is exactly what the uncached path computes.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    was_training = model.training
    model.eval()
    block_size = getattr(model.config, "block_size", None) or (idx.size(1) + max_new_tokens)
    try:
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = model(idx[:, -block_size:])
            elif cache is None or cache.pos + 1 > block_size:
                ctx = idx[:, -block_size:]
                max_len = min(block_size, ctx.size(1) + max_new_tokens)
                cache = model.make_cache(idx.size(0), max_len)
                logits, _ = model(ctx, cache=cache)
            else:
                logits, _ = model(idx[:, -1:], cache=cache)
            nxt = _sample(logits[:, -1, :], temperature, top_k, generator)
            idx = torch.cat([idx, nxt.to(idx.dtype)], dim=1)
    finally:
        model.train(was_training)
    return idx
