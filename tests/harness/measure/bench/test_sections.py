"""Each bench section on CPU at the tiny preset: its rows, their arithmetic, and failures as rows. Sized for 2
shared cores (1-2 timed calls, vocabulary 256); timings are not checked."""

from __future__ import annotations

import pytest

from harness.errors import UserError
from harness.measure.bench.attention import bench_attention
from harness.measure.bench.decode import bench_decode
from harness.measure.bench.kit import TimingSettings, check_choices, preset_dims
from harness.measure.bench.moe_layer import bench_moe_layer
from harness.measure.bench.optim_step import bench_optimizer_step, fill_grads, ns_gflop, split_muon
from harness.measure.bench.train_step import bench_train_step
from harness.spec.registry import build_model, resolve_optimizer

VOCAB = 256
FAST = TimingSettings(repeats=1, warmup=0, rounds=1, min_run_time=0.001)


@pytest.mark.slow
def test_train_step_rows_on_cpu():
    gpt = bench_train_step(
        "gpt", "tiny", "cpu", micro_batch=2, vocab_size=VOCAB, peak_flops=1e12, matmul_peak=1e10, timing=FAST
    )
    assert gpt["status"] == "ok", gpt["status"]
    assert gpt["tokens_per_s"] == pytest.approx(2 * 64 / (gpt["step_ms"] / 1e3))
    assert gpt["mfu"] == pytest.approx(gpt["flops_per_token"] * gpt["tokens_per_s"] / 1e12)
    assert gpt["of_matmul_peak"] == pytest.approx(gpt["mfu"] * 100)
    assert gpt["host_syncs"] is None and gpt["peak_mem_gib"] is None  # CUDA-only columns
    assert "top_kernels" not in gpt
    kimi = bench_train_step(
        "kimi",
        "tiny",
        "cpu",
        optimizer="muon",
        micro_batch=2,
        vocab_size=VOCAB,
        timing=FAST,
        profile=True,
    )
    assert kimi["status"] == "ok", kimi["status"]
    assert kimi["mfu"] is None  # no datasheet peak on CPU
    assert kimi["moe_dispatch"] in ("grouped_mm", "loop")
    parts = kimi["fwd_bwd_ms"] + kimi["clip_ms"] + kimi["opt_ms"] + kimi["rest_ms"]
    assert parts == pytest.approx(kimi["step_ms"], rel=1e-6)  # one repeat: the phases tile the step
    shares = [k["share"] for k in kimi["top_kernels"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9


@pytest.mark.slow
def test_train_step_failure_is_a_row_not_an_exception():
    row = bench_train_step("gpt", "tiny", "cpu", optimizer="lion", micro_batch=2, vocab_size=VOCAB, timing=FAST)
    assert row["status"].startswith("error: UserError: optimizer: unknown name 'lion'")


def test_moe_layer_rows():
    rows = bench_moe_layer("tiny", "cpu", micro_batch=1, timing=FAST, profile=True)
    names = [r["layer"] for r in rows]
    assert names[0] == "moe/loop" and any(n.startswith("dense-active") for n in names)
    assert names[-1].startswith("all-experts")
    dense = next(r for r in rows if r["layer"].startswith("dense"))
    moe = rows[0]
    assert dense["vs_dense"] == 1.0 and all(r["status"] == "ok" for r in rows)
    # tiny: dim 64, 4 experts top-2 of width 64, one shared expert of width 64: dense width 2*64 + 64
    assert dense["active_params"] == 3 * 64 * 192
    assert moe["active_params"] == dense["active_params"] + 4 * 64  # plus the router
    profiled = [r for r in rows if "top_kernels" in r]
    assert len(profiled) == 1 and profiled[0]["layer"].startswith("moe/")


@pytest.mark.slow
def test_decode_rows_measure_the_cache():
    rows = bench_decode(
        "gpt", "tiny", "cpu", batch_sizes=(1, 2), prompt_len=8, new_tokens=2, vocab_size=VOCAB, timing=FAST
    )
    mla = bench_decode(
        "gpt-mla",
        "tiny",
        "cpu",
        batch_sizes=(2,),
        prompt_len=8,
        new_tokens=2,
        vocab_size=VOCAB,
        timing=FAST,
        profile_batch=2,
    )
    for r in rows + mla:
        assert r["status"] == "ok", r["status"]
        assert r["kv_bytes_per_token"] == r["kv_bytes_per_token_counted"]  # fp32 on CPU: 4 bytes a value
        assert r["tokens_per_s"] > 0
    assert rows[0]["kv_bytes_per_token"] == 4 * 2 * 2 * 64  # 2 layers x (k + v) x n_embd
    assert mla[0]["kv_bytes_per_token"] == 4 * 2 * (32 + 8)  # 2 layers x (kv_lora_rank + rope dim)
    assert "top_kernels" in mla[0] and "top_kernels" not in rows[0]
    with pytest.raises(UserError, match="block_size"):
        bench_decode("gpt", "tiny", "cpu", prompt_len=60, new_tokens=10, vocab_size=VOCAB)


def test_optimizer_rows():
    adamw, muon = bench_optimizer_step("gpt", "tiny", "cpu", vocab_size=VOCAB, timing=FAST)
    assert (adamw["optimizer"], muon["optimizer"]) == ("adamw", "muon")
    assert adamw["status"] == muon["status"] == "ok"
    for key in ("step_ms", "muon_groups_ms", "adamw_groups_ms", "ns_gflop"):
        assert muon[key] > 0, key
    assert muon["ns_tflops"] == pytest.approx(muon["ns_gflop"] / muon["muon_groups_ms"])


def test_split_muon_and_ns_gflop():
    model = build_model("gpt", preset_dims("tiny", VOCAB))
    fill_grads(model)
    opt = resolve_optimizer("muon").build(model)
    muon_part, adamw_part = split_muon(opt)
    assert all(g["use_muon"] for g in muon_part.param_groups)
    assert not any(g["use_muon"] for g in adamw_part.param_groups)
    assert muon_part.batched_ns and opt.batched_ns  # the Muon groups are timed on the trainer's (batched) path
    # tiny gpt, 2 layers of dim 64: c_attn as three [64, 64], c_proj [64, 64], c_fc [256, 64], mlp c_proj [64, 256]
    per_layer = 4 * (4 * 64 * 64 * 64 + 2 * 64**3) + 2 * (4 * 64 * 64 * 256 + 2 * 64**3)
    assert ns_gflop(opt) == pytest.approx(2 * 5 * per_layer / 1e9)


def test_attention_rows():
    rows = bench_attention("tiny", "cpu", micro_batch=1, timing=FAST)
    assert [(r["kind"], r["d_qk"], r["d_v"]) for r in rows if r["backend"] == "default"] == [
        ("mha", 16, 16),
        ("mla", 24, 16),
    ]
    assert all(r["status"] == "ok" for r in rows if r["backend"] == "default")
    mla_flash = [r for r in rows if r["kind"] == "mla" and r["backend"] == "flash_attention"]
    if mla_flash:  # flash needs equal q/k/v head dims: MLA's 24/16 is refused
        assert mla_flash[0]["status"].startswith("not eligible")


def test_check_choices_suggests():
    with pytest.raises(UserError, match="did you mean 'kimi'"):
        check_choices("--variants", ["kimmi"], ("gpt", "kimi"))
    with pytest.raises(UserError, match="empty"):
        check_choices("--variants", [" "], ("gpt",))
