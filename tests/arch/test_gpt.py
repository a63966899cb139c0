"""arch/gpt.py against an independent plain-tensor GPT-2, nanoGPT / Hugging Face weight layouts, the KV
cache, generation, init statistics and QK-Clip."""

import math

import pytest
import torch
import torch.nn.functional as F

from arch.common import generate
from arch.gpt import GPT, GPTConfig, load_nanogpt_checkpoint

SMALL = dict(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)


def random_model(seed=0, dtype=torch.float64, **overrides) -> GPT:
    """A small GPT whose every parameter (LayerNorm gains and biases included) is random and O(1)-ish, so
    a mix-up of any two tensors or a missing bias shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SMALL, **overrides})).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


# --------------------------------------------------------------------------- independent reference


def ref_gpt2_logits(sd: dict, cfg: dict, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2 from its definition, on nanoGPT-named tensors, with nothing from arch/ or torch.nn modules:
    LayerNorm, erf GELU, softmax attention with an explicit causal mask, tied or untied head."""

    def ln(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w + b

    def gelu(x):
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))

    B, T = idx.shape
    C, H = cfg["n_embd"], cfg["n_head"]
    D = C // H
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = ln(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        qkv = h @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(B, T, H, D).permute(0, 2, 1, 3) for t in qkv.split(C, dim=-1))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        s = torch.where(mask, s, torch.tensor(-math.inf, dtype=s.dtype))
        a = torch.exp(s - s.amax(-1, keepdim=True))
        a = a / a.sum(-1, keepdim=True)
        y = (a @ v).permute(0, 2, 1, 3).reshape(B, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"].T + sd[p + "attn.c_proj.bias"]
        h = ln(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    x = ln(x, sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"])
    return x @ sd["lm_head.weight"].T


def nanogpt_keys(n_layer: int) -> set[str]:
    """The parameter names of karpathy/nanoGPT's model.py (bias=True), written out by hand."""
    keys = {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        "lm_head.weight",
    }
    for i in range(n_layer):
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            keys |= {f"transformer.h.{i}.{m}.weight", f"transformer.h.{i}.{m}.bias"}
    return keys


def tokens(B=3, T=16, vocab=61, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_plain_tensor_reference(tie):
    model = random_model(tie_embeddings=tie)
    idx = tokens()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    assert set(sd) == nanogpt_keys(SMALL["n_layer"])
    ref = ref_gpt2_logits(sd, SMALL, idx)
    logits, loss = model(idx)
    assert loss is None
    assert logits.shape == (3, 16, SMALL["vocab_size"])  # all positions, always
    torch.testing.assert_close(logits, ref, atol=1e-9, rtol=0)


def test_loss_is_plain_cross_entropy_with_ignore_index():
    model = random_model()
    idx = tokens()
    targets = tokens(seed=2)
    targets[0, :5] = -1
    logits, loss = model(idx, targets)
    flat_logits, flat_t = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    keep = flat_t != -1
    by_hand = -(flat_logits[keep].log_softmax(-1).gather(1, flat_t[keep, None])).mean()
    torch.testing.assert_close(loss, by_hand, atol=1e-12, rtol=0)
    assert float(model.aux_loss) == 0.0


def test_bias_false_has_no_biases_and_runs():
    model = GPT(GPTConfig(**{**SMALL, "bias": False}))
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    logits, _ = model(tokens())
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------- weight formats


def test_nanogpt_checkpoint_loads(tmp_path):
    src = random_model(seed=3, dtype=torch.float32)  # nanoGPT checkpoints hold fp32 weights
    idx = tokens()
    model_args = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, bias=True, vocab_size=61, dropout=0.0)
    # what nanoGPT's train.py writes after torch.compile: every key prefixed `_orig_mod.`
    ckpt = {
        "model": {"_orig_mod." + k: v.clone() for k, v in src.state_dict().items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 6e-4, "params": [0, 1]}]},
        "model_args": model_args,
        "iter_num": 7,
        "best_val_loss": torch.tensor(2.5),
        "config": {"batch_size": 12, "learning_rate": 6e-4, "dataset": "openwebtext", "compile": True},
    }
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    loaded = load_nanogpt_checkpoint(path).eval()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(loaded(idx)[0], src(idx)[0])


def test_nanogpt_checkpoint_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "model_args": {}, "evil": _NotAllowlisted()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported"):
        load_nanogpt_checkpoint(path)


class _NotAllowlisted:
    pass


def test_nanogpt_checkpoint_bad_model_args(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "model_args": {"n_layer": 1, "use_rmsnorm": True}}, path)
    with pytest.raises(ValueError, match="use_rmsnorm"):
        load_nanogpt_checkpoint(path)


