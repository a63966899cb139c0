"""The one timer: every benchmark in kimi-bench (bench suite, inference, controlled train steps) uses it.

Built on `torch.utils.benchmark.Timer.blocked_autorange`, which handles CUDA synchronisation itself and
repeats a statement in blocks until a minimum run time is reached. Several callables are measured in
interleaved rounds (A, B, C, A, B, C, ...) so that a slow phase of a shared machine hits every arm alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch.utils import benchmark

NOISY_REL_IQR = 0.10  # a measurement whose IQR / median exceeds this is flagged noisy in reports


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and interquartile range over `n` measurements (each a block mean)."""

    median_s: float
    iqr_s: float
    n: int

    @property
    def rel_iqr(self) -> float:
        return self.iqr_s / self.median_s if self.median_s > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        return self.rel_iqr > NOISY_REL_IQR

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        """From raw per-call times (seconds): the median and the p25-p75 spread."""
        if not seconds:
            raise ValueError("Timing.of: no measurements")
        if len(seconds) == 1:
            return cls(seconds[0], 0.0, 1)
        q1, _, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
        return cls(statistics.median(seconds), q3 - q1, len(seconds))


def _measurement_times(m: benchmark.Measurement) -> list[float]:
    return list(m.times)  # per-call seconds, one value per block


def time_fn(fn: Callable[[], object], min_run_time: float = 0.2, warmup: int = 1) -> Timing:
    """Seconds per fn() call, after `warmup` untimed calls (compilation, caches, allocator)."""
    return time_interleaved({"fn": fn}, rounds=1, min_run_time=min_run_time, warmup=warmup)["fn"]


def time_interleaved(fns: Mapping[str, Callable[[], object]], rounds: int = 5, min_run_time: float = 0.1,
                     warmup: int = 1, num_threads: int | None = None) -> dict[str, Timing]:
    """Time each callable in `rounds` interleaved rounds; each round is one `blocked_autorange` per callable.

    The result per name pools the block times of all its rounds (median and IQR over them). `num_threads`
    fixes torch's intra-op threads for the measurement (default: the current setting), as CPU timings
    depend on it; the caller records it.
    """
    threads = num_threads or torch.get_num_threads()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
              for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].extend(_measurement_times(timer.blocked_autorange(min_run_time=min_run_time)))
    return {name: Timing.of(ts) for name, ts in times.items()}
