"""Tests for arch/optimizers.py: the param-group table on the real GPT / GPT-MLA-MoE / Kimi models,
defaults, errors, and a few real training steps per optimizer."""

from __future__ import annotations

import pytest
import torch

from arch import optimizers
from arch.muon import Muon
from arch.optimizers import OPTIMIZERS, OptimizerConfig, describe_param_groups

V, BLOCK = 64, 16


def gpt(**overrides):
    from arch.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    base = dict(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32)
    return GPT(GPTConfig(**{**base, **overrides}))


def gpt_mla_moe():
    from arch.mla import MLAConfig
    from arch.moe import MoEConfig

    mla = MLAConfig(
        dim=32,
        n_heads=4,
        q_lora_rank=16,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        max_seq_len=BLOCK,
    )
    moe = MoEConfig(dim=32, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=16)
    return gpt(attn="mla", mla=mla, mlp="moe", moe=moe)


def kimi(**overrides):
    from arch.kimi import Kimi, KimiConfig

    torch.manual_seed(0)
    cfg = dict(
        vocab_size=V,
        block_size=BLOCK,
        n_layer=3,
        dim=32,
        n_heads=4,
        q_lora_rank=16,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        inter_dim=48,
        n_dense_layers=1,
        n_routed_experts=4,
        n_activated_experts=2,
        moe_inter_dim=16,
        n_shared_experts=1,
    )
    return Kimi(KimiConfig(**{**cfg, **overrides}))


MODELS = {
    "gpt": gpt,
    "gpt_untied": lambda: gpt(tie_embeddings=False),
    "gpt_mla_moe": gpt_mla_moe,
    "kimi": kimi,
    "kimi_plain_q": lambda: kimi(q_lora_rank=0),
}


def expected_group(name: str, p: torch.Tensor) -> str:
    """The table in arch/optimizers.py, written out by name for the models' parameter names."""
    last = name.split(".")
    if name in ("transformer.wte.weight", "transformer.wpe.weight", "embed.weight", "lm_head.weight", "head.weight"):
        return "adamw"
    if name.endswith("gate.weight"):
        return "adamw"
    if last[-1] == "bias" or any(n in name for n in ("ln_1", "ln_2", "ln_f", "_norm.", "norm.weight")):
        assert p.ndim == 1, name
        return "adamw_no_decay"
    if name.endswith("attn.c_attn.weight"):
        return "muon_qkv"
    assert p.ndim in (2, 3), name
    return "muon"


@pytest.mark.parametrize("model_name", list(MODELS))
def test_param_groups_follow_the_table(model_name):
    model = MODELS[model_name]()
    cfg = OptimizerConfig(name="muon")
    rows = describe_param_groups(model, cfg)
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _, _ in rows] == names  # every parameter once, model order
    params = dict(model.named_parameters())
    for name, group, shape in rows:
        assert group == expected_group(name, params[name]), name
        assert shape == tuple(params[name].shape)
    groups = {g for _, g, _ in rows}
    assert {"muon", "adamw", "adamw_no_decay"} <= groups
    if model_name.startswith("kimi") or model_name == "gpt_mla_moe":  # stacked experts in Muon, router not
        assert any(g == "muon" and len(s) == 3 for n, g, s in rows if "experts.w" in n)
        assert all(g == "adamw" for n, g, _ in rows if n.endswith("gate.weight"))


@pytest.mark.parametrize("model_name", ["gpt", "gpt_mla_moe", "kimi"])
@pytest.mark.parametrize("opt_name", ["adamw", "muon", "muonclip"])
def test_built_optimizer_partitions_parameters(model_name, opt_name):
    model = MODELS[model_name]()
    cfg = OptimizerConfig(name=opt_name, lr=1e-3, weight_decay=0.1, muon_weight_decay=0.1)
    opt = cfg.build(model)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    by_name = {g["name"]: g for g in opt.param_groups}
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters() if p.ndim >= 2}  # nanoGPT's rule
    if opt_name == "adamw":
        assert type(opt) is torch.optim.AdamW
        assert set(by_name) == {"adamw", "adamw_no_decay"}
        assert by_name["adamw"]["lr"] == 1e-3 and by_name["adamw"]["betas"] == (0.9, 0.99)
    else:
        assert isinstance(opt, Muon)
        assert by_name["muon"]["use_muon"] and by_name["muon"]["lr"] == 0.02
        assert not by_name["adamw"]["use_muon"] and by_name["adamw"]["lr"] == 1e-3
        assert by_name["adamw_no_decay"]["weight_decay"] == 0.0
        if model_name == "gpt":
            assert by_name["muon_qkv"]["split"] == 3
        assert (opt.qk_clip_model is model) == (opt_name == "muonclip")


