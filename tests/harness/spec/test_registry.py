"""harness/spec/registry.py: presets build the shapes and parameter counts a hand count gives; each default is written
once (ModelDims and the arch/ configs agree); user-typed fields fail in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from arch.gpt import GPTConfig
from arch.kimi import KimiConfig
from arch.mla import MLAConfig
from arch.moe import MoEConfig
from arch.optimizers import OptimizerConfig
from harness.errors import UserError
from harness.spec.registry import (
    PRESETS,
    VARIANTS,
    ModelDims,
    TrainConfig,
    TrialSpec,
    build_model,
    dense_swiglu_width,
    resolve_dims,
    resolve_optimizer,
    variant_params,
)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tiny_gpt_has_the_hand_counted_parameters():
    # n_layer 2, dim 64, 4 heads, block 64, vocab 256, biases, tied head:
    #   wte 256*64 = 16384, wpe 64*64 = 4096, ln_f 128
    #   per block: ln_1 128 + c_attn 64*192+192 = 12480 + c_proj 64*64+64 = 4160 + ln_2 128
    #              + c_fc 64*256+256 = 16640 + c_proj 256*64+64 = 16448  -> 49984
    model = build_model("gpt", resolve_dims("tiny", 256))
    assert n_params(model) == 16384 + 4096 + 128 + 2 * 49984 == 120576
    assert model.transformer.h[0].attn.c_attn.weight.shape == (192, 64)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_tiny_kimi_has_the_hand_counted_parameters():
    # untied embed and head 2 * 256*64, final norm 64;
    # MLA per layer (q_lora 0, kv_lora 32, nope 16, rope 8, v 16, 4 heads): norm 64 + wq 64*4*(16+8) = 6144
    #   + wkv_a 64*(32+8) = 2560 + kv_norm 32 + wkv_b 32*4*(16+16) = 4096 + wo 4*16*64 = 4096 -> 16992
    # layer 0 dense SwiGLU, width 176 (GPT-MLP params: 8*64/3 rounded up to 8): norm 64 + 3*176*64 -> 33856
    # layer 1 MoE: norm 64 + router 4*64 + 4 experts 3*64*64 each + shared 3*64*64 -> 61760
    model = build_model("kimi", resolve_dims("tiny", 256))
    assert n_params(model) == 2 * 16384 + 64 + 2 * 16992 + 33856 + 61760 == 162432
    assert model.layers[0].ffn.w1.weight.shape == (176, 64)
    assert model.layers[1].ffn.experts.w1.shape == (4, 64, 64)
    assert model.head.weight is not model.embed.weight


@pytest.mark.slow  # seconds even on the meta device
@pytest.mark.parametrize(
    "variant,preset,expected",
    [
        # arch/kimi.py: the nanoKimi paper's config has 75,118,080 parameters here (nanoKimi reports 75,351,936)
        ("kimi", "paper", 75_118_080),
        # GPT-2 124M: 124,439,808 at vocabulary 50257 (Hugging Face's gpt2), + 47*768 for nanoGPT's 50304
        ("gpt", "gpt2-124m", 124_439_808 + 47 * 768),
    ],
)
def test_big_presets_have_their_published_counts(variant, preset, expected):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(variant, resolve_dims(preset, 256))
    assert n_params(model) == expected


BIG = ("paper", "gpt2-124m", "small")


@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow) if p in BIG else p for p in PRESETS])
def test_every_preset_builds_every_variant_with_its_own_dims(preset):
    dims = resolve_dims(preset, 256)
    for variant in VARIANTS:
        with torch.device("meta"):
            model = build_model(variant, dims)
        assert model.config.block_size == dims.block_size and model.config.vocab_size == dims.vocab_size
        assert set(variant_params(variant, dims)) >= {"n_layer", "dim", "n_heads", "block_size", "vocab_size"}


def test_dense_swiglu_width_matches_the_gpt_mlp_and_rounds_to_8():
    assert dense_swiglu_width(384) == 1024  # 3*384*1024 = 8*384^2 exactly
    assert dense_swiglu_width(64) == 176  # 8*64/3 = 170.7 -> 176
    assert dense_swiglu_width(96) == 256


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


# ModelDims fields whose default differs from an arch config's on purpose: None defers the choice
DIFFERENT_ON_PURPOSE = {
    "tie_embeddings": "None: the gpt family ties (nanoGPT), kimi does not (K2/V3)",
    "vocab_size": "None: the tokenizer's vocabulary",
}


@pytest.mark.parametrize("arch_config", [KimiConfig, MoEConfig, MLAConfig, GPTConfig])
def test_model_dims_defaults_agree_with_the_arch_configs(arch_config):
    dims, arch = _defaults(ModelDims), _defaults(arch_config)
    shared = (set(dims) & set(arch)) - set(DIFFERENT_ON_PURPOSE)
    assert shared, arch_config  # the comparison covers something
    assert {k: dims[k] for k in shared} == {k: arch[k] for k in shared}


def test_kimi_config_takes_the_moe_and_mla_defaults():
    kimi = _defaults(KimiConfig)
    for sub in (MoEConfig, MLAConfig):
        shared = set(kimi) & set(_defaults(sub))
        assert shared and {k: kimi[k] for k in shared} == {k: _defaults(sub)[k] for k in shared}


def test_resolve_dims_takes_the_tokenizer_vocabulary_unless_the_preset_has_one():
    assert resolve_dims("tiny", 256).vocab_size == 256
    assert resolve_dims("paper", 256).vocab_size == 50257  # GPT-2's, covers the byte tokenizer
    assert resolve_dims("tiny", 256, {"n_layer": 3, "dim": 96}).n_layer == 3
    with pytest.raises(UserError, match=r"^model.vocab_size: 50257 is smaller than the tokenizer's 60000"):
        resolve_dims("paper", 60000)


@pytest.mark.parametrize(
    "preset,overrides,message",
    [
        ("tinny", {}, "preset: unknown name 'tinny'; did you mean 'tiny'"),
        ("tiny", {"n_layers": 2}, "model.n_layers: unknown model field; did you mean 'n_layer'"),
        ("tiny", {"n_layer": "2"}, "model.n_layer: "),
        ("tiny", {"dim": 0}, "model.dim: must be > 0 (got 0)"),
    ],
)
def test_bad_dims_are_one_line(preset, overrides, message):
    with pytest.raises(UserError) as e:
        resolve_dims(preset, 256, overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_bad_optimizer_fields_are_one_line():
    assert resolve_optimizer("adamw", {"lr": 1e-3}).lr == 1e-3
    with pytest.raises(UserError, match=r"^optimizer: unknown name 'adamv'; did you mean 'adamw'"):
        resolve_optimizer("adamv")
    with pytest.raises(UserError, match=r"^optim\.adamw\.lrr: unknown optimizer field; did you mean 'lr'"):
        resolve_optimizer("adamw", {"lrr": 1e-3})


def test_train_budget_in_steps_tokens_or_seconds():
    assert TrainConfig(steps=7).total_steps(64) == 7
    # 10,000 tokens / (8 rows x 64 tokens) = 19.5 -> 19 whole steps; never below one
    assert TrainConfig(tokens=10_000, micro_batch_size=8).total_steps(64) == 19
    assert TrainConfig(tokens=10, micro_batch_size=8).total_steps(64) == 1
    assert TrainConfig(tokens=10_000, micro_batch_size=8).total_steps(64, world_size=2) == 9
    assert TrainConfig(seconds=30.0).total_steps(64) is None
    with pytest.raises(ValueError, match="exactly one budget"):
        TrainConfig(steps=5, tokens=100)
    with pytest.raises(ValueError, match="exactly one budget"):
        TrainConfig()


def test_trial_key_follows_what_the_trial_computes():
    spec = TrialSpec(
        experiment="e",
        variant="gpt",
        optimizer="adamw",
        preset="tiny",
        seed=0,
        dims=resolve_dims("tiny", 256),
        optim=OptimizerConfig(name="adamw"),
        train=TrainConfig(steps=5),
    )
    key = spec.key("data-hash")
    assert key == dataclasses.replace(spec).key("data-hash")  # deterministic
    assert key != dataclasses.replace(spec, seed=1).key("data-hash")
    assert key != spec.key("other-data")
    assert key != dataclasses.replace(spec, train=TrainConfig(steps=6)).key("data-hash")
    assert spec.flat_params()["model.n_layer"] == 2 and spec.flat_params()["data_seed"] == 0
    assert spec.arm == "gpt+adamw" and spec.name == "gpt+adamw tiny s0"
