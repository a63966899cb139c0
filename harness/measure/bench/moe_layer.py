"""Section `moe`: the preset's MoE layer, fwd and fwd+bwd, against dense layers of the same active parameters.

Rows (same router and expert weights where they apply):
  moe/<dispatch>   the sparse MoE of arch/moe.py, once per dispatch this device/dtype supports
  dense-active     one SwiGLU of the MoE's ACTIVE width: hidden = top_k * inter + shared width (router aside)
  all-experts      every expert on every token, weighted by the (mostly zero) gate, as nanoKimi did
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arch.common import SwiGLU, init_normal_
from arch.moe import MoE, MoEConfig, grouped_mm_supported
from harness.measure.bench.kit import (
    TimingSettings,
    autocast,
    error_status,
    micro_batch_for,
    ms,
    preset_dims,
    top_kernels,
    under_autocast,
)
from harness.measure.bench.timing import time_interleaved


class AllExpertsMoE(nn.Module):
    """nanoKimi-style dispatch: run all E experts on all N tokens, multiply by a dense [N, E] gate matrix
    that is zero outside each token's top-k. Same math as MoE (shares its modules), E/k times the FLOPs."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, indices, _ = self.moe.gate(flat)
        gates = torch.zeros(flat.size(0), self.moe.n_experts, dtype=flat.dtype, device=flat.device)
        gates = gates.scatter(1, indices, weights)
        ex = self.moe.experts
        h = F.silu(torch.einsum("nd,eid->eni", flat, ex.w1)) * torch.einsum("nd,eid->eni", flat, ex.w3)
        y = torch.einsum("eni,edi->end", h, ex.w2)
        out = torch.einsum("ne,end->nd", gates, y)
        if self.moe.shared is not None:
            out = out + self.moe.shared(flat)
        return out.view(B, T, D)


def fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for p in module.parameters():
            p.grad = None
        x.grad = None
        module(x).float().square().mean().backward()

    return run


def fwd_only(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return run


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layers_to_time(preset: str, device: torch.device, x: torch.Tensor) -> list[tuple[str, nn.Module, int]]:
    """(name, module, active params per token): each supported dispatch, dense-active, all-experts."""
    d = preset_dims(preset)
    cfg = dict(
        dim=d.dim,
        n_routed_experts=d.n_routed_experts,
        n_activated_experts=d.n_activated_experts,
        moe_inter_dim=d.moe_inter_dim,
        n_shared_experts=d.n_shared_experts,
        shared_inter_dim=d.shared_inter_dim,
        score_func=d.score_func,
        route_scale=d.route_scale,
    )
    with autocast(device):
        dispatches = ["loop"] + (["grouped_mm"] if grouped_mm_supported(x, d.dim, d.moe_inter_dim) else [])
    base = MoE(MoEConfig(**cfg, dispatch="loop")).to(device)
    routed_active = 3 * d.n_activated_experts * d.moe_inter_dim * d.dim
    active = n_params(base.gate) + (n_params(base.shared) if base.shared is not None else 0) + routed_active
    layers: list[tuple[str, nn.Module, int]] = []
    for dispatch in dispatches:
        moe = MoE(MoEConfig(**cfg, dispatch=dispatch)).to(device)
        moe.load_state_dict(base.state_dict())
        layers.append((f"moe/{dispatch}", moe, active))
    hidden = d.n_activated_experts * d.moe_inter_dim + base.config.shared_width * (base.shared is not None)
    dense = init_normal_(SwiGLU(d.dim, hidden)).to(device)
    layers.append((f"dense-active (hidden {hidden})", dense, n_params(dense)))
    layers.append(("all-experts (nanoKimi)", AllExpertsMoE(base), n_params(base)))
    return layers


def bench_moe_layer(
    preset: str,
    device: str | torch.device,
    *,
    micro_batch: int | None = None,
    timing: TimingSettings = TimingSettings(),
    profile: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The preset's MoE layer on one micro-batch of tokens (micro_batch x block_size), fwd and fwd+bwd, all
    rows timed in interleaved rounds. bf16 autocast over fp32 weights on CUDA (the trainer's recipe), fp32
    on CPU. `profile`: the best sparse dispatch's fwd+bwd top kernels go into its row."""
    device = torch.device(device)
    d = preset_dims(preset)
    B, T = micro_batch_for(preset, micro_batch), d.block_size
    torch.manual_seed(seed)
    x = torch.randn(B, T, d.dim, device=device, requires_grad=True)  # backward includes the input gradient
    try:
        layers = layers_to_time(preset, device, x)
        fb = time_interleaved(
            {name: under_autocast(fwd_bwd(m, x), device) for name, m, _ in layers},
            rounds=timing.rounds,
            min_run_time=timing.min_run_time,
            warmup=timing.warmup,
        )
        fo = time_interleaved(
            {name: under_autocast(fwd_only(m, x), device) for name, m, _ in layers},
            rounds=timing.rounds,
            min_run_time=timing.min_run_time,
            warmup=timing.warmup,
        )
    except Exception as e:
        return [{"preset": preset, "layer": "moe", "status": error_status(e)}]
    dense_s = next(fb[name].median_s for name, _, _ in layers if name.startswith("dense"))
    all_s = fb[layers[-1][0]].median_s
    tokens = B * T
    rows = []
    for name, module, active in layers:
        t = fb[name]
        rows.append(
            {
                "preset": preset,
                "layer": name,
                "tokens": tokens,
                "params": n_params(module),
                "active_params": active,
                "fwd_ms": ms(fo[name].median_s),
                "fwd_bwd_ms": ms(t.median_s),
                "fwd_bwd_iqr_ms": ms(t.iqr_s),
                "noisy": t.noisy,
                "tokens_per_s": tokens / t.median_s,
                "vs_dense": t.median_s / dense_s,
                "vs_all_experts": t.median_s / all_s,
                "status": "ok",
                "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
            }
        )
    if profile:
        best = min((r for r in rows if r["layer"].startswith("moe/")), key=lambda r: r["fwd_bwd_ms"])
        module = next(m for name, m, _ in layers if name == best["layer"])
        best["top_kernels"] = top_kernels(under_autocast(fwd_bwd(module, x), device), device)
    return rows
