"""Parameter counts, training FLOPs per token and KV-cache bytes for every model variant.

Works on the modules themselves (nn.Embedding, CausalSelfAttention, MLA, MoE), so gpt, gpt-mla, gpt-moe
and kimi are all covered by one set of rules:

Parameters (`count_params`)
  total          every unique parameter (a tied embedding / head matrix counts once). Buffers (the MoE
                 router's selection bias, RoPE tables) are not parameters and never count.
  embedding      the nn.Embedding tables: token embedding, plus GPT's learned position embedding. A tied
                 head shares the token table, so for tied models the head lands here.
  non_embedding  total - embedding.
  active         the parameters one token's forward uses: total minus, in every MoE layer, the routed
                 experts it is not sent to, i.e. (E - k) / E of the stacked expert weights. The router and
                 shared experts are always used. Embedding tables count in full although a token reads
                 one row: the convention of Mixtral's and DeepSeek's "activated parameters" and of
                 nanoGPT's get_num_params (which keeps the token table in because it is also the head).

Training FLOPs per token (`flops_per_token`), the nanoGPT / PaLM estimate made exact for matmuls:
  6 * N_matmul + sum over attention layers of 6 * H * (d_qk + d_v) * T
  - N_matmul = active parameters that are matmul weights: >= 2-D parameters used by a non-embedding
    module (Linear layers, router, stacked experts at k/E, and the LM head even when tied to the token
    table), i.e. active non-embedding parameters plus a tied head, minus norm gains and biases. Each
    weight costs 2 FLOPs per token forward and 4 backward (input and weight gradients). nanoGPT's N also
    holds LayerNorm gains and biases (their elementwise ops are not matmuls); here they are left out
    so that the formula equals a matmul FLOP count exactly. The difference is < 0.1% at GPT-2 sizes.
    Embedding lookups are not matmuls and are left out (nanoGPT drops the position table for that reason).
  - attention: per layer and head, q.k^T costs 2 * d_qk and attn @ v costs 2 * d_v FLOPs per (query,
    key) pair forward, x3 with backward. Like nanoGPT's 12 * L * H * Q * T (d_qk = d_v = Q), every
    token is charged all T keys (the full T x T product that kernels compute; causal masking would
    halve the useful work). MLA trains with materialized heads: d_qk = qk_nope + qk_rope, d_v = v_head.
    T is the training sequence length (block_size in nanoGPT's estimate_mfu).

KV cache (`kv_cache_bytes_per_token`), per token summed over layers: MHA caches k and v,
2 * H * head_dim (= 2 * n_embd) values per layer; MLA caches the normalized latent and the shared rope
key, kv_lora_rank + qk_rope_head_dim values per layer. Times dtype_bytes (2 for bf16/fp16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from arch.gpt import CausalSelfAttention
from arch.mla import MLA
from arch.moe import moe_modules


@dataclass
class ParamCounts:
    total: int
    active: int
    embedding: int
    non_embedding: int


def _routed_inactive_fraction(model: nn.Module) -> dict[int, tuple[int, int]]:
    """id(param) -> (E - k, E) for every stacked routed-expert weight: a token uses k of its E slices."""
    out = {}
    for moe in moe_modules(model):
        for p in moe.experts.parameters():
            if p.size(0) != moe.n_experts:
                raise ValueError(
                    f"counting: expected stacked expert weights [E={moe.n_experts}, ...], got {tuple(p.shape)}"
                )
            out[id(p)] = (moe.n_experts - moe.topk, moe.n_experts)
    return out


def _active_numel(p, routed: dict[int, tuple[int, int]]) -> int:
    if id(p) in routed:
        inactive, E = routed[id(p)]
        return p.numel() // E * (E - inactive)
    return p.numel()


def _embedding_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def count_params(model: nn.Module) -> ParamCounts:
    routed = _routed_inactive_fraction(model)
    params = list(model.parameters())  # unique: a tied tensor appears once
    total = sum(p.numel() for p in params)
    emb_ids = _embedding_ids(model)
    embedding = sum(p.numel() for p in params if id(p) in emb_ids)
    active = sum(_active_numel(p, routed) for p in params)
    return ParamCounts(total=total, active=active, embedding=embedding, non_embedding=total - embedding)


def matmul_params_active(model: nn.Module) -> int:
    """Active parameters that are matmul weights (see the module docstring): >= 2-D parameters held by
    some module other than an nn.Embedding, routed experts at k/E."""
    routed = _routed_inactive_fraction(model)
    used_by_matmul = {
        id(p)
        for m in model.modules()
        if not isinstance(m, nn.Embedding)
        for p in m.parameters(recurse=False)
        if p.dim() >= 2
    }
    return sum(_active_numel(p, routed) for p in model.parameters() if id(p) in used_by_matmul)


def _attention_layers(model: nn.Module) -> list[tuple[int, int, int, int]]:
    """(n_heads, d_qk, d_v, kv-cache values per token) for every attention layer."""
    layers = []
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            layers.append((m.n_head, m.head_dim, m.head_dim, 2 * m.n_head * m.head_dim))
        elif isinstance(m, MLA):
            c = m.config
            layers.append(
                (c.n_heads, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank + c.qk_rope_head_dim)
            )
    return layers


def attention_flops_per_token(model: nn.Module, seq_len: int) -> int:
    return sum(6 * h * (d_qk + d_v) * seq_len for h, d_qk, d_v, _ in _attention_layers(model))


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token at sequence length seq_len."""
    if seq_len <= 0:
        raise ValueError(f"seq_len: must be > 0, got {seq_len}")
    return 6 * matmul_params_active(model) + attention_flops_per_token(model, seq_len)


def kv_cache_bytes_per_token(model: nn.Module, dtype_bytes: int = 2) -> int:
    """Inference cache bytes per token of context, all layers (MHA: 2*L*n_embd values; MLA:
    L*(kv_lora_rank + qk_rope_head_dim) values), times dtype_bytes."""
    return dtype_bytes * sum(values for *_, values in _attention_layers(model))


def summarize(model: nn.Module, seq_len: int, dtype_bytes: int = 2) -> dict[str, int]:
    """All counts, keyed by the MLflow metric names of harness/schema.py where one exists."""
    c = count_params(model)
    return {
        "params/total": c.total,
        "params/active": c.active,
        "params/embedding": c.embedding,
        "params/non_embedding": c.non_embedding,
        "params/matmul_active": matmul_params_active(model),
        "train/flops_per_token": flops_per_token(model, seq_len),
        "train/attention_flops_per_token": attention_flops_per_token(model, seq_len),
        "infer/kv_bytes_per_token": kv_cache_bytes_per_token(model, dtype_bytes),
    }
