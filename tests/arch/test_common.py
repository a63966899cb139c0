"""Tests for arch/common.py: norms, SwiGLU, RoPE, caches, init, and generate on a toy MLA model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arch.common import Cache, KVCache, RMSNorm, Rotary, SwiGLU, apply_rope, generate, init_normal_, precompute_rope
from arch.mla import MLA, MLAConfig


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    n = RMSNorm(16, eps=1e-6).double()
    with torch.no_grad():
        n.weight.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * n.weight
    torch.testing.assert_close(n(x), ref, atol=1e-12, rtol=0)
    assert n(x.bfloat16()).dtype == torch.bfloat16


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    m = SwiGLU(8, 12).double()
    assert {n for n, _ in m.named_parameters()} == {"w1.weight", "w2.weight", "w3.weight"}
    x = torch.randn(4, 8, dtype=torch.float64)
    ref = (F.silu(x @ m.w1.weight.T) * (x @ m.w3.weight.T)) @ m.w2.weight.T
    torch.testing.assert_close(m(x), ref, atol=1e-12, rtol=0)


def _rope_by_hand(x: torch.Tensor, positions: list[int], theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE written pair by pair: dims (i, i + D/2) rotate by angle p * theta^(-2i/D)."""
    D = x.size(-1)
    out = x.clone()
    for t, p in enumerate(positions):
        for i in range(D // 2):
            a = p * theta ** (-2 * i / D)
            x1, x2 = x[..., t, i], x[..., t, i + D // 2]
            out[..., t, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[..., t, i + D // 2] = x1 * math.sin(a) + x2 * math.cos(a)
    return out


def test_rope_matches_hand_rotation_and_preserves_norm():
    torch.manual_seed(0)
    cos, sin = precompute_rope(8, 32, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    y = apply_rope(x, cos, sin, pos=7)
    torch.testing.assert_close(y, _rope_by_hand(x, list(range(7, 12))), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)
    # the offset is consistent with slicing a longer rotation
    sliced = apply_rope(x[..., 2:4, :], cos, sin, pos=2)
    torch.testing.assert_close(sliced, apply_rope(x, cos, sin)[..., 2:4, :], atol=1e-12, rtol=0)


def test_rope_relative_position_property():
    torch.manual_seed(0)
    cos, sin = precompute_rope(16, 64, dtype=torch.float64)
    q, k = torch.randn(1, 16, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)

    def dot(m: int, n: int) -> float:
        return (apply_rope(q, cos, sin, m) * apply_rope(k, cos, sin, n)).sum().item()

    for m, n in [(5, 2), (9, 9), (3, 11)]:
        for shift in (1, 17, 40):
            assert dot(m + shift, n + shift) == pytest.approx(dot(m, n), abs=1e-10)
    assert abs(dot(5, 2) - dot(2, 5)) > 1e-6  # depends on the sign of m - n, not only |m - n|


def test_rope_out_of_range_raises():
    cos, sin = precompute_rope(4, 8)
    with pytest.raises(ValueError):
        apply_rope(torch.zeros(1, 4, 4), cos, sin, pos=5)


def test_rotary_tables_stay_at_least_fp32():
    r = Rotary(8, 16)
    assert r.cos.dtype == torch.float32 and not r.state_dict()
    r.double()
    torch.testing.assert_close(r.cos, precompute_rope(8, 16, dtype=torch.float64)[0], atol=0, rtol=0)
    r.to(torch.bfloat16)
    assert r.cos.dtype == torch.float32


def test_kvcache_update_returns_prefix_views():
    c = KVCache(2, 3, 6, 4, dtype=torch.float64)
    a, b = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 2, 4, dtype=torch.float64)
    k, v = c.update(a, a * 2, 0)
    assert k.shape == (2, 3, 4, 4)
    k, v = c.update(b, b * 2, 4)
    torch.testing.assert_close(k, torch.cat([a, b], dim=2), atol=0, rtol=0)
    torch.testing.assert_close(v, torch.cat([a, b], dim=2) * 2, atol=0, rtol=0)
    with pytest.raises(ValueError):
        c.update(b, b, 5)


def test_init_normal_():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 256), RMSNorm(256))
    init_normal_(m, std=0.05)
    assert m[0].weight.std().item() == pytest.approx(0.05, rel=0.02)
    assert torch.all(m[0].bias == 0) and torch.all(m[1].weight == 1)


# ----------------------------------------------------------------------------- generate on a toy model


@dataclass
class ToyConfig:
    vocab_size: int = 31
    dim: int = 32
    n_layer: int = 2
    block_size: int = 12


class ToyMLAModel(nn.Module):
    """Embedding -> pre-norm MLA blocks (attention only) -> head; follows the model protocol."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        mla = MLAConfig(
            dim=config.dim,
            n_heads=4,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            max_seq_len=config.block_size,
        )
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.norms = nn.ModuleList(RMSNorm(config.dim) for _ in range(config.n_layer))
        self.attns = nn.ModuleList(MLA(mla) for _ in range(config.n_layer))
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        init_normal_(self, 0.3)  # large weights so the greedy choice is far from ties

    def make_cache(self, batch_size: int, max_len: int) -> Cache:
        w = self.head.weight
        return Cache(0, [a.make_cache(batch_size, max_len, w.device, w.dtype) for a in self.attns])

    def forward(self, idx, targets=None, cache=None):
        pos = cache.pos if cache is not None else 0
        x = self.embed(idx)
        for i, (norm, attn) in enumerate(zip(self.norms, self.attns, strict=True)):
            x = x + attn(norm(x), cache.layers[i] if cache is not None else None, pos)
        if cache is not None:
            cache.pos += idx.size(1)
        logits = self.head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss


@pytest.mark.parametrize("max_new", [6, 14])  # 14: prompt + new tokens outgrow block_size (12)
def test_generate_cache_matches_no_cache_greedy(max_new):
    torch.manual_seed(0)
    model = ToyMLAModel(ToyConfig())
    idx = torch.randint(0, 31, (2, 5))
    a = generate(model, idx, max_new, temperature=0, use_cache=True)
    b = generate(model, idx, max_new, temperature=0, use_cache=False)
    assert a.shape == (2, 5 + max_new)
    assert torch.equal(a[:, :5], idx)
    assert torch.equal(a, b)
    assert torch.equal(generate(model, idx, max_new, temperature=1.0, top_k=1), a)  # top-1 sampling is greedy


def test_generate_sampling_is_seeded_and_restores_mode():
    torch.manual_seed(0)
    model = ToyMLAModel(ToyConfig()).double().train()
    idx = torch.randint(0, 31, (3, 4))
    a = generate(model, idx, 7, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(1))
    b = generate(model, idx, 7, temperature=0.9, top_k=10, use_cache=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert model.training
