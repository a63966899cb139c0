"""Tests for arch/mla.py against a naive per-head reference, and cache/decode consistency."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arch.mla import MLA, MLACache, MLAConfig


def make_mla(q_lora_rank: int, dtype=torch.float64, seed: int = 0, **kw) -> MLA:
    torch.manual_seed(seed)
    cfg = dict(
        dim=32,
        n_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=6,
        v_head_dim=10,
        max_seq_len=32,
    )
    cfg.update(kw)
    m = MLA(MLAConfig(**cfg)).to(dtype)
    with torch.no_grad():  # non-trivial norm gains so the reference has to apply them
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return m


def rope_by_hand(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """x [T, D] at positions 0..T-1, rotate-half convention: dims (i, i+D/2) rotated by t*theta^(-2i/D)."""
    T, D = x.shape
    t = torch.arange(T, dtype=x.dtype)[:, None]
    a = t * theta ** (-2 * torch.arange(D // 2, dtype=x.dtype) / D)[None, :]
    x1, x2 = x[:, : D // 2], x[:, D // 2 :]
    return torch.cat([x1 * a.cos() - x2 * a.sin(), x1 * a.sin() + x2 * a.cos()], dim=-1)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference(m: MLA, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive MLA, one sequence and one head at a time: materialize k, v from wkv_b, causal softmax.
    Returns (output [B, T, dim], scaled logits [B, H, T, T] with -inf above the diagonal)."""
    c = m.config
    B, T, _ = x.shape
    H, dn, dr, dv, r = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    scale = 1 / math.sqrt(dn + dr)
    outs, logits = [], torch.full((B, H, T, T), -math.inf, dtype=x.dtype)
    for b in range(B):
        xb = x[b]
        q = xb @ m.wq.weight.T if c.q_lora_rank == 0 else (rms(xb @ m.wq_a.weight.T, m.q_norm.weight) @ m.wq_b.weight.T)
        kv_a = xb @ m.wkv_a.weight.T
        c_kv, k_rope = rms(kv_a[:, :r], m.kv_norm.weight), rope_by_hand(kv_a[:, r:])
        kv = c_kv @ m.wkv_b.weight.T  # [T, H*(dn+dv)]
        heads = []
        for h in range(H):
            qh = q[:, h * (dn + dr) : (h + 1) * (dn + dr)]
            qh = torch.cat([qh[:, :dn], rope_by_hand(qh[:, dn:])], dim=-1)
            kvh = kv[:, h * (dn + dv) : (h + 1) * (dn + dv)]
            kh = torch.cat([kvh[:, :dn], k_rope], dim=-1)
            vh = kvh[:, dn:]
            s = (qh @ kh.T) * scale
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
            logits[b, h] = s
            heads.append(torch.softmax(s, dim=-1) @ vh)
        outs.append(torch.cat(heads, dim=-1) @ m.wo.weight.T)
    return torch.stack(outs), logits


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_sdpa_forward_matches_naive_reference_fp64(q_lora_rank):
    m = make_mla(q_lora_rank)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    ref, _ = reference(m, x)
    torch.testing.assert_close(m(x), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_max_logit_equals_reference_max(q_lora_rank):
    m = make_mla(q_lora_rank)
    x = torch.randn(2, 9, 32, dtype=torch.float64) * 3
    m(x)
    assert m.max_logit is None  # nothing computed unless asked
    m.track_max_logit = True
    m(x)
    _, logits = reference(m, x)
    expected = logits.amax(dim=(0, 2, 3))
    assert m.max_logit.dtype == torch.float32 and m.max_logit.shape == (4,)
    assert not m.max_logit.requires_grad
    torch.testing.assert_close(m.max_logit, expected.float(), atol=0, rtol=1e-6)


def test_max_logit_blocked_pass_covers_all_rows():
    m = make_mla(0)
    m.track_max_logit = True
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    q_nope, q_rope, c_kv, k_rope = m._project(x, 0)
    k, _ = m._expand_kv(c_kv, k_rope)
    q = torch.cat([q_nope, q_rope], dim=-1)
    torch.testing.assert_close(m._max_logit(q, k, block=3), m._max_logit(q, k, block=256), atol=0, rtol=0)


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_qk_clip_scales_only_the_clipped_heads_logits(q_lora_rank):
    m = make_mla(q_lora_rank)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    _, before = reference(m, x)
    params_before = {n: p.detach().clone() for n, p in m.named_parameters()}
    gamma = torch.tensor([1.0, 0.5, 1.0, 0.3], dtype=torch.float64)
    m.qk_clip_(gamma)
    _, after = reference(m, x)
    causal = torch.isfinite(before)
    expected = (before * gamma[None, :, None, None])[causal]
    torch.testing.assert_close(after[causal], expected, atol=1e-10, rtol=0)

    c = m.config
    q_name = "wq.weight" if q_lora_rank == 0 else "wq_b.weight"
    qk, kvw = c.qk_nope_head_dim + c.qk_rope_head_dim, c.qk_nope_head_dim + c.v_head_dim
    p = dict(m.named_parameters())
    for h in (0, 2):  # unclipped heads: bit-identical rows
        assert torch.equal(p[q_name][h * qk : (h + 1) * qk], params_before[q_name][h * qk : (h + 1) * qk])
        assert torch.equal(
            p["wkv_b.weight"][h * kvw : (h + 1) * kvw], params_before["wkv_b.weight"][h * kvw : (h + 1) * kvw]
        )
    for h in range(4):  # value rows of every head untouched
        v_rows = slice(h * kvw + c.qk_nope_head_dim, (h + 1) * kvw)
        assert torch.equal(p["wkv_b.weight"][v_rows], params_before["wkv_b.weight"][v_rows])
    for name in p:  # everything else (shared k-rope in wkv_a, wo, norms, wq_a) untouched
        if name not in (q_name, "wkv_b.weight"):
            assert torch.equal(p[name], params_before[name]), name
    # head 1's q-rope rows scaled by gamma, q-nope rows by sqrt(gamma)
    h1 = slice(qk, 2 * qk)
    torch.testing.assert_close(
        p[q_name][h1][c.qk_nope_head_dim :], params_before[q_name][h1][c.qk_nope_head_dim :] * 0.5, atol=0, rtol=0
    )
    torch.testing.assert_close(
        p[q_name][h1][: c.qk_nope_head_dim], params_before[q_name][h1][: c.qk_nope_head_dim] * math.sqrt(0.5)
    )


def run_cached(m: MLA, x: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Feed x through a fresh cache in the given chunk sizes; concatenate the outputs."""
    cache = m.make_cache(x.size(0), x.size(1))
    outs, pos = [], 0
    for n in chunks:
        outs.append(m(x[:, pos : pos + n], layer_cache=cache, pos=pos))
        pos += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("q_lora_rank", [0, 16])
@pytest.mark.parametrize("absorb_prefill", [False, True])
@pytest.mark.parametrize("chunks", [[1] * 12, [5] + [1] * 7, [4, 3, 1, 4]])
def test_cached_absorbed_decode_matches_full_forward(q_lora_rank, absorb_prefill, chunks):
    m = make_mla(q_lora_rank, dtype=torch.float32).eval()
    m.absorb_prefill = absorb_prefill
    x = torch.randn(3, 12, 32)
    with torch.no_grad():
        full = m(x)
        cached = run_cached(m, x, chunks)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)


def test_absorbed_path_matches_reference_fp64():
    m = make_mla(16)
    m.absorb_prefill = True
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    ref, _ = reference(m, x)
    torch.testing.assert_close(run_cached(m, x, [3, 1, 6]), ref, atol=1e-10, rtol=0)


def test_cache_holds_only_latent_and_rope_key():
    m = make_mla(16, dtype=torch.float32)
    c = m.config
    cache = m.make_cache(2, 20)
    assert isinstance(cache, MLACache)
    assert m.kv_cache_values_per_token() == c.kv_lora_rank + c.qk_rope_head_dim == cache.values_per_token()
    tensors = [v for v in vars(cache).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in tensors) == 2 * 20 * (c.kv_lora_rank + c.qk_rope_head_dim)
    assert cache.num_bytes() == 2 * 20 * (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    # what is cached is exactly the normalized latent and the roped shared key
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        m(x, layer_cache=cache, pos=0)
        _, _, c_kv, k_rope = m._project(x, 0)
    torch.testing.assert_close(cache.c_kv[:, :5], c_kv, atol=0, rtol=0)
    torch.testing.assert_close(cache.k_rope[:, :5], k_rope, atol=0, rtol=0)
    with pytest.raises(ValueError):
        m(torch.randn(2, 16, 32), layer_cache=cache, pos=5)


def test_gradients_flow_and_dropout_only_in_training():
    m = make_mla(16, dtype=torch.float32, dropout=0.5)
    x = torch.randn(2, 6, 32, requires_grad=True)
    m(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x), atol=0, rtol=0)


def test_config_validation():
    with pytest.raises(ValueError):
        MLAConfig(
            dim=8,
            n_heads=2,
            q_lora_rank=0,
            kv_lora_rank=4,
            qk_nope_head_dim=4,
            qk_rope_head_dim=3,
            v_head_dim=4,
            max_seq_len=8,
        )
    m = make_mla(0)
    with pytest.raises(ValueError):
        m.qk_clip_(torch.ones(3))


def test_sdpa_accepts_value_dim_different_from_qk_dim():
    # guards the assumption the training path relies on (qk 14 vs v 10 here)
    q = torch.randn(1, 2, 4, 14, dtype=torch.float64)
    v = torch.randn(1, 2, 4, 10, dtype=torch.float64)
    out = F.scaled_dot_product_attention(q, q, v, is_causal=True)
    assert out.shape == (1, 2, 4, 10)
