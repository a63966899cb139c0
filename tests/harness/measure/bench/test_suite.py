"""harness/measure/bench/suite.py and record.py on CPU at the tiny preset: the whole run, the record (markdown + JSON),
appending and merging runs, the CLI options and their one-line errors. Timings are not checked, only shapes."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from harness.errors import UserError
from harness.measure.bench import suite
from harness.measure.bench.kit import TimingSettings
from harness.measure.bench.record import SECTIONS, default_record_path, device_slug, merge_records
from harness.measure.bench.suite import bench_command, run_suite
from harness.measure.bench.targets import TARGETS

VOCAB = 256
FAST = dict(timing=TimingSettings(repeats=1, warmup=0, rounds=1, min_run_time=0.001))


@pytest.mark.slow
def test_run_suite_writes_a_complete_record(tmp_path):
    out = tmp_path / "rec.md"
    results = run_suite(
        "cpu",
        ["tiny"],
        ["gpt", "gpt-mla", "kimi"],
        [False],
        out,
        micro_batch=2,
        decode_batches=(1, 2),
        prompt_len=8,
        new_tokens=2,
        vocab_size=VOCAB,
        peak_tflops=1.0,
        command="kimi-bench bench --device cpu --presets tiny",
        **FAST,
    )
    text = out.read_text()
    for heading in (
        "## Environment",
        "## Commands",
        "## Targets",
        "## Train step",
        "## MoE layer",
        "## MLA decode",
        "## Muon step",
        "## Attention kernels",
        "## Method",
    ):
        assert heading in text, heading
    assert "kimi-bench bench --device cpu --presets tiny" in text
    assert "torch" in text and "driver" in text and "Not run" not in text
    assert {t["key"] for t in results["targets"]} == {t.key for t in TARGETS}
    raw = json.loads(out.with_suffix(".json").read_text())
    # one eager row per variant and optimizer, in that order
    assert [(r["variant"], r["optimizer"]) for r in raw["train"]] == [
        (v, o) for v in ("gpt", "gpt-mla", "kimi") for o in ("adamw", "muon")
    ]
    decode_verdicts = [t for t in results["targets"] if t["key"] in ("mla_decode", "mla_kv")]
    assert all(t["met"] is not None for t in decode_verdicts)  # gpt-mla vs gpt measured (at batch 2)
    assert raw["runs"][0]["seconds"] > 0


def test_run_suite_keeps_finished_sections_when_one_fails(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setitem(suite.SECTION_ROWS, "attention", boom)
    out = tmp_path / "partial.md"
    with pytest.raises(RuntimeError, match="device lost"):
        run_suite(
            "cpu",
            ["tiny"],
            ["gpt"],
            [False],
            out,
            sections=["train", "attention"],
            optimizers=["adamw"],
            micro_batch=2,
            vocab_size=VOCAB,
            **FAST,
        )
    text = out.read_text()
    assert "| tiny | gpt | adamw |" in text
    assert "No rows yet" in text and "Not run (section not selected)" in text


@pytest.mark.slow
def test_append_builds_one_record_from_steps(tmp_path):
    out = tmp_path / "record.md"
    run_suite(
        "cpu",
        ["tiny"],
        ["gpt"],
        [False],
        out,
        sections=["train"],
        optimizers=["adamw"],
        micro_batch=2,
        vocab_size=VOCAB,
        command="step 1",
        append=True,
        **FAST,
    )
    merged = run_suite(
        "cpu",
        ["tiny"],
        ["gpt", "gpt-mla"],
        [False],
        out,
        sections=["decode"],
        decode_batches=(1,),
        prompt_len=8,
        new_tokens=2,
        vocab_size=VOCAB,
        command="step 2",
        append=True,
        **FAST,
    )
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["command"] == "step 1\nstep 2" and len(raw["runs"]) == 2
    assert len(raw["train"]) == 1 and len(raw["decode"]) == 2 and merged["decode"] == raw["decode"]
    assert raw["settings"]["sections"] == "train,decode"
    text = out.read_text()
    assert "## Train step" in text and "| tiny | gpt-mla | 1 |" in text
    with pytest.raises(UserError, match="--append"):
        run_suite("cpu", ["tiny"], ["gpt"], [False], None, append=True, **FAST)


@pytest.mark.slow
def test_merge_records_combines_runs(tmp_path):
    first, second = tmp_path / "a.md", tmp_path / "b.md"
    run_suite(
        "cpu",
        ["tiny"],
        ["gpt"],
        [False],
        first,
        sections=["train"],
        optimizers=["adamw"],
        micro_batch=2,
        vocab_size=VOCAB,
        command="run a",
        **FAST,
    )
    run_suite(
        "cpu",
        ["tiny"],
        ["gpt"],
        [False],
        second,
        sections=["train", "attention"],
        optimizers=["muon"],
        micro_batch=2,
        vocab_size=VOCAB,
        command="run b",
        **FAST,
    )
    merged = merge_records([first.with_suffix(".json"), second.with_suffix(".json")], tmp_path / "m.md")
    assert [r["optimizer"] for r in merged["train"]] == ["adamw", "muon"]
    share = next(t for t in merged["targets"] if t["key"] == "muon_share")
    fastest = min(r["fwd_bwd_ms"] for r in merged["train"])  # the adamw row of run a may be the faster one
    muon = merged["train"][1]
    assert share["measured"] == pytest.approx(
        muon["opt_ms"] / (fastest + muon["clip_ms"] + muon["opt_ms"] + muon["rest_ms"])
    )
    text = (tmp_path / "m.md").read_text()
    assert "run a\nrun b" in text and "## Attention kernels" in text and "Not run" in text  # moe, decode, optim
    with pytest.raises(UserError, match="--merge"):
        merge_records([tmp_path / "missing.json"], tmp_path / "x.md")


def test_record_path_and_slug(tmp_path):
    env = {"date": "2026-11-24 10:00 UTC", "device": "NVIDIA H200"}
    assert device_slug(env) == "nvidia-h200"
    assert device_slug({"device": "cpu (x86_64)"}) == "cpu"
    first = default_record_path(env, tmp_path)
    assert first.name == "2026-11-24-nvidia-h200.md"
    first.write_text("taken")
    assert default_record_path(env, tmp_path).name == "2026-11-24-nvidia-h200-2.md"


# ---------------------------------------------------------------------------- CLI


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("bench")(bench_command)
    app.command("noop")(lambda: None)  # a second command keeps "bench" a subcommand, as in cli.py
    return app


@pytest.mark.slow
def test_bench_command_options(tmp_path):
    out = tmp_path / "cli.md"
    result = CliRunner().invoke(
        _app(),
        [
            "bench",
            "--device",
            "cpu",
            "--presets",
            "tiny",
            "--variants",
            "gpt",
            "--no-compile",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--rounds",
            "1",
            "--min-run-time",
            "0.001",
            "--sections",
            "train,attention",
            "--optimizers",
            "adamw",
            "--micro-batch",
            "2",
            "--vocab-size",
            str(VOCAB),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "## Train step" in text and "Not run (section not selected)" in text
    assert "profile=False" in text and "rounds=1" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--presets", "tinyy"], "did you mean 'tiny'"),
        (["--variants", "gpt,kimmi"], "variants"),
        (["--sections", "train,speed"], "sections"),
        (["--decode-batches", "1,x"], "decode-batches"),
        (["--no-eager", "--no-compile"], "--eager"),
        (["--rounds", "0"], "--rounds"),
        (["--merge", "a.json"], "--out"),
    ],
)
def test_bench_command_bad_input_is_a_user_error(args, message):
    result = CliRunner().invoke(_app(), ["bench", "--device", "cpu", *args])
    assert isinstance(result.exception, UserError), result.output
    assert message in str(result.exception)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_cuda_without_gpu_is_a_user_error():
    with pytest.raises(UserError, match="cuda is not available"):
        run_suite("cuda", ["tiny"], ["gpt"], [False], None)


def test_sections_constant_matches_the_cli_default():
    assert SECTIONS == ("train", "moe", "decode", "optim", "attention") == tuple(suite.SECTION_ROWS)
