"""Tensor bytes of a training step: the live storages it starts with, and the peak of what it allocates (the
CUDA allocator's peak statistics, or on CPU the torch profiler's allocator events of that step alone)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn


def live_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, *tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages a training step starts with: parameters, buffers, grads, optimizer
    state and the batch."""
    seen: dict[int, int] = {}
    everything = [
        *model.parameters(),
        *model.buffers(),
        *tensors,
        *(p.grad for p in model.parameters() if p.grad is not None),
        *(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)),
    ]
    for t in everything:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (kineto prints profiler_start/stop lines from C++ on every session)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_PROFILER_WARM = [False]


def _profile_memory_events(fn: Callable[[], object]) -> list[tuple[int, int]]:
    """(time ns, bytes +alloc / -free) of every CPU allocator event during fn(), in time order."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        if not _PROFILER_WARM[0]:  # the first session of a process records a one-off allocation of its own
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
                torch.zeros(1)
            _PROFILER_WARM[0] = True
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = prof.profiler.kineto_results.events()  # the "[memory]" records FunctionEvent parsing reads
    return sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )


def peak_delta_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of the tensor bytes allocated (minus those freed) during fn(), over what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    live = peak = 0
    for _, nbytes in _profile_memory_events(fn):
        live += nbytes
        peak = max(peak, live)
    return peak
