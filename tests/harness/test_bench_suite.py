"""harness/bench/suite.py on CPU at the tiny preset: every measurement's code path, the record, the targets,
the CLI options, and the proposed changes against the code they would replace. Sized for 2 shared cores
(1-2 timed repeats, vocabulary 256); the numbers themselves are not checked, only their shape."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from harness.bench import suite
from harness.bench.optim_step import fill_grads
from harness.bench.suite import (
    SECTIONS,
    TARGETS,
    Stats,
    bench_attention,
    bench_command,
    bench_decode,
    bench_moe_layer,
    bench_optimizer_step,
    bench_train_step,
    default_record_path,
    device_slug,
    evaluate_targets,
    merge_records,
    preset_dims,
    proposed_mla_decode,
    proposed_optimizer_step,
    run_suite,
    sdpa_v_padded,
    time_calls,
)
from harness.errors import UserError
from harness.registry import build_model, resolve_optimizer

VOCAB = 256
FAST = dict(repeats=1, warmup=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a loaded 2-core machine: a second torch thread only adds barrier waits (20 ms a matmul)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_time_calls_counts_warmup_and_repeats():
    calls = []
    stats = time_calls(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and stats.n == 3 and stats.median >= 0
    s = Stats.of([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.median == 3.0 and s.p10 <= s.median <= s.p90


def test_train_step_rows_on_cpu():
    gpt = bench_train_step("gpt", "tiny", "cpu", micro_batch=2, vocab_size=VOCAB, peak_flops=1e12,
                           matmul_peak=1e10, **FAST)
    assert gpt["status"] == "ok", gpt["status"]
    assert gpt["tokens_per_s"] == pytest.approx(2 * 64 / (gpt["step_ms"] / 1e3))
    assert gpt["mfu"] == pytest.approx(gpt["flops_per_token"] * gpt["tokens_per_s"] / 1e12)
    assert gpt["of_matmul_peak"] == pytest.approx(gpt["mfu"] * 100)
    assert gpt["host_syncs"] is None and gpt["peak_mem_gib"] is None  # CUDA-only columns
    kimi = bench_train_step("kimi", "tiny", "cpu", optimizer="muon", micro_batch=2, vocab_size=VOCAB, **FAST)
    assert kimi["status"] == "ok", kimi["status"]
    assert kimi["mfu"] is None  # no datasheet peak on CPU
    assert kimi["moe_dispatch"] in ("grouped_mm", "loop")
    parts = kimi["fwd_bwd_ms"] + kimi["clip_ms"] + kimi["opt_ms"] + kimi["rest_ms"]
    assert parts == pytest.approx(kimi["step_ms"], rel=1e-6)  # one repeat: the phases tile the step


def test_train_step_failure_is_a_row_not_an_exception():
    row = bench_train_step("gpt", "tiny", "cpu", optimizer="lion", micro_batch=2, vocab_size=VOCAB, **FAST)
    assert row["status"].startswith("error: UserError: optimizer: unknown name 'lion'")


def test_moe_layer_rows():
    rows = bench_moe_layer("tiny", "cpu", micro_batch=1, **FAST)
    names = [r["layer"] for r in rows]
    assert names[0] == "moe/loop" and any(n.startswith("dense-active") for n in names)
    assert names[-1].startswith("all-experts")
    dense = next(r for r in rows if r["layer"].startswith("dense"))
    moe = rows[0]
    assert dense["vs_dense"] == 1.0 and all(r["status"] == "ok" for r in rows)
    # tiny: dim 64, 4 experts top-2 of width 64, one shared expert of width 64: dense width 2*64 + 64
    assert dense["active_params"] == 3 * 64 * 192
    assert moe["active_params"] == dense["active_params"] + 4 * 64  # plus the router


def test_decode_rows_measure_the_cache():
    rows = bench_decode("gpt", "tiny", "cpu", batch_sizes=(1, 2), prompt_len=8, new_tokens=2, vocab_size=VOCAB, **FAST)
    mla = bench_decode("gpt-mla", "tiny", "cpu", batch_sizes=(2,), prompt_len=8, new_tokens=2, vocab_size=VOCAB,
                       proposed=True, **FAST)
    for r in rows + mla:
        assert r["status"] == "ok", r["status"]
        assert r["kv_bytes_per_token"] == r["kv_bytes_per_token_counted"]  # fp32 on CPU: 4 bytes a value
        assert r["tokens_per_s"] > 0
    assert rows[0]["kv_bytes_per_token"] == 4 * 2 * 2 * 64  # 2 layers x (k + v) x n_embd
    assert mla[0]["kv_bytes_per_token"] == 4 * 2 * (32 + 8)  # 2 layers x (kv_lora_rank + rope dim)
    assert mla[0]["impl"].startswith("proposed")
    with pytest.raises(UserError, match="block_size"):
        bench_decode("gpt", "tiny", "cpu", prompt_len=60, new_tokens=10, vocab_size=VOCAB)


def test_optimizer_rows():
    adamw, muon = bench_optimizer_step("gpt", "tiny", "cpu", vocab_size=VOCAB, **FAST)
    assert (adamw["optimizer"], muon["optimizer"]) == ("adamw", "muon")
    assert adamw["status"] == muon["status"] == "ok"
    for key in ("step_ms", "muon_groups_ms", "adamw_groups_ms", "batched_muon_groups_ms", "ns_gflop"):
        assert muon[key] > 0, key


def test_attention_rows():
    rows = bench_attention("tiny", "cpu", micro_batch=1, **FAST)
    assert {r["kind"] for r in rows} == {"mha", "mla", "mla v-padded (proposed)"}
    assert all(r["status"] == "ok" for r in rows if r["backend"] == "default")
    mla_flash = [r for r in rows if r["kind"] == "mla" and r["backend"] == "flash_attention"]
    if mla_flash:  # flash needs equal q/k/v head dims: MLA's 24/16 is refused, the padded form is not
        assert mla_flash[0]["status"].startswith("not eligible")


# ---------------------------------------------------------------------------- the record


def test_run_suite_writes_a_complete_record(tmp_path):
    out = tmp_path / "rec.md"
    results = run_suite("cpu", ["tiny"], ["gpt", "gpt-mla", "kimi"], [False], out, micro_batch=2,
                        decode_batches=(1, 2), prompt_len=8, new_tokens=2, vocab_size=VOCAB, peak_tflops=1.0,
                        command="kimi-bench bench --device cpu --presets tiny", **FAST)
    text = out.read_text()
    for heading in ("## Environment", "## Command", "## Targets", "## Train step", "## MoE layer", "## MLA decode",
                    "## Muon step", "## Attention kernels", "## Method"):
        assert heading in text, heading
    assert "kimi-bench bench --device cpu --presets tiny" in text
    assert "torch" in text and "driver" in text and "Not run" not in text
    assert {t["key"] for t in results["targets"]} == {t.key for t in TARGETS}
    raw = json.loads(out.with_suffix(".json").read_text())
    assert len(raw["train"]) == 6  # 3 variants x (adamw eager, muon eager)
    decode_verdicts = [t for t in results["targets"] if t["key"] in ("mla_decode", "mla_kv")]
    assert all(t["met"] is not None for t in decode_verdicts)  # gpt-mla vs gpt measured (at batch 2)


def test_run_suite_keeps_finished_sections_when_one_fails(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(suite, "bench_attention", boom)
    out = tmp_path / "partial.md"
    with pytest.raises(RuntimeError, match="device lost"):
        run_suite("cpu", ["tiny"], ["gpt"], [False], out, sections=["train", "attention"], optimizers=["adamw"],
                  micro_batch=2, vocab_size=VOCAB, **FAST)
    text = out.read_text()
    assert "| tiny | gpt | adamw |" in text
    assert "No rows yet" in text and "Not run (section not selected)" in text


def test_merge_records_combines_runs(tmp_path):
    first, second = tmp_path / "a.md", tmp_path / "b.md"
    run_suite("cpu", ["tiny"], ["gpt"], [False], first, sections=["train"], optimizers=["adamw"], micro_batch=2,
              vocab_size=VOCAB, command="run a", **FAST)
    run_suite("cpu", ["tiny"], ["gpt"], [False], second, sections=["train", "attention"], optimizers=["muon"],
              micro_batch=2, vocab_size=VOCAB, command="run b", **FAST)
    merged = merge_records([first.with_suffix(".json"), second.with_suffix(".json")], tmp_path / "m.md")
    assert [r["optimizer"] for r in merged["train"]] == ["adamw", "muon"]
    share = next(t for t in merged["targets"] if t["key"] == "muon_share")
    fastest = min(r["fwd_bwd_ms"] for r in merged["train"])  # the adamw row of run a may be the faster one
    muon = merged["train"][1]
    assert share["measured"] == pytest.approx(muon["opt_ms"] / (fastest + muon["clip_ms"] + muon["opt_ms"]
                                                                 + muon["rest_ms"]))
    text = (tmp_path / "m.md").read_text()
    assert "run a\nrun b" in text and "## Attention kernels" in text and "Not run" in text  # moe, decode, optim
    with pytest.raises(UserError, match="--merge"):
        merge_records([tmp_path / "missing.json"], tmp_path / "x.md")


def test_targets_verdicts():
    def train(variant, preset, optimizer, compile_, mfu, fb, opt):
        return dict(preset=preset, variant=variant, optimizer=optimizer, compile=compile_, mfu=mfu, mfu_fwd_bwd=mfu,
                    fwd_bwd_ms=fb, clip_ms=1.0, opt_ms=opt, rest_ms=0.0, step_ms=fb + 1.0 + opt, status="ok")

    def decode(variant, batch, tps, kv):
        return dict(preset="paper", variant=variant, impl="current", batch=batch, tokens_per_s=tps,
                    kv_bytes_per_token=kv, status="ok")

    results = {
        "train": [train("gpt", "gpt2-124m", "adamw", False, 0.30, 50.0, 2.0),
                  train("gpt", "gpt2-124m", "adamw", True, 0.50, 40.0, 2.0),
                  train("kimi", "paper", "adamw", True, 0.25, 10.0, 1.0),
                  train("kimi", "paper", "muon", False, None, 20.0, 4.0)],
        "moe": [dict(preset="paper", layer="moe/grouped_mm", fwd_bwd_ms=3.0, vs_dense=1.2, status="ok"),
                dict(preset="paper", layer="moe/loop", fwd_bwd_ms=6.0, vs_dense=2.4, status="ok"),
                dict(preset="paper", layer="dense-active", fwd_bwd_ms=2.5, vs_dense=1.0, status="ok"),
                dict(preset="paper", layer="all-experts (nanoKimi)", fwd_bwd_ms=9.0, vs_dense=3.6, status="ok")],
        "decode": [decode("gpt", 1, 100.0, 9216), decode("gpt", 32, 1000.0, 9216),
                   decode("gpt-mla", 1, 90.0, 1920), decode("gpt-mla", 32, 1100.0, 1920)],
    }
    v = {t["key"]: t for t in evaluate_targets(results)}
    assert v["mfu_gpt2"]["met"] is True and v["mfu_gpt2"]["measured"] == 0.50  # best compile mode
    assert v["mfu_kimi"]["met"] is False
    assert v["moe_vs_dense"]["met"] is True and "3.00x faster than all-experts" in v["moe_vs_dense"]["note"]
    # Muon share against the variant's fastest fwd+bwd (10 ms, compiled adamw row): 4 / (10 + 1 + 4)
    assert v["muon_share"]["measured"] == pytest.approx(4 / 15) and v["muon_share"]["met"] is False
    assert v["mla_decode"]["measured"] == pytest.approx(1.1) and "batch 32" in v["mla_decode"]["scope"]
    assert v["mla_kv"]["measured"] == pytest.approx(1920 / 9216) and v["mla_kv"]["met"] is True
    empty = {t["key"]: t for t in evaluate_targets({})}
    assert all(t["met"] is None and t["measured_text"] == "not measured" for t in empty.values())


def test_record_path_and_slug(tmp_path):
    env = {"date": "2026-11-24 10:00 UTC", "device": "NVIDIA H100 80GB HBM3"}
    assert device_slug(env) == "nvidia-h100-80gb-hbm3"
    assert device_slug({"device": "cpu (x86_64)"}) == "cpu"
    first = default_record_path(env, tmp_path)
    assert first.name == "2026-11-24-nvidia-h100-80gb-hbm3.md"
    first.write_text("taken")
    assert default_record_path(env, tmp_path).name == "2026-11-24-nvidia-h100-80gb-hbm3-2.md"


# ---------------------------------------------------------------------------- CLI


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("bench")(bench_command)
    app.command("noop")(lambda: None)  # a second command keeps "bench" a subcommand, as in cli.py
    return app


def test_bench_command_options(tmp_path):
    out = tmp_path / "cli.md"
    result = CliRunner().invoke(_app(), [
        "bench", "--device", "cpu", "--presets", "tiny", "--variants", "gpt", "--no-compile", "--repeats", "1",
        "--warmup", "0", "--sections", "train,attention", "--optimizers", "adamw", "--micro-batch", "2",
        "--vocab-size", str(VOCAB), "--no-proposed", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "## Train step" in text and "Not run (section not selected)" in text
    assert "proposed_rows=False" in text


@pytest.mark.parametrize("args, message", [
    (["--presets", "tinyy"], "preset"),
    (["--variants", "gpt,kimmi"], "variant"),
    (["--sections", "train,speed"], "sections"),
    (["--decode-batches", "1,x"], "decode-batches"),
    (["--no-eager", "--no-compile"], "--eager"),
    (["--merge", "a.json"], "--out"),
])
def test_bench_command_bad_input_is_a_user_error(args, message):
    result = CliRunner().invoke(_app(), ["bench", "--device", "cpu", *args])
    assert isinstance(result.exception, UserError), result.output
    assert message in str(result.exception)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_cuda_without_gpu_is_a_user_error():
    with pytest.raises(UserError, match="cuda is not available"):
        run_suite("cuda", ["tiny"], ["gpt"], [False], None)


def test_sections_constant_matches_the_cli_default():
    assert SECTIONS == ("train", "moe", "decode", "optim", "attention")


# ---------------------------------------------------------------------------- proposed changes


@pytest.mark.parametrize("variant", ["gpt", "kimi"])
def test_batched_muon_step_equals_muon(variant):
    """gpt: the fused c_attn split in 3 (muon_qkv group); kimi: 3-D stacked experts. fp32 NS on CPU."""
    torch.manual_seed(0)
    a = build_model(variant, preset_dims("tiny", VOCAB))
    b = copy.deepcopy(a)
    opt_a, opt_b = resolve_optimizer("muon").build(a), resolve_optimizer("muon").build(b)
    for step in range(2):
        fill_grads(a, step)
        fill_grads(b, step)
        opt_a.step()
        proposed_optimizer_step(opt_b)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-7, msg=name)
    assert all("momentum_buffer" in opt_b.state[p] for g in opt_b.param_groups if g["use_muon"] for p in g["params"])


@pytest.mark.parametrize("variant", ["gpt-mla", "kimi"])
def test_folded_absorbed_attention_equals_current(variant):
    torch.manual_seed(0)
    model = build_model(variant, preset_dims("tiny", VOCAB)).double().eval()
    idx = torch.randint(0, VOCAB, (3, 30))

    def run():
        cache = model.make_cache(3, 30)
        out = [model(idx[:, :12], cache=cache)[0], model(idx[:, 12:15], cache=cache)[0]]  # chunk at pos > 0
        out += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(15, 30)]
        return torch.cat(out, dim=1)

    with torch.no_grad():
        current = run()
        with proposed_mla_decode():
            folded = run()
        full = model(idx)[0]
    torch.testing.assert_close(folded, current, rtol=0, atol=1e-12)
    torch.testing.assert_close(folded, full, rtol=0, atol=1e-12)


def test_sdpa_v_padded_equals_sdpa():
    q, k = torch.randn(2, 3, 20, 24, dtype=torch.float64), torch.randn(2, 3, 20, 24, dtype=torch.float64)
    v = torch.randn(2, 3, 20, 16, dtype=torch.float64)
    torch.testing.assert_close(sdpa_v_padded(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=1e-12)
