"""arch/kimi.py: shapes, loss, latent-cache decode, gradient flow, init; and the GPT ablations
(gpt-mla: GPT with attn="mla", gpt-moe: GPT with mlp="moe")."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from arch.common import generate
from arch.gpt import GPT, GPTConfig
from arch.kimi import NANOKIMI_PAPER, Kimi, KimiConfig
from arch.mla import MLA, MLACache, MLAConfig
from arch.moe import MoE, MoEConfig, moe_modules

# v_head (6) != qk_nope (8) and the rope dim (4) differs from both, so a mixed-up split shows
TINY = dict(
    vocab_size=53,
    block_size=16,
    n_layer=3,
    dim=32,
    n_heads=4,
    q_lora_rank=16,
    kv_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    inter_dim=48,
    n_dense_layers=1,
    n_routed_experts=4,
    n_activated_experts=2,
    moe_inter_dim=16,
    n_shared_experts=1,
)


def tiny_kimi(seed=0, dtype=torch.float64, **overrides) -> Kimi:
    torch.manual_seed(seed)
    model = Kimi(KimiConfig(**{**TINY, **overrides})).to(dtype)
    with torch.no_grad():  # larger weights than the 0.02 init, so attention and routing are not trivial
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(10)
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model.eval()


def tokens(B=3, T=16, vocab=53, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def mla_cfg(dim=32, max_seq_len=16, q_lora_rank=16):
    return MLAConfig(
        dim=dim,
        n_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        max_seq_len=max_seq_len,
    )


def moe_cfg(dim=32):
    return MoEConfig(dim=dim, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=16)


GPT_SMALL = dict(vocab_size=53, block_size=16, n_layer=2, n_head=4, n_embd=32)


def gpt_variant(variant: str, seed=0, dtype=torch.float64) -> GPT:
    torch.manual_seed(seed)
    extra = {"gpt-mla": dict(attn="mla", mla=mla_cfg()), "gpt-moe": dict(mlp="moe", moe=moe_cfg())}[variant]
    model = GPT(GPTConfig(**GPT_SMALL, **extra)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(10)
    return model.eval()


# --------------------------------------------------------------------------- structure, forward, loss


def test_parameter_names_follow_the_contract():
    model = tiny_kimi()
    names = set(dict(model.named_parameters()))
    assert {"embed.weight", "norm.weight", "head.weight"} <= names
    attn = {
        "attn_norm.weight",
        "attn.wq_a.weight",
        "attn.q_norm.weight",
        "attn.wq_b.weight",
        "attn.wkv_a.weight",
        "attn.kv_norm.weight",
        "attn.wkv_b.weight",
        "attn.wo.weight",
        "ffn_norm.weight",
    }
    dense = {"ffn.w1.weight", "ffn.w2.weight", "ffn.w3.weight"}
    moe = {
        "ffn.gate.weight",
        "ffn.experts.w1",
        "ffn.experts.w2",
        "ffn.experts.w3",
        "ffn.shared.w1.weight",
        "ffn.shared.w2.weight",
        "ffn.shared.w3.weight",
    }
    expected = {"embed.weight", "norm.weight", "head.weight"}
    for i in range(3):
        expected |= {f"layers.{i}.{n}" for n in attn | (dense if i < 1 else moe)}
    assert names == expected
    assert isinstance(model.layers[0].ffn, torch.nn.Module) and not isinstance(model.layers[0].ffn, MoE)
    assert all(isinstance(model.layers[i].ffn, MoE) for i in (1, 2))
    assert "layers.1.ffn.gate.bias" in dict(model.named_buffers())  # selection bias: a buffer, not trained
    assert model.head.weight is not model.embed.weight  # untied by default


def test_forward_shapes_and_loss_is_cross_entropy():
    model = tiny_kimi()
    idx, targets = tokens(), tokens(seed=2)
    targets[1, 3:9] = -1
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 53) and loss is None
    logits2, loss = model(idx, targets)
    assert torch.equal(logits, logits2)
    flat, t = logits.reshape(-1, 53), targets.reshape(-1)
    keep = t != -1
    by_hand = -flat[keep].log_softmax(-1).gather(1, t[keep, None]).mean()
    torch.testing.assert_close(loss, by_hand, atol=1e-12, rtol=0)
    torch.testing.assert_close(loss, F.cross_entropy(flat, t, ignore_index=-1), atol=1e-12, rtol=0)


def test_aux_loss_is_the_sum_over_moe_layers():
    model = tiny_kimi(aux_loss_alpha=1e-2)
    model(tokens())
    per_layer = [m.aux_loss for m in moe_modules(model)]
    assert len(per_layer) == 2 and all(a > 0 for a in per_layer)
    torch.testing.assert_close(model.aux_loss, sum(per_layer), check_dtype=False, atol=1e-12, rtol=0)
    assert model.aux_loss.requires_grad  # it is meant to be added to the loss
    default = tiny_kimi()  # aux_loss_alpha 0
    default(tokens())
    assert float(default.aux_loss) == 0.0


def test_tied_head_option():
    model = tiny_kimi(tie_embeddings=True)
    assert model.head.weight is model.embed.weight
    assert "head.weight" not in dict(model.named_parameters())


def test_block_size_and_config_errors():
    model = tiny_kimi()
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(T=17))
    with pytest.raises(ValueError, match="block_size"):
        model.make_cache(1, 17)
    with pytest.raises(ValueError, match="n_dense_layers"):
        KimiConfig(**{**TINY, "n_dense_layers": 4})
    with pytest.raises(ValueError, match="n_activated_experts"):
        KimiConfig(**{**TINY, "n_activated_experts": 5})


# --------------------------------------------------------------------------- latent cache decode


def assert_decode_matches(model, idx, atol):
    B, T = idx.shape
    full, _ = model(idx)
    cache = model.make_cache(B, T)
    for t in range(T):
        step, _ = model(idx[:, t : t + 1], cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=atol, rtol=0, msg=f"position {t}")
    assert cache.pos == T
    # chunked prefill, then chunks at pos > 0 (the absorbed path with a causal offset)
    cache = model.make_cache(B, T)
    outs = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 4), (4, 5), (5, 11), (11, T))]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_kimi_cached_decode_equals_full_forward(dtype, atol):
    model = tiny_kimi(dtype=dtype)
    cache = model.make_cache(2, 16)
    assert all(isinstance(c, MLACache) for c in cache.layers)
    assert cache.layers[0].c_kv.dtype == dtype and cache.layers[0].c_kv.shape == (2, 16, 12)
    assert_decode_matches(model, tokens(B=2), atol)


@pytest.mark.slow
def test_kimi_generate_same_greedy_tokens_with_and_without_cache():
    model = tiny_kimi(seed=3)
    prompt = tokens(B=2, T=4)
    a = generate(model, prompt, 14, temperature=0.0, use_cache=True)
    b = generate(model, prompt, 14, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- gradients


def test_gradients_reach_every_parameter():
    model = tiny_kimi().train()
    _, loss = model(tokens(B=4), tokens(B=4, seed=5))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if ".experts." in name:  # every routed expert got tokens (48 tokens, top-2 of 4) -> every slice
            per_expert = p.grad.flatten(1).abs().sum(1)
            assert (per_expert > 0).all(), (name, per_expert)
        else:
            assert p.grad.abs().sum() > 0, name
    for name, b in model.named_buffers():
        assert not b.requires_grad, name
    assert all(m.gate.bias.grad is None for m in moe_modules(model))


# --------------------------------------------------------------------------- init


def test_init_statistics():
    torch.manual_seed(0)
    cfg = KimiConfig(
        **{
            **TINY,
            "dim": 128,
            "n_layer": 4,
            "inter_dim": 256,
            "moe_inter_dim": 64,
            "n_routed_experts": 8,
            "vocab_size": 512,
            "q_lora_rank": 64,
            "kv_lora_rank": 64,
            "qk_nope_head_dim": 32,
            "qk_rope_head_dim": 16,
            "v_head_dim": 32,
        }
    )
    model = Kimi(cfg)
    proj = 0.02 / math.sqrt(2 * cfg.n_layer)
    scaled = re.compile(r"(attn\.wo\.weight|ffn\.w2\.weight|ffn\.experts\.w2|ffn\.shared\.w2\.weight)$")
    seen_scaled = 0
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.all(p == 1), name  # RMSNorm gains
            continue
        expected = proj if scaled.search(name) else 0.02
        seen_scaled += expected == proj
        assert abs(p.std().item() / expected - 1) < 0.06, (name, p.std().item(), expected)
        assert abs(p.mean().item()) < 5 * expected / math.sqrt(p.numel()), name
    assert seen_scaled == 4 + 1 + 2 * 3  # wo per layer, w2 in the dense layer, experts+shared w2 per MoE
    assert all(torch.all(m.gate.bias == 0) for m in moe_modules(model))


def test_paper_config_is_nanokimis():
    cfg = Kimi.paper_config()
    assert cfg == NANOKIMI_PAPER and cfg is not NANOKIMI_PAPER
    assert (cfg.n_layer, cfg.dim, cfg.n_heads, cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_rope_head_dim) == (
        6,
        384,
        4,
        128,
        192,
        32,
    )
    assert (cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim, cfg.shared_inter_dim) == (8, 2, 512, 768)
    assert (cfg.vocab_size, cfg.block_size, cfg.tie_embeddings, cfg.n_dense_layers) == (50257, 1024, False, 0)


def test_shared_inter_dim_sets_the_shared_expert_width():
    model = tiny_kimi(shared_inter_dim=24)
    for m in moe_modules(model):
        assert m.shared.w1.weight.shape == (24, 32) and m.shared.w2.weight.shape == (32, 24)
    model(tokens())


# --------------------------------------------------------------------------- GPT ablations


@pytest.mark.parametrize("variant", ["gpt-mla", "gpt-moe"])
@pytest.mark.slow
def test_gpt_ablations_run_train_and_decode(variant):
    model = gpt_variant(variant)
    blk = model.transformer.h[0]
    if variant == "gpt-mla":
        assert isinstance(blk.attn, MLA)
        assert "transformer.h.0.attn.wkv_b.weight" in dict(model.named_parameters())
        assert isinstance(model.make_cache(1, 16).layers[0], MLACache)
    else:
        assert isinstance(blk.mlp, MoE)
        assert "transformer.h.1.mlp.experts.w2" in dict(model.named_parameters())
    assert "transformer.wpe.weight" in dict(model.named_parameters())  # learned positions stay
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_decode_matches(model, tokens(B=2), atol=1e-10)
    prompt = tokens(B=2, T=4)
    assert torch.equal(
        generate(model, prompt, 14, temperature=0.0, use_cache=True),
        generate(model, prompt, 14, temperature=0.0, use_cache=False),
    )
    model.train()
    _, loss = model(tokens(B=4), tokens(B=4, seed=5))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gpt_ablation_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=256,
        block_size=32,
        n_layer=4,
        n_head=4,
        n_embd=128,
        attn="mla",
        mla=mla_cfg(dim=128, max_seq_len=32, q_lora_rank=64),
        mlp="moe",
        moe=MoEConfig(dim=128, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=64),
    )
    model = GPT(cfg)
    proj = 0.02 / math.sqrt(8)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        expected = proj if name.endswith(("attn.wo.weight", "experts.w2", "shared.w2.weight")) else 0.02
        assert abs(p.std().item() / expected - 1) < 0.08, (name, p.std().item(), expected)


def test_gpt_ablation_config_errors():
    with pytest.raises(ValueError, match="mla.dim"):
        GPTConfig(**GPT_SMALL, attn="mla", mla=mla_cfg(dim=48))
    with pytest.raises(ValueError, match="max_seq_len"):
        GPTConfig(**GPT_SMALL, attn="mla", mla=mla_cfg(max_seq_len=8))
    with pytest.raises(ValueError, match="moe.dim"):
        GPTConfig(**GPT_SMALL, mlp="moe", moe=moe_cfg(dim=48))
