"""arch/counting.py against brute force: parameter sets, the gradients of one token, a FLOP counter on a
real forward + backward, and the bytes of real cache tensors; plus the nanoKimi paper's count."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from arch.counting import (
    ParamCounts,
    count_params,
    flops_per_token,
    kv_cache_bytes_per_token,
    matmul_params_active,
    summarize,
)
from arch.gpt import GPT, GPTConfig
from arch.kimi import NANOKIMI_PAPER, NANOKIMI_PAPER_REPORTED_PARAMS, Kimi, KimiConfig
from arch.mla import MLAConfig
from arch.moe import MoEConfig

V, BLOCK = 53, 16
MLA = MLAConfig(
    dim=32,
    n_heads=4,
    q_lora_rank=16,
    kv_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    max_seq_len=BLOCK,
)
MOE = MoEConfig(dim=32, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=16)
KIMI = KimiConfig(
    vocab_size=V,
    block_size=BLOCK,
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
    shared_inter_dim=24,
)
VARIANTS = ["gpt", "gpt-untied", "gpt-mla", "gpt-moe", "kimi"]


def build(variant: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    base = dict(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32)
    model = {
        "gpt": lambda: GPT(GPTConfig(**base)),
        "gpt-untied": lambda: GPT(GPTConfig(**base, tie_embeddings=False)),
        "gpt-mla": lambda: GPT(GPTConfig(**base, attn="mla", mla=MLA)),
        "gpt-moe": lambda: GPT(GPTConfig(**base, mlp="moe", moe=MOE)),
        "kimi": lambda: Kimi(KIMI),
    }[variant]().double()
    with torch.no_grad():  # O(1) weights: no gradient underflows to exactly zero by accident
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(20)
    return model.eval()


EMBEDDING_NAMES = {"transformer.wte.weight", "transformer.wpe.weight", "embed.weight"}


# --------------------------------------------------------------------------- total, embedding


@pytest.mark.parametrize("variant", VARIANTS)
def test_total_and_embedding_by_brute_force(variant):
    model = build(variant)
    by_storage = {}  # tied tensors share storage: count each storage once
    for name, p in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(p.untyped_storage().data_ptr(), (name, p.numel()))
    total = sum(n for _, n in by_storage.values())
    embedding = sum(n for name, n in by_storage.values() if name in EMBEDDING_NAMES)
    c = count_params(model)
    assert (c.total, c.embedding, c.non_embedding) == (total, embedding, total - embedding)
    assert isinstance(c, ParamCounts)
    if variant.startswith("gpt") and variant != "gpt-untied":  # nanoGPT's own count = total - wpe
        assert model.get_num_params() == total - model.transformer.wpe.weight.numel()


# --------------------------------------------------------------------------- active


@pytest.mark.parametrize("variant", VARIANTS)
def test_active_params_are_those_one_token_touches(variant):
    """Backpropagate the loss of ONE token (decoded against a cached prefix, so earlier tokens' experts
    are not in the graph). A tensor counts when any of its entries gets gradient; a stacked expert
    tensor [E, ...] holds E separate matrices and counts the slices that get gradient. Embedding tables
    count whole (the convention; the token reads one row)."""
    model = build(variant, seed=1)
    idx = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(2))
    cache = model.make_cache(1, 6)
    with torch.no_grad():
        model(idx[:, :5], cache=cache)
    logits, _ = model(idx[:, 5:6], cache=cache)
    F.cross_entropy(logits[0], torch.tensor([7])).backward()
    touched, experts_used = 0, []
    for name, p in model.named_parameters():
        if p.grad is None or not p.grad.any():
            continue
        if ".experts." in name:
            used = p.grad.flatten(1).any(dim=1)  # which of the E expert matrices got gradient
            experts_used.append(int(used.sum()))
            touched += int(used.sum()) * p[0].numel()
        else:
            touched += p.numel()
    c = count_params(model)
    assert c.active == touched
    if "moe" in variant or variant == "kimi":
        assert set(experts_used) == {2} and c.active < c.total  # top-2 in every MoE layer
    else:
        assert c.active == c.total


def test_active_formula_for_moe():
    model = build("kimi")
    E, k = 4, 2
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert count_params(model).active == count_params(model).total - routed * (E - k) // E


# --------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_equal_a_flop_counter_on_forward_backward(variant):
    """FlopCounterMode counts matmul-family ops (mm, addmm, bmm, attention kernels) of the real forward
    and backward. Norms, softmax, activations, the loss and the embedding lookups cost FLOPs too, but
    they are not matmuls and not in our formula either, so the comparison is exact (tolerance 0):
    any missed or double-counted weight, head, or attention product would show. The math SDPA backend
    is used because the CPU flash kernel is not registered with the counter (it would count 0)."""
    model = build(variant).train()
    B, T = 2, 12
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        _, loss = model(idx, idx)
        loss.backward()
    assert counter.get_total_flops() == B * T * flops_per_token(model, T)


def test_flops_match_nanogpts_estimate_up_to_norms_and_biases():
    """nanoGPT's estimate_mfu: 6 * N + 12 * L * H * Q * T with N = get_num_params() (which includes
    LayerNorm gains and biases, 0.1% of GPT-2). Our formula differs by exactly 6 * (those parameters)."""
    with torch.device("meta"):
        model = GPT(GPTConfig())  # GPT-2 124M, vocab 50304
    L, H, Q, T = 12, 12, 64, 1024
    nanogpt = 6 * model.get_num_params() + 12 * L * H * Q * T
    gains_and_biases = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert flops_per_token(model, T) == nanogpt - 6 * gains_and_biases
    assert abs(flops_per_token(model, T) / nanogpt - 1) < 1e-3


# --------------------------------------------------------------------------- KV cache


def cache_bytes(cache) -> int:
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in vars(layer).values()
        if isinstance(t, torch.Tensor)
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype,nbytes", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_kv_bytes_equal_the_real_cache(variant, dtype, nbytes):
    model = build(variant).to(dtype)
    B, max_len = 3, 10
    cache = model.make_cache(B, max_len)
    assert cache_bytes(cache) == B * max_len * kv_cache_bytes_per_token(model, nbytes)
    L = len(cache.layers)
    expected = 2 * L * 32 if variant in ("gpt", "gpt-untied", "gpt-moe") else L * (12 + 4)
    assert kv_cache_bytes_per_token(model, nbytes) == expected * nbytes


# --------------------------------------------------------------------------- reference configs


def test_nanokimi_paper_config_count():
    """nanoKimi's count, rebuilt from its code (amanmurari/nanokimi, kimi/attention.py, kimi/moe.py):
    per layer, attention 516,608 + MoE 5,608,320 + two norms 768; plus embedding, untied head, final
    norm. Ours differs only by the three documented architectural differences (see arch/kimi.py)."""
    d, h, hd, kv, q, r, E, inter, shared, vocab, L = 384, 4, 96, 128, 192, 32, 8, 512, 768, 50257, 6
    nk_attn = (
        d * kv
        + kv
        + kv * h * hd * 2  # kv_proj, kv_norm, k/v decompress
        + d * q
        + q * h * hd  # q_proj, q_decompress
        + d * h * r
        + q * h * r  # per-head rope keys from x, rope queries
        + h * hd * d
        + d
    )  # o_proj with bias
    nk_moe = d * E + E * 3 * d * inter + 3 * d * shared + 2 * shared + d  # shared SwiGLU with biases
    nanokimi = L * (nk_attn + nk_moe + 2 * d) + 2 * vocab * d + d
    assert (nk_attn, nk_moe, nanokimi) == (516_608, 5_608_320, NANOKIMI_PAPER_REPORTED_PARAMS)

    with torch.device("meta"):
        model = Kimi(NANOKIMI_PAPER)
    c = count_params(model)
    per_layer_diff = -(d * h * r - d * r) - (d + 2 * shared + d) + q  # shared rope key, biases, q_norm
    assert per_layer_diff == -38_976
    assert c.total == NANOKIMI_PAPER_REPORTED_PARAMS + L * per_layer_diff == 75_118_080
    assert c.embedding == vocab * d == 19_298_688
    assert c.active == c.total - L * (E - 2) * 3 * d * inter == 53_884_416
    assert kv_cache_bytes_per_token(model) == 2 * L * (kv + r)


def test_gpt2_reference_counts():
    """GPT-2 124M: 124,439,808 parameters (HF gpt2, vocab 50257, tied); nanoGPT prints 123.69M for its
    padded vocab 50304. nanoKimi's 'GPT_CONFIG_124M' untied is 163,009,536: GPT-2 + a 50257 x 768 head,
    minus the q/k/v biases it drops (qkv_bias=False): 124,439,808 + 38,597,376 - 12 * 2,304."""
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig(vocab_size=50257))
        padded = GPT(GPTConfig())
        untied = GPT(GPTConfig(vocab_size=50257, tie_embeddings=False))
    assert count_params(gpt2).total == 124_439_808
    assert padded.get_num_params() == 123_689_472
    assert count_params(untied).total - 12 * 3 * 768 == 163_009_536


def test_summarize_keys():
    model = build("kimi")
    s = summarize(model, seq_len=BLOCK)
    c = count_params(model)
    assert s["params/total"] == c.total and s["params/active"] == c.active
    assert s["params/embedding"] == c.embedding and s["params/non_embedding"] == c.non_embedding
    assert s["params/matmul_active"] == matmul_params_active(model)
    assert s["train/flops_per_token"] == flops_per_token(model, BLOCK)
    assert s["infer/kv_bytes_per_token"] == kv_cache_bytes_per_token(model, 2)
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(model, 0)