def to_hf(sd: dict, n_layer: int, block_size: int, prefix="transformer.", head=True) -> dict:
    """Our (nanoGPT-named) weights in Hugging Face GPT-2 layout: Conv1D weights are [in, out], i.e. the
    transpose of nn.Linear's; each block also carries the causal-mask buffers."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            if head:
                out[k] = v.clone()
            continue
        v = v.t().contiguous() if k.endswith(conv1d) else v.clone()
        out[prefix + k.removeprefix("transformer.")] = v
    for i in range(n_layer):
        out[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(block_size, block_size)).view(
            1, 1, block_size, block_size
        )
        out[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


@pytest.mark.parametrize("prefix,head", [("transformer.", True), ("", False)])
def test_hf_state_dict_loads(prefix, head):
    src = random_model(seed=4, dtype=torch.float32)
    idx = tokens()
    hf = to_hf(src.state_dict(), SMALL["n_layer"], SMALL["block_size"], prefix=prefix, head=head)
    assert hf[prefix + "h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: [in, out]
    model = GPT.from_hf_state_dict(hf, GPTConfig(**SMALL)).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model(idx)[0], src(idx)[0])


def test_hf_state_dict_wrong_shape_is_a_clear_error():
    hf = to_hf(random_model().state_dict(), 2, 16)
    with pytest.raises(ValueError, match="shape mismatches"):
        GPT.from_hf_state_dict(hf, GPTConfig(**{**SMALL, "vocab_size": 64}))


def test_from_pretrained_without_transformers_is_clear():
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install transformers"):
            GPT.from_pretrained("gpt2")
    else:
        pytest.skip("transformers installed; from_pretrained would download weights")


# --------------------------------------------------------------------------- cache and generation


def test_cached_decode_equals_full_forward():
    model = random_model(seed=5)
    idx = tokens(B=2, T=16)
    full, _ = model(idx)
    # token by token
    cache = model.make_cache(2, 16)
    for t in range(16):
        step, _ = model(idx[:, t : t + 1], cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-10, rtol=0)
    assert cache.pos == 16
    # chunked prefill: a chunk of several tokens at pos > 0 needs the offset causal mask
    cache = model.make_cache(2, 16)
    outs = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 13), (13, 16))]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-10, rtol=0)


def test_cache_bounds():
    model = random_model()
    with pytest.raises(ValueError, match="block_size"):
        model.make_cache(1, 17)
    cache = model.make_cache(1, 16)
    model(tokens(B=1, T=16), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(B=1, T=1), cache=cache)


def test_generate_with_and_without_cache_same_greedy_tokens():
    model = random_model(seed=6)
    prompt = tokens(B=2, T=5)
    # 20 new tokens outgrow block_size 16: the cached path must re-prefill like the uncached one
    a = generate(model, prompt, 20, temperature=0.0, use_cache=True)
    b = generate(model, prompt, 20, temperature=0.0, use_cache=False)
    assert a.shape == (2, 25)
    assert torch.equal(a, b)
    # and greedy really is argmax of the full forward over the last block_size tokens
    assert torch.equal(model(a[:, :15])[0][:, -1].argmax(-1), a[:, 15])
    assert torch.equal(model(a[:, 8:24])[0][:, -1].argmax(-1), a[:, 24])


# --------------------------------------------------------------------------- init, tying


def test_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg)
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            expected = proj_std
        elif p.dim() == 2:
            expected = 0.02
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
            continue
        else:  # LayerNorm gains
            assert torch.all(p == 1), name
            continue
        assert abs(p.mean().item()) < 4 * expected / math.sqrt(p.numel()), name
        assert abs(p.std().item() / expected - 1) < 0.05, (name, p.std().item(), expected)
    torch.manual_seed(0)
    again = GPT(cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


def test_tied_weights_are_one_tensor():
    tied = GPT(GPTConfig(**SMALL))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert "lm_head.weight" not in dict(tied.named_parameters())  # counted once
    untied = GPT(GPTConfig(**{**SMALL, "tie_embeddings": False}))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    extra = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert extra == SMALL["vocab_size"] * SMALL["n_embd"]


# --------------------------------------------------------------------------- max logit, QK-Clip


def head_logits(model: GPT, idx: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """Pre-softmax logits [B, H, T, T] of one layer, from c_attn's weights by hand."""
    cfg = model.config
    D = cfg.n_embd // cfg.n_head
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.size(1)))
    for blk in model.transformer.h[:layer]:
        x = blk(x)
    h = model.transformer.h[layer].ln_1(x)
    q, k, _ = model.transformer.h[layer].attn.c_attn(h).split(cfg.n_embd, dim=-1)
    q = q.view(*idx.shape, cfg.n_head, D).transpose(1, 2)
    k = k.view(*idx.shape, cfg.n_head, D).transpose(1, 2)
    return q @ k.transpose(-1, -2) / math.sqrt(D)


