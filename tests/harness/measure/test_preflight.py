"""harness/measure/preflight.py: one bf16 train step and one decode step per arm, every failure named in the last
line, the MoE dispatch that ran reported (grouped_mm, or the loop where torch lacks F.grouped_mm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.errors import UserError
from harness.measure import preflight
from harness.measure.preflight import Arm, bench_arm, parse_arms, run_preflight

CPU = torch.device("cpu")


def tiny(variant: str, optimizer: str = "adamw"):
    return (
        f"{variant}@tiny:{optimizer}",
        lambda: bench_arm(variant, "tiny", optimizer, CPU, vocab_size=256, micro_batch=2, decode_batch=2),
    )


def test_parse_arms_checks_every_name_and_drops_duplicates():
    assert parse_arms("kimi@paper:muon, gpt@tiny:adamw,kimi@paper:muon,") == [
        ("kimi", "paper", "muon"),
        ("gpt", "tiny", "adamw"),
    ]
    for text, field in (
        ("kimi@paper", "variant@preset:optimizer"),
        ("kimmi@paper:muon", "variant"),
        ("kimi@huge:muon", "preset"),
        ("kimi@paper:sgd", "optimizer"),
        (" , ", "empty"),
    ):
        with pytest.raises(UserError, match=field):
            parse_arms(text)


def test_kimi_arm_takes_a_bf16_step_and_reports_grouped_mm(capsys):
    assert run_preflight([tiny("kimi", "muon"), tiny("gpt-mla")], CPU) == 0
    out = capsys.readouterr().out.splitlines()
    assert "bf16 CPU autocast" in out[0] and "F.grouped_mm present" in out[0]
    assert any(
        line.startswith("preflight kimi@tiny:muon: train step ok") and "MoE dispatch grouped_mm" in line for line in out
    )
    assert "preflight: MoE dispatch: grouped_mm" in out
    assert out[-1].startswith("preflight ok: 2 arms")


def test_without_grouped_mm_the_loop_is_reported(capsys, monkeypatch):
    monkeypatch.delattr(F, "grouped_mm")
    assert run_preflight([tiny("kimi")], CPU) == 0
    out = capsys.readouterr().out
    assert "F.grouped_mm MISSING" in out and "MoE dispatch loop" in out
    assert "preflight: MoE dispatch: loop (the host-syncing loop" in out


def test_every_failure_is_named_in_the_last_line_and_the_other_arms_still_run(capsys):
    def broken_build():
        raise RuntimeError("CUDA error: no kernel image is available\nsecond line")

    def nan_arm():
        arm = tiny("gpt")[1]()
        return Arm("nan", arm.model, lambda: torch.tensor(float("nan")), arm.vocab_size, arm.block_size)

    assert run_preflight([("broken", broken_build), ("nan", nan_arm), tiny("gpt")], CPU) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("preflight gpt@tiny:adamw: decode step ok") for line in out)  # checked after
    assert "preflight nan: decode step ok" in "\n".join(out)  # a failed train step does not skip the decode
    last = out[-1]
    assert last.startswith("preflight FAILED on cpu") and "2 check(s)" in last
    assert "broken build (RuntimeError: CUDA error: no kernel image is available)" in last
    assert "nan train step (CheckFailed: non-finite loss nan)" in last and "second line" not in last


def test_a_nonfinite_decode_fails(monkeypatch, capsys):
    monkeypatch.setattr(preflight.torch, "isfinite", lambda t: torch.zeros_like(t, dtype=torch.bool))
    assert run_preflight([tiny("gpt")], CPU) == 1
    assert "decode step (CheckFailed: non-finite logits)" in capsys.readouterr().out.splitlines()[-1]


def test_cli_bad_input_is_one_line(capsys):
    for args, message in (
        (["--device", "tpu", "--arms", "gpt@tiny:adamw"], "--device: 'tpu'"),
        (["--device", "cpu", "--arms", "gpt@tiny"], "variant@preset:optimizer"),
    ):
        with pytest.raises(SystemExit) as done:
            preflight.main(args)
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.strip().count("\n") == 0 and message in err
