"""Section `optim`: optimizer.step() alone, AdamW against Muon, Muon split into its two kinds of groups.

Each parameter gets a fixed random gradient; only `optimizer.step()` is timed (no forward/backward), after
warm-up steps that create the optimizer state. The Muon row also times its Muon groups alone and its AdamW
groups alone (the same groups, stepped by two separate optimizers), and gives the exact Newton-Schulz GFLOP
per step. NS runs batched by shape (arch.muon's single-process default), in bf16 on CUDA, fp32 on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from arch.muon import Muon
from harness.measure.bench.kit import TimingSettings, error_status, ms, preset_dims
from harness.measure.bench.timing import time_interleaved
from harness.spec.registry import build_model, resolve_optimizer


def fill_grads(model: nn.Module, seed: int = 0) -> None:
    """A fixed random gradient (std 1e-3) on every parameter."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.device, p.dtype)


def split_muon(opt: Muon) -> tuple[Muon, Muon]:
    """Two optimizers over the same groups (all keys already filled): Muon groups only, AdamW only."""

    def sub(use_muon: bool) -> Muon:
        return Muon([dict(g) for g in opt.param_groups if g["use_muon"] == use_muon], batched_ns=opt.batched_ns)

    return sub(True), sub(False)


def ns_gflop(opt: Muon) -> float:
    """Newton-Schulz GFLOP of one step: per [m, n] matrix (m <= n after the transpose) and NS step,
    X X^T costs 2m^2 n, A A costs 2m^3 and B X costs 2m^2 n (the elementwise terms are negligible)."""
    total = 0.0
    for g in opt.param_groups:
        if not g["use_muon"]:
            continue
        for p in g["params"]:
            rows, cols = p.shape[-2] // g["split"], p.shape[-1]
            n_mat = (p.shape[0] if p.ndim == 3 else 1) * g["split"]
            m, n = min(rows, cols), max(rows, cols)
            total += n_mat * g["ns_steps"] * (4 * m * m * n + 2 * m**3)
    return total / 1e9


def _time_steps(opts: dict[str, torch.optim.Optimizer], timing: TimingSettings) -> dict[str, float]:
    """Median ms of each optimizer's step(), in interleaved rounds."""
    t = time_interleaved(
        {name: opt.step for name, opt in opts.items()},
        rounds=timing.rounds,
        min_run_time=timing.min_run_time,
        warmup=timing.warmup,
    )
    return {name: ms(v.median_s) for name, v in t.items()}


def bench_optimizer_step(
    variant: str,
    preset: str,
    device: str | torch.device,
    *,
    timing: TimingSettings = TimingSettings(),
    vocab_size: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows: AdamW (fused on CUDA), then Muon with its two kinds of groups also timed apart."""
    device = torch.device(device)
    dims = preset_dims(preset, vocab_size)
    torch.manual_seed(seed)
    model = build_model(variant, dims).to(device)
    fill_grads(model, seed)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for name in ("adamw", "muon"):
        row: dict[str, Any] = {"preset": preset, "variant": variant, "optimizer": name, "params": total, "status": "ok"}
        try:
            opt = resolve_optimizer(name).build(model)
            if name == "adamw":
                row["step_ms"] = _time_steps({"step": opt}, timing)["step"]
            else:
                muon_part, adamw_part = split_muon(opt)
                times = _time_steps({"step": opt, "muon_groups": muon_part, "adamw_groups": adamw_part}, timing)
                row["step_ms"] = times["step"]
                row.update({f"{k}_ms": v for k, v in times.items() if k != "step"})
                row["muon_params"] = sum(p.numel() for g in muon_part.param_groups for p in g["params"])
                row["ns_gflop"] = ns_gflop(opt)
                row["ns_tflops"] = row["ns_gflop"] / row["muon_groups_ms"]  # GFLOP/ms = TFLOP/s
        except Exception as e:
            row["status"] = error_status(e)
        rows.append(row)
        model.load_state_dict(initial)  # the next optimizer starts from the same weights
    return rows