def test_track_max_logit_is_causal_max_per_head():
    model = random_model(seed=7)
    idx = tokens()
    attn = model.transformer.h[1].attn
    model(idx)
    assert attn.max_logit is None  # off by default: nothing computed
    attn.track_max_logit = True
    model(idx)
    s = head_logits(model, idx, layer=1)
    causal = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    expected = s.masked_fill(~causal, -math.inf).amax(dim=(0, 2, 3))
    assert attn.max_logit.dtype == torch.float32 and not attn.max_logit.requires_grad
    torch.testing.assert_close(attn.max_logit, expected.float(), atol=1e-5, rtol=1e-6)


def test_qk_clip_scales_one_head_only():
    model = random_model(seed=8)
    idx = tokens()
    attn = model.transformer.h[0].attn
    before = head_logits(model, idx)
    w0, b0 = attn.c_attn.weight.detach().clone(), attn.c_attn.bias.detach().clone()
    gamma = torch.tensor([1.0, 0.37, 1.0, 1.0], dtype=torch.float64)
    attn.qk_clip_(gamma)
    after = head_logits(model, idx)
    torch.testing.assert_close(after[:, 1], 0.37 * before[:, 1], atol=1e-12, rtol=1e-12)
    D, C = 8, 32
    rows_h1 = torch.zeros(3 * C, dtype=torch.bool)
    rows_h1[D : 2 * D] = True  # head 1's q rows
    rows_h1[C + D : C + 2 * D] = True  # head 1's k rows
    # other heads' q/k rows and all v rows: bit-identical
    assert torch.equal(attn.c_attn.weight[~rows_h1], w0[~rows_h1])
    assert torch.equal(attn.c_attn.bias[~rows_h1], b0[~rows_h1])
    torch.testing.assert_close(attn.c_attn.weight[rows_h1], w0[rows_h1] * math.sqrt(0.37), atol=0, rtol=1e-15)
    for h in (0, 2, 3):
        assert torch.equal(after[:, h], before[:, h])
    assert not attn.c_attn.weight.requires_grad or attn.c_attn.weight.grad is None


def test_config_validation():
    with pytest.raises(ValueError, match="attn"):
        GPTConfig(attn="gqa")
    with pytest.raises(ValueError, match="mla"):
        GPTConfig(attn="mla")
    with pytest.raises(ValueError, match="moe"):
        GPTConfig(mlp="moe")
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=30, n_head=4)
    assert F is not None
