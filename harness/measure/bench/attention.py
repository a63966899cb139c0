"""Section `attention`: which SDPA kernels take MLA's head shapes, and at what speed (causal fwd+bwd).

Shapes at the preset's training size: MHA (head = dim / heads) and MLA as trained (d_qk = nope + rope, d_v = v
head; the flash kernel refuses d_qk != d_v). A backend that refuses a shape gives a "not eligible" row, with
torch's reason.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from harness.measure.bench.kit import TimingSettings, free_memory, micro_batch_for, ms, preset_dims
from harness.measure.bench.timing import time_fn


def sdpa_backends(device: torch.device) -> list[tuple[str, Any]]:
    """("default", None) and each named backend torch has for this device type."""
    from torch.nn.attention import SDPBackend

    names = (
        ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]
        if device.type == "cuda"
        else ["FLASH_ATTENTION", "MATH"]
    )
    return [("default", None)] + [(n.lower(), getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def refusal_reason(caught: list[warnings.WarningMessage], error: Exception) -> str:
    reasons = [str(w.message).split(" (Triggered")[0] for w in caught if "because" not in str(w.message)]
    return "not eligible" + (f": {reasons[0][:200]}" if reasons else f": {str(error)[:80]}")


def bench_attention(
    preset: str,
    device: str | torch.device,
    *,
    micro_batch: int | None = None,
    timing: TimingSettings = TimingSettings(),
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Causal SDPA fwd+bwd per backend and shape. bf16 on CUDA, fp32 on CPU. TFLOP/s counts the causal half
    of 3 x 2*B*H*T^2*(d_qk + d_v) (forward + backward, model FLOPs)."""
    from torch.nn.attention import sdpa_kernel

    device = torch.device(device)
    d = preset_dims(preset)
    B, T, H = micro_batch_for(preset, micro_batch), d.block_size, d.n_heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dqk_mla = d.qk_nope_head_dim + d.qk_rope_head_dim
    shapes = [("mha", d.dim // H, d.dim // H), ("mla", dqk_mla, d.v_head_dim)]
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for kind, dqk, dv in shapes:
        q, k = (torch.randn(B, H, T, dqk, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(2))
        v = torch.randn(B, H, T, dv, device=device, dtype=dtype, generator=gen).requires_grad_()
        grad = torch.randn(B, H, T, dv, device=device, dtype=dtype, generator=gen)
        flops = 3 * 2 * B * H * T * T * (dqk + dv) / 2
        for backend_name, backend in sdpa_backends(device):
            row = {
                "preset": preset,
                "kind": kind,
                "d_qk": dqk,
                "d_v": dv,
                "backend": backend_name,
                "batch": B,
                "seq": T,
                "heads": H,
                "status": "ok",
            }
            ctx = (lambda b=backend: sdpa_kernel([b])) if backend is not None else contextlib.nullcontext

            def run(ctx=ctx, q=q, k=k, v=v, grad=grad):
                q.grad = k.grad = v.grad = None
                with ctx():
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    t = time_fn(run, min_run_time=timing.min_run_time, warmup=max(1, timing.warmup))
                row.update(fwd_bwd_ms=ms(t.median_s), noisy=t.noisy, tflops=flops / t.median_s / 1e12)
            except RuntimeError as e:
                row["status"] = refusal_reason(caught, e)
            rows.append(row)
        del q, k, v, grad
    free_memory(device)
    return rows
