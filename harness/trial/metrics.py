"""Metric computations shared by the trainer and the benchmarks: perplexity, stability, memory, MFU.

The MLflow names of these values are defined in harness/schema.py (docs/design.md says what each means); this
module only computes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from harness import schema

SPIKE_FACTOR = 5.0  # a grad-norm "spike" is a norm above 5x the rolling median (docs/design.md, stability)
SPIKE_WINDOW = 50  # steps in the rolling median window

# Dense bf16 peak FLOP/s per device, from the vendors' datasheets (dense, no sparsity). nanoGPT hard-codes
# A100's 312e12; we look the device name up and let --peak-tflops override it.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
}


def perplexity(mean_nll: float) -> float:
    """exp of the mean token negative log-likelihood (nats); inf past float range rather than an error."""
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")


def rolling_median_spikes(values: Sequence[float], window: int = SPIKE_WINDOW, factor: float = SPIKE_FACTOR) -> int:
    """Count steps whose value exceeds `factor` x the median of the previous `window` steps.

    The first step has no history and cannot be a spike; a window shorter than `window` is used at the start.
    """
    x = np.asarray(values, dtype=np.float64)
    spikes = 0
    for i in range(1, len(x)):
        history = x[max(0, i - window) : i]
        history = history[np.isfinite(history)]
        if history.size and x[i] > factor * np.median(history):
            spikes += 1
    return spikes


def grad_norm_summary(norms: Sequence[float]) -> dict[str, float]:
    """Stability summary of per-step gradient norms (before clipping): median, p99/median, CV, spikes."""
    x = np.asarray([v for v in norms if math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return {}
    median = float(np.median(x))
    mean = float(x.mean())
    return {
        schema.GRAD_NORM_MEDIAN: median,
        schema.GRAD_NORM_P99_OVER_MEDIAN: float(np.percentile(x, 99) / median) if median > 0 else float("nan"),
        schema.GRAD_NORM_CV: float(x.std() / mean) if mean > 0 else float("nan"),
        schema.GRAD_NORM_SPIKES: float(rolling_median_spikes(norms)),
    }


def loss_spike_count(losses: Sequence[float], window: int = SPIKE_WINDOW, threshold: float = 0.5) -> int:
    """Steps whose train loss jumps more than `threshold` nats above the rolling median of the last window."""
    x = np.asarray(losses, dtype=np.float64)
    count = 0
    for i in range(1, len(x)):
        history = x[max(0, i - window) : i]
        if x[i] > np.median(history) + threshold:
            count += 1
    return count


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device from PEAK_BF16_FLOPS (None on CPU or an unknown device)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():  # dict order puts the specific names first
        if key in name:
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the device peak."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_s / peak_flops


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        tensor_bytes(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    )


def memory_facts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Exact bytes: parameters (tied tensors once), one gradient per trainable parameter (in its dtype), and the
    optimizer's state tensors as they are (call after at least one step: torch optimizers allocate lazily)."""
    params = list(model.parameters())
    return {
        schema.MEM_PARAM: float(sum(tensor_bytes(p) for p in params)),
        schema.MEM_GRAD: float(sum(tensor_bytes(p) for p in params if p.requires_grad)),
        schema.MEM_OPTIM: float(optimizer_state_bytes(optimizer)),
    }
