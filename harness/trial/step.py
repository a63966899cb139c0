"""The one train step, its autocast rule, the device resolver and the device synchronisation.

`train_step` is what the trial loop (harness.trial.loop), the controlled speed measurement
(harness.measure.speed_runs) and the bench suite (harness.measure.bench.train_step) each time or run: for every
micro-batch a forward under the autocast rule, the LM loss plus the MoE aux loss, the backward of its share;
then the global gradient norm clipped, the optimizer step (muonclip applies QK-Clip inside it), zero_grad and
the MoE bias update. The autocast rule: bf16 when train.dtype is bfloat16, or auto on CUDA; else fp32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from arch.moe import moe_modules


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto`: CUDA when one is visible, else the CPU; any other name as torch reads it."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast rule: bf16 for train.dtype `bfloat16`, or `auto` on CUDA; None (fp32) otherwise."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast at `dtype` on the device, or nothing (fp32) when dtype is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work (a no-op on CPU, where work is synchronous)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _no_mark() -> None:
    pass


def forward_backward(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: torch.dtype | None,
    share: int = 1,
    forward: Callable | None = None,
) -> torch.Tensor:
    """Forward (through `forward`: the DDP or compiled wrapper of `model`, when there is one) under autocast,
    the LM loss plus the model's MoE aux loss, and the backward of its 1/share part; -> the LM loss."""
    with autocast(x.device, amp):
        # `is None`, not `or`: torch.compile's wrapper proxies len() to the module, so bool() on it raises
        _, loss = (model if forward is None else forward)(x, y)
        total = loss + model.aux_loss
    (total / share if share > 1 else total).backward()
    return loss


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    amp: torch.dtype | None,
    grad_clip: float,
    *,
    n_micro: int = 1,
    forward: Callable | None = None,
    moe: Sequence[nn.Module] | None = None,
    no_sync: Callable | None = None,
    on_micro: Callable[[], None] | None = None,
    reduce: Callable | None = None,
    zero_grad: bool = True,
    mark: Callable[[], None] = _no_mark,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `n_micro` micro-batches; -> (mean LM loss, grad norm before clipping), on device.

    grad_clip <= 0: no clipping (the norm is still computed). no_sync: DDP's context that skips the gradient
    all-reduce on every micro-batch but the last; on_micro: after each backward (the MoE load meter); reduce:
    applied to each MoE layer's load before its bias update (an all-reduce under DDP); zero_grad=False keeps
    the gradients for the caller. mark(): after the backward, the clip, the step and the rest (the bench's
    phase timer)."""
    layers = moe_modules(model) if moe is None else moe
    loss_sum = None
    for micro, (x, y) in enumerate(micro_batches):
        sync = no_sync() if no_sync is not None and micro < n_micro - 1 else contextlib.nullcontext()
        with sync:
            loss = forward_backward(model, x, y, amp, n_micro, forward)
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        if on_micro is not None:
            on_micro()
    mark()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    mark()
    optimizer.step()
    mark()
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    for m in layers:
        if reduce is not None:
            reduce(m.load_accum)
        m.update_bias()
    mark()
    return (loss_sum if n_micro == 1 else loss_sum / n_micro), grad_norm
