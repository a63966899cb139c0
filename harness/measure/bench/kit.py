"""What every bench section shares: preset dims, the trainer's autocast, timing settings, failure rows,
host-sync counting, the measured matmul ceiling and a top-kernels profile."""

from __future__ import annotations

import dataclasses
import gc
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from harness.errors import UserError, suggest
from harness.measure.bench.timing import time_fn
from harness.spec.registry import PRESETS, ModelDims
from harness.trial.step import autocast as step_autocast
from harness.trial.step import autocast_dtype

DEFAULT_VOCAB = 50304  # GPT-2's vocabulary padded to a multiple of 64, for presets without a vocabulary
# Micro-batch (sequences of block_size tokens) per preset: nanoGPT's 12 x 1024 on a 40 GB A100, a little more
# on an 80 GB+ GPU; tiny/small stay CPU-sized.
DEFAULT_MICRO_BATCH = {"tiny": 4, "small": 16, "paper": 16, "gpt2-124m": 16}


@dataclasses.dataclass(frozen=True)
class TimingSettings:
    """How long each measurement runs. `repeats`: timed train steps (phase split by time_phases);
    `rounds` x `min_run_time`: interleaved rounds of torch.utils.benchmark blocks for every other section;
    `warmup`: untimed calls first (the first call, compilation, is timed apart in the train section)."""

    repeats: int = 30
    warmup: int = 5
    rounds: int = 5
    min_run_time: float = 0.1

    def check(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.rounds < 1 or self.min_run_time <= 0:
            raise UserError(
                "--repeats/--warmup/--rounds/--min-run-time: need repeats >= 1, warmup >= 0, "
                "rounds >= 1 and min-run-time > 0"
            )


def check_choices(field: str, values: Iterable[str], choices: Sequence[str]) -> list[str]:
    """Stripped, non-empty, every one a known name (one-line error with the closest names otherwise)."""
    values = [v.strip() for v in values if v.strip()]
    if not values:
        raise UserError(f"{field}: empty; give at least one of {', '.join(choices)}")
    for v in values:
        if v not in choices:
            raise UserError(f"{field}: unknown name {v!r}; {suggest(v, choices)}")
    return values


def preset_dims(preset: str, vocab_size: int | None = None) -> ModelDims:
    """A preset's dims; vocabulary: the argument, else the preset's, else DEFAULT_VOCAB."""
    check_choices("preset", [preset], tuple(PRESETS))
    base = PRESETS[preset]
    return dataclasses.replace(base, vocab_size=vocab_size or base.vocab_size or DEFAULT_VOCAB)


def micro_batch_for(preset: str, micro_batch: int | None) -> int:
    return micro_batch or DEFAULT_MICRO_BATCH.get(preset, 8)


def autocast(device: torch.device):
    """The trainer's rule at train.dtype `auto` (harness.trial.step): bf16 on CUDA over fp32 weights, fp32 on CPU."""
    return step_autocast(device, autocast_dtype("auto", device))


def under_autocast(fn: Callable[[], Any], device: torch.device) -> Callable[[], None]:
    def run() -> None:
        with autocast(device):
            fn()

    return run


def free_memory(device: torch.device) -> None:
    """Drop the previous configuration's cached blocks before the next is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_status(e: BaseException) -> str:
    """A failed configuration's status cell: one configuration (OOM, compile error) must not end the suite."""
    if isinstance(e, torch.OutOfMemoryError):
        return "oom"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {first[:160]}"


def ms(seconds: float) -> float:
    return seconds * 1e3


def count_host_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Synchronizing CUDA calls (.item(), .tolist(), nonzero, ...) made by one fn() call, as torch's sync
    debug mode reports them; None on CPU, where there is nothing to wait for."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def measure_matmul_peak(device: torch.device, min_run_time: float = 0.3) -> float:
    """Achieved FLOP/s of one large matmul (bf16 8192^3 on CUDA, fp32 512^3 on CPU) on random data: the
    ceiling a model's matmuls can reach here, beside the datasheet peak that MFU is quoted against."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, min_run_time=min_run_time, warmup=3)
    return 2 * n**3 / t.median_s


def top_kernels(fn: Callable[[], Any], device: torch.device, calls: int = 3, top: int = 12) -> list[dict[str, Any]]:
    """torch.profiler over `calls` fn() calls (after one untimed call): the ops/kernels with the most self
    time on the device (CUDA kernels on GPU, CPU ops on CPU), per call, with their share of the total."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [
        {
            "name": e.key[:100],
            "calls": e.count // calls,
            "ms_per_call": getattr(e, key) / 1e3 / calls,
            "share": getattr(e, key) / total,
        }
        for e in events[:top]
    ]
