"""The one timer: every benchmark in kimi-bench (bench suite, inference, controlled train steps) uses it.

Built on `torch.utils.benchmark.Timer.blocked_autorange`, which handles CUDA synchronisation itself and
repeats a statement in blocks until a minimum run time is reached. Several callables are measured in
interleaved rounds (A, B, C, A, B, C, ...) so that a slow phase of a shared machine hits every arm alike.
`time_phases` times the phases of one multi-phase call (a train step's fwd+bwd | clip | step | rest) with
CUDA events on the stream, where a host-clock block around the whole call cannot see inside it.
`time_rounds` times callables in adaptive interleaved rounds, one block per callable per round, for paired
per-round ratios (harness.measure.bench.ratios): rounds go on while a caller's rule still names callables to time.
"""

from __future__ import annotations

import math
import statistics
import time
import timeit
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch.utils import benchmark
from torch.utils.benchmark.utils.timer import timer as synchronized_clock  # the clock benchmark.Timer uses

from harness.schema import NOISY_REL_IQR
from harness.trial.step import synchronize


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and interquartile range over `n` measurements (each a block mean), and the
    quartiles themselves (None where only median and IQR are known), which a throughput's spread needs."""

    median_s: float
    iqr_s: float
    n: int
    q1_s: float | None = None
    q3_s: float | None = None

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
            return cls(seconds[0], 0.0, 1, seconds[0], seconds[0])
        q1, _, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
        return cls(statistics.median(seconds), q3 - q1, len(seconds), q1, q3)


def _measurement_times(m: benchmark.Measurement) -> list[float]:
    return list(m.times)  # per-call seconds, one value per block


def time_fn(fn: Callable[[], object], min_run_time: float = 0.2, warmup: int = 1) -> Timing:
    """Seconds per fn() call, after `warmup` untimed calls (compilation, caches, allocator)."""
    return time_interleaved({"fn": fn}, rounds=1, min_run_time=min_run_time, warmup=warmup)["fn"]


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    rounds: int = 5,
    min_run_time: float = 0.1,
    warmup: int = 1,
    num_threads: int | None = None,
) -> dict[str, Timing]:
    """Time each callable in `rounds` interleaved rounds; each round is one `blocked_autorange` per callable.

    The result per name pools the block times of all its rounds (median and IQR over them). `num_threads`
    fixes torch's intra-op threads for the measurement (default: the current setting), as CPU timings
    depend on it; the caller records it.
    """
    threads = num_threads or torch.get_num_threads()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].extend(_measurement_times(timer.blocked_autorange(min_run_time=min_run_time)))
    return {name: Timing.of(ts) for name, ts in times.items()}


@dataclass
class RoundTimes:
    """Per-call seconds of each callable in each round (None: that round did not time it), and the wall
    seconds the whole timing took (warm-up included)."""

    times: dict[str, list[float | None]]
    seconds: float = 0.0
    numbers: dict[str, int] = field(default_factory=dict)  # calls per timed block

    @property
    def rounds(self) -> int:
        return len(next(iter(self.times.values()), []))

    def timing(self, name: str) -> Timing:
        """Median and IQR over the rounds that timed `name`."""
        return Timing.of([t for t in self.times[name] if t is not None])


def block_size(seconds_per_call: float, sample_s: float) -> int:
    """Calls per timed block: enough for the block to last `sample_s` (clock overhead negligible), at least 1."""
    return max(1, math.ceil(sample_s / max(seconds_per_call, 1e-9)))


def time_rounds(
    fns: Mapping[str, Callable[[], object]],
    select: Callable[[RoundTimes], Collection[str]],
    min_rounds: int = 8,
    max_rounds: int = 400,
    max_seconds: float = 30.0,
    sample_s: float = 0.01,
    warmup: int = 2,
    on_round: Callable[[RoundTimes], None] | None = None,
    numbers: Mapping[str, int] | None = None,
) -> RoundTimes:
    """Time `fns` in interleaved rounds until `select` names nothing more to time.

    Warm-up: `warmup` untimed calls each (the last one, timed, sizes the callable's block: `block_size`,
    unless `numbers` fixes its calls per block).
    Each round times one block per callable, in the order of `fns`, reversed every other round (a drift within
    a round then favours neither end), with torch.utils.benchmark's synchronising clock under `timeit` (GC off
    while timing). The first `min_rounds` rounds time every callable; later rounds time only what
    `select(times so far)` returns, and the timing stops when it returns nothing, after `max_rounds`, or at the
    first round boundary past `max_seconds` (warm-up included). Torch's thread count is the caller's."""
    start = time.perf_counter()
    out = RoundTimes({name: [] for name in fns})
    for name, fn in fns.items():
        for _ in range(max(warmup - 1, 0)):
            fn()
        t0 = synchronized_clock()
        fn()
        out.numbers[name] = (numbers or {}).get(name) or block_size(synchronized_clock() - t0, sample_s)
    timers = {name: timeit.Timer(fn, timer=synchronized_clock) for name, fn in fns.items()}
    order = list(fns)
    for r in range(max_rounds):
        if r >= min_rounds:
            if time.perf_counter() - start >= max_seconds:
                break
            wanted = set(select(out))
            if not wanted:
                break
        else:
            wanted = set(order)
        for name in order if r % 2 == 0 else order[::-1]:
            n = out.numbers[name]
            out.times[name].append(timers[name].timeit(n) / n if name in wanted else None)
        out.seconds = time.perf_counter() - start
        if on_round is not None:
            on_round(out)
    out.seconds = time.perf_counter() - start
    return out


class _Marks:
    """Timestamps on the device's timeline: CUDA events recorded on the current stream (no host sync), or
    time.perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stamps: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.stamps.append(event)
        else:
            self.stamps.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks (call synchronize() first on CUDA)."""
        pairs = zip(self.stamps, self.stamps[1:], strict=False)
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in pairs]
        return [b - a for a, b in pairs]


def time_phases(
    step: Callable[[Callable[[], None]], object],
    phases: Sequence[str],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, Timing]:
    """Seconds per phase of a call that marks the end of each phase: `step(mark)` calls `mark()` once after
    each of `phases`, in order. The start is marked before each call; "total" is the whole call. On CUDA
    the marks are events on the current stream, so the `repeats` timed calls run without a host sync
    between them (one sync at the end), as a training loop runs. Each phase's Timing is over the calls."""
    device = torch.device(device)
    for _ in range(warmup):
        step(lambda: None)
    synchronize(device)
    runs = []
    for _ in range(repeats):
        marks = _Marks(device)
        marks.mark()
        step(marks.mark)
        runs.append(marks)
    synchronize(device)
    per_phase: dict[str, list[float]] = {name: [] for name in (*phases, "total")}
    for marks in runs:
        spans = marks.seconds()
        if len(spans) != len(phases):
            raise ValueError(f"time_phases: step marked {len(spans)} phase ends, expected {len(phases)}")
        for name, s in zip(phases, spans, strict=True):
            per_phase[name].append(s)
        per_phase["total"].append(sum(spans))
    return {name: Timing.of(ts) for name, ts in per_phase.items()}
