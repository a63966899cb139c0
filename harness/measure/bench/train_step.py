"""Section `train`: the trainer's one optimizer step (harness.trial.step.train_step), eager or compiled; tokens/s, MFU.

MFU = arch.counting.flops_per_token (active FLOPs: 6 x active matmul params + attention at full T^2) x tokens/s
over the datasheet dense bf16 peak. The step's phases (fwd+bwd | clip | optimizer step | rest) are timed with
CUDA events inside the step (harness.measure.bench.timing.time_phases), with no host sync between timed steps.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from arch.counting import count_params, flops_per_token
from arch.moe import moe_modules
from harness.measure.bench.kit import (
    TimingSettings,
    count_host_syncs,
    error_status,
    free_memory,
    micro_batch_for,
    ms,
    preset_dims,
    top_kernels,
)
from harness.measure.bench.timing import time_phases
from harness.spec.registry import build_model, resolve_optimizer
from harness.trial.step import autocast_dtype, synchronize, train_step

PHASES = ("fwd_bwd", "clip", "opt", "rest")


def bench_train_step(
    variant: str,
    preset: str,
    device: str | torch.device,
    *,
    compile_model: bool = False,
    optimizer: str = "adamw",
    micro_batch: int | None = None,
    timing: TimingSettings = TimingSettings(),
    vocab_size: int | None = None,
    peak_flops: float | None = None,
    matmul_peak: float | None = None,
    profile: bool = False,
    seed: int = 0,
    n_batches: int = 4,
) -> dict[str, Any]:
    """One training step (forward + aux loss, backward, clip 1.0, step, zero_grad, MoE bias update) on
    n_batches random token blocks used in turn, with the harness's optimizer `optimizer`. `profile` adds the
    step's top kernels (torch.profiler) to the row. A failure is a row status."""
    device = torch.device(device)
    dims = preset_dims(preset, vocab_size)
    B, T = micro_batch_for(preset, micro_batch), dims.block_size
    row: dict[str, Any] = {
        "preset": preset,
        "variant": variant,
        "optimizer": optimizer,
        "compile": bool(compile_model),
        "batch": B,
        "seq": T,
        "status": "ok",
    }
    free_memory(device)
    try:
        torch.manual_seed(seed)
        model = build_model(variant, dims).to(device)
        model.train()
        opt = resolve_optimizer(optimizer).build(model)
        if compile_model:
            torch._dynamo.reset()  # one compiled model at a time: no cache entries pile up across configs
        train_model = torch.compile(model) if compile_model else model
        moes = moe_modules(model)
        amp = autocast_dtype("auto", device)  # the trainer's rule: bf16 on CUDA, fp32 on CPU
        gen = torch.Generator().manual_seed(seed)
        batches = [
            (
                torch.randint(0, dims.vocab_size, (B, T), generator=gen).to(device),
                torch.randint(0, dims.vocab_size, (B, T), generator=gen).to(device),
            )
            for _ in range(n_batches)
        ]
        fpt = flops_per_token(model, T)
        counts = count_params(model)
        row.update(params_total=counts.total, params_active=counts.active, flops_per_token=fpt)
        calls = iter(range(10**9))

        def step(mark) -> None:  # the trainer's step (harness.trial.step.train_step), clip 1.0, phases marked
            train_step(
                model, opt, [batches[next(calls) % n_batches]], amp, 1.0, forward=train_model, moe=moes, mark=mark
            )

        t0 = time.perf_counter()
        step(lambda: None)  # compilation happens here when compile_model
        synchronize(device)
        row["first_step_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        phase = time_phases(step, PHASES, repeats=timing.repeats, warmup=timing.warmup, device=device)
        st = phase["total"]
        tokens_per_s = B * T / st.median_s
        row.update(
            step_ms=ms(st.median_s),
            step_iqr_ms=ms(st.iqr_s),
            repeats=st.n,
            noisy=st.noisy,
            **{f"{name}_ms": ms(phase[name].median_s) for name in PHASES},
            tokens_per_s=tokens_per_s,
            model_tflops=fpt * tokens_per_s / 1e12,
        )
        row["mfu"] = fpt * tokens_per_s / peak_flops if peak_flops else None
        row["mfu_fwd_bwd"] = fpt * B * T / phase["fwd_bwd"].median_s / peak_flops if peak_flops else None
        row["of_matmul_peak"] = fpt * tokens_per_s / matmul_peak if matmul_peak else None
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        row["host_syncs"] = count_host_syncs(lambda: step(lambda: None), device)
        row["moe_dispatch"] = moes[0].last_dispatch if moes else None
        if profile:
            row["top_kernels"] = top_kernels(lambda: step(lambda: None), device)
    except Exception as e:  # one failed configuration (OOM, compile error) must not end the suite
        row["status"] = error_status(e)
    return row