def test_adamw_arm_is_nanogpt_configure_optimizers():
    model = gpt(tie_embeddings=False)
    opt = OptimizerConfig(name="adamw", weight_decay=0.1).build(model)
    decay, no_decay = (g for g in opt.param_groups)
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in decay["params"]} == {id(p) for p in params if p.dim() >= 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in params if p.dim() < 2}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_muon_lr_and_weight_decay_defaults():
    model = gpt()
    assert OptimizerConfig(name="muon").resolved_muon_lr == 0.02
    cfg = OptimizerConfig(name="muon", lr=3e-3, muon_scaling="match_rms_adamw")
    assert cfg.resolved_muon_lr == 3e-3  # Moonlight: AdamW's lr carries over
    opt = cfg.build(model)
    muon = next(g for g in opt.param_groups if g["name"] == "muon")
    assert muon["adjust_lr_fn"] == "match_rms_adamw" and muon["lr"] == 3e-3 and muon["weight_decay"] == 0.0
    adamw = next(g for g in opt.param_groups if g["name"] == "adamw")
    assert adamw["weight_decay"] == 0.1 and not adamw["use_muon"]
    opt = OptimizerConfig(name="muon", muon_lr=0.05, muon_weight_decay=0.0).build(model)
    muon = next(g for g in opt.param_groups if g["name"] == "muon")
    assert muon["lr"] == 0.05 and muon["weight_decay"] == 0.0


def test_split_qkv_can_be_turned_off():
    rows = describe_param_groups(gpt(), OptimizerConfig(name="muon", muon_split_qkv=False))
    assert all(g == "muon" for n, g, _ in rows if n.endswith("c_attn.weight"))


def test_defaults_are_the_documented_ones():
    """The module docstring's defaults are the dataclass's, and the Muon arms write theirs out."""
    adamw, muon, clip = (OptimizerConfig(name=n) for n in ("adamw", "muon", "muonclip"))
    assert (adamw.lr, adamw.betas, adamw.weight_decay, adamw.eps) == (1e-3, (0.9, 0.99), 0.1, 1e-8)
    assert (adamw.muon_lr, adamw.muon_weight_decay) == (None, None)  # unused by AdamW, logged as null
    for cfg in (muon, clip):
        assert (cfg.muon_lr, cfg.muon_weight_decay, cfg.momentum, cfg.nesterov, cfg.ns_steps) == (
            0.02,
            0.0,
            0.95,
            True,
            5,
        )
        assert cfg.muon_scaling == "original" and cfg.qk_clip_tau == 100.0
    doc = optimizers.__doc__
    for text in (
        "lr 1e-3, betas (0.9, 0.99)",
        "weight_decay 0.1",
        "eps 1e-8",
        "muon_lr 0.02",
        "muon_weight_decay 0",
        "qk_clip_tau 100",
        "momentum 0.95",
    ):
        assert text in doc, text


def test_unknown_name_lists_the_choices():
    """arch/ gives the choices; the "did you mean" comes from the harness (tests/harness/test_matrix.py)."""
    with pytest.raises(ValueError, match=r"optim.name: unknown 'adamww'; choices: adamw, muon, muonclip"):
        OptimizerConfig(name="adamww")
    with pytest.raises(ValueError, match=r"optim.muon_scaling: unknown 'moonlight'; .*choices: original"):
        OptimizerConfig(muon_scaling="moonlight")
    with pytest.raises(ValueError, match=r"optim.lr: must be > 0"):
        OptimizerConfig(lr=0.0)
    cfg = OptimizerConfig()
    cfg.name = "sgd"  # validated again at build time
    with pytest.raises(ValueError, match="unknown 'sgd'"):
        cfg.build(gpt())
    assert "\n" not in str(pytest.raises(ValueError, OptimizerConfig, name="x").value)


def test_registry_names():
    assert set(OPTIMIZERS) == {"adamw", "muon", "muonclip"}


def test_muonclip_needs_attention():
    with pytest.raises(ValueError, match="muonclip"):
        OptimizerConfig(name="muonclip").build(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("opt_name", ["muon", "muonclip"])
def test_muon_arms_batch_newton_schulz_by_shape(opt_name, monkeypatch):
    """The trainer's Muon arms take the batched path: one Newton-Schulz call per matrix shape, not per
    parameter (kimi: 3-D expert stacks, several layers of each projection)."""
    import arch.muon as muon_module

    model = kimi()
    opt = OptimizerConfig(name=opt_name).build(model)
    shapes, n_params = set(), 0
    for g in (g for g in opt.param_groups if g["use_muon"]):
        for p in g["params"]:
            shapes.add((p.shape[-2] // g["split"], p.shape[-1]))
            n_params += 1
            p.grad = torch.randn_like(p)
    calls = []
    original = muon_module.zeropower_via_newtonschulz5
    monkeypatch.setattr(
        muon_module, "zeropower_via_newtonschulz5", lambda G, **kw: calls.append(G) or original(G, **kw)
    )
    opt.step()
    assert opt.batched_ns and len(calls) == len(shapes) < n_params


def test_fused_auto_is_off_on_cpu():
    opt = OptimizerConfig(name="adamw").build(gpt())
    assert not any(g["fused"] for g in opt.param_groups)


@pytest.mark.parametrize("model_name", ["gpt", "kimi"])
@pytest.mark.parametrize("opt_name", ["adamw", "muon", "muonclip"])
@pytest.mark.slow
def test_training_steps_reduce_loss(model_name, opt_name):
    """A few real steps on one fixed batch: the loss must fall (memorization), every arm, both models."""
    model = MODELS[model_name]()
    lr = 3e-3
    opt = OptimizerConfig(name=opt_name, lr=lr, weight_decay=0.0, qk_clip_tau=50.0).build(model)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (4, BLOCK), generator=g)
    losses = []
    for _ in range(8):
        _, loss = model(idx, idx.roll(-1, dims=1))
        opt.zero_grad(set_to_none=True)
        (loss + model.aux_loss).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    if opt_name == "muonclip":
        assert opt.last_qk_clip["modules"] == model.config.n_layer
