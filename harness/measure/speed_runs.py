"""Controlled speed and memory of the model shapes of a matrix (speed runs), and a trial's exact memory facts.

Inference speed is a property of an architecture and its dims, not of the optimizer that trained it, so it is
measured once per distinct model shape (`shape_key`) of a matrix invocation, on a freshly built model, with all
shapes in one process and timed in interleaved rounds (A, B, C, C, B, A, ...) by
`harness.measure.bench.timing.time_rounds` (torch.utils.benchmark's synchronising clock, warm-up, median / IQR /
n over rounds), on CPU on one pinned thread.
Between shapes, the ratio of two callables' rates is taken within each round and summarised as a median with a
95% interval (harness/measure/bench/ratios.py); rounds go on until every such pair's interval is within ±3% or the
time cap (MAX_SECONDS) is reached.
Per shape: prefill tokens/s and time to first token (batch 1), cached decode tokens/s at each
`train.infer_batch_sizes`, KV-cache bytes per token read off a real cache. Per shape x optimizer used with it:
one training step on a fixed batch of `micro_batch_size` sequences (one micro-batch, whatever grad_accum),
timed as forward+backward, optimizer step, and the whole step (zero_grad, forward, backward, clip, step, MoE
bias update). The timed optimizers run at lr 0 so the weights (and so every repeat) stay the same; the
arithmetic of a step does not depend on the lr.

Peak memory of one steady-state training step (the optimizer state already exists, as in training):
the bytes of the shape's live tensors at the step's start (parameters, buffers, optimizer state, batch) plus
the peak of the tensor bytes allocated during the step: on CUDA from torch.cuda.max_memory_allocated, on CPU
from the torch profiler's memory events (allocator-level accounting of this step only), so the figure does not
depend on what the process ran before, unlike process RSS. Both count tensor bytes, the same quantity.

Speed runs are MLflow children of the matrix run (tag kb.kind = "speed"); harness/schema.py names the keys and
docs/design.md describes them. Everything is measured first and logged at the end, so a kill leaves no
half-logged speed run.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from arch.moe import moe_modules
from arch.muon import enable_max_logit_tracking
from arch.optimizers import OptimizerConfig
from harness import schema
from harness.measure.bench.ratios import TARGET_HALF_WIDTH, Pair, unsettled
from harness.measure.bench.timing import RoundTimes, Timing, time_rounds
from harness.measure.inference import (
    InferenceShape,
    inference_fns,
    inference_metrics,
    kv_bytes_per_token,
    serving_copy,
    timed_metrics,
)
from harness.measure.memory import live_bytes, peak_delta_bytes
from harness.measure.speed_pairs import compared_callables, ratio_metrics, ratio_pairs, timing_order, widest
from harness.measure.speed_tables import ratio_table, speed_table
from harness.spec.registry import ModelDims, TrainConfig, TrialSpec, build_model, shape_key, variant_params
from harness.trial.step import autocast_dtype, forward_backward, train_step

SPEED_KIND = schema.KIND_SPEED


# ----------------------------------------------------------------------------- shapes


@dataclass
class ShapeGroup:
    """One distinct model shape of a matrix and the optimizers the matrix trains it with."""

    key: str
    variant: str
    preset: str
    experiment: str
    dims: ModelDims
    train: TrainConfig  # the first trial's: batch size, infer settings, dtype, clip
    seed: int
    optims: dict[str, OptimizerConfig] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.variant} {self.preset} [{self.key}]"


def group_shapes(trials: list[TrialSpec]) -> list[ShapeGroup]:
    """The distinct shapes of `trials` in first-seen order; per shape the optimizers in first-seen order (the
    first trial's config of each optimizer name)."""
    groups: dict[str, ShapeGroup] = {}
    for spec in trials:
        key = shape_key(spec.variant, spec.dims)
        group = groups.setdefault(
            key, ShapeGroup(key, spec.variant, spec.preset, spec.experiment, spec.dims, spec.train, spec.seed)
        )
        group.optims.setdefault(spec.optimizer, spec.optim)
    return list(groups.values())


# ----------------------------------------------------------------------------- one training step


def train_step_fns(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: torch.dtype | None,
    grad_clip: float,
    max_logit: bool,
    zero_first: bool = True,
) -> dict[str, Callable[[], object]]:
    """`fwd_bwd`, `optim` and `step` callables of the one train step (harness.trial.step.train_step) on one
    micro-batch. zero_first: grads are dropped at the start of a call (they stay for `optim`); else at the end
    of `step`, as the trainer does (what a memory measurement wants). Attention modules track their max logit
    when `max_logit` (muonclip), switched only when another optimizer's callable left them otherwise."""
    moe = moe_modules(model)

    def track() -> None:
        if getattr(model, "_kb_max_logit", None) != max_logit:
            enable_max_logit_tracking(model, max_logit)
            model._kb_max_logit = max_logit

    def fwd_bwd() -> None:
        track()
        if zero_first:
            optimizer.zero_grad(set_to_none=True)
        forward_backward(model, x, y, amp)

    def optim() -> None:
        optimizer.step()

    def step() -> None:
        track()
        if zero_first:
            optimizer.zero_grad(set_to_none=True)
        train_step(model, optimizer, [(x, y)], amp, grad_clip, moe=moe, zero_grad=not zero_first)

    return {"fwd_bwd": fwd_bwd, "optim": optim, "step": step}


def frozen_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer at lr 0 in every group: the same arithmetic, weights that do not move between repeats."""
    optimizer = cfg.build(model)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    return optimizer


# ----------------------------------------------------------------------------- peak memory of one step


def step_peak_bytes(
    group: ShapeGroup,
    optimizer_name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    amp: torch.dtype | None,
) -> int:
    """Peak tensor bytes of one steady-state training step of a freshly built (shape, optimizer): its live
    storages at the step's start plus the step's own peak. Built and freed here: nothing else counts."""
    torch.manual_seed(group.seed)
    model = build_model(group.variant, group.dims).to(device)
    optimizer = group.optims[optimizer_name].build(model)
    fns = train_step_fns(
        model, optimizer, x, y, amp, group.train.grad_clip, optimizer_name == "muonclip", zero_first=False
    )
    fns["step"]()  # the first step allocates the optimizer state, which then lives for all of training
    start = live_bytes(model, optimizer, x, y)
    return start + peak_delta_bytes(fns["step"], device)


# ----------------------------------------------------------------------------- the measurement


def fixed_rows(source: np.ndarray | None, vocab_size: int, n_rows: int, length: int, seed: int) -> torch.Tensor:
    """[n_rows, length] token ids: consecutive windows of `source` (the corpus), or seeded random ids."""
    if source is not None and len(source) >= n_rows * length:
        return torch.from_numpy(np.asarray(source[: n_rows * length], dtype=np.int64)).view(n_rows, length)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab_size, (n_rows, length), generator=gen)


@dataclass
class SpeedResult:
    group: ShapeGroup
    metrics: dict[str, float]
    threads: int
    device: torch.device
    settings: dict[str, float]
    cpus: str = "unpinned"  # the CPUs the measurement was pinned to (kb.cpus)


@dataclass
class _Prepared:
    group: ShapeGroup
    amp: torch.dtype | None
    shape: InferenceShape
    batch_sizes: tuple[int, ...]
    tokens: int  # tokens of one training step (one micro-batch)
    exact: dict[str, float]
    keep: list  # models and optimizers the callables close over


def _prepare(
    group: ShapeGroup, rows: torch.Tensor, device: torch.device, fns: dict[str, Callable[[], object]], memory: bool
) -> _Prepared:
    """Build one shape (once), its inference copy and its optimizers; add its callables to `fns`."""
    train = group.train
    amp = autocast_dtype(train.dtype, device)
    block = group.dims.block_size
    batch = train.micro_batch_size
    x, y = rows[:batch, :-1].contiguous().to(device), rows[:batch, 1:].contiguous().to(device)
    exact: dict[str, float] = {}
    if memory:
        for name in group.optims:
            exact[schema.speed_opt(name, "peak_bytes")] = float(step_peak_bytes(group, name, x, y, device, amp))

    torch.manual_seed(group.seed)
    model = build_model(group.variant, group.dims).to(device)
    served, served_amp = serving_copy(model, amp)
    if served is model:
        served = copy.deepcopy(model)
    served.eval()
    shape = InferenceShape.for_block(block, train.infer_new_tokens)
    batch_sizes = tuple(train.infer_batch_sizes)
    prompts = {b: rows[:b, : shape.prompt_len].contiguous().to(device) for b in batch_sizes}
    exact[schema.SPEED_KV_BYTES] = kv_bytes_per_token(served)
    fns.update(inference_fns(served, prompts, shape, served_amp, prefix=f"{group.key}/"))

    model.train()
    keep: list = [model, served]
    for name, cfg in group.optims.items():
        optimizer = frozen_optimizer(cfg, model)
        keep.append(optimizer)
        for part, fn in train_step_fns(model, optimizer, x, y, amp, train.grad_clip, name == "muonclip").items():
            fns[f"{group.key}/{name}/{part}"] = fn
    return _Prepared(group, amp, shape, batch_sizes, batch * block, exact, keep)


def _metrics(p: _Prepared, timings: dict[str, Timing]) -> dict[str, float]:
    key = p.group.key
    out = inference_metrics(timings, p.shape, p.batch_sizes, f"{key}/", schema.SPEED_PREFIX)
    for name in p.group.optims:
        for part in ("step", "fwd_bwd", "optim"):
            out.update(timed_metrics(schema.speed_opt(name, f"{part}_s"), timings[f"{key}/{name}/{part}"]))
        out.update(timed_metrics(schema.speed_opt(name, "train_tokens_per_s"), timings[f"{key}/{name}/step"], p.tokens))
    out.update(p.exact)
    return out


# ----------------------------------------------------------------------------- paired ratios between shapes


# ----------------------------------------------------------------------------- threads and CPU pinning


@contextlib.contextmanager
def _pinned(device: torch.device, threads: int) -> Iterator[str]:
    """Torch's intra-op threads set to `threads` for the measurement; on CPU the measuring thread (and the
    threads it starts) also pinned, where the OS allows (os.sched_setaffinity), to the highest-numbered
    `threads` CPUs it may use (Linux serves most interrupts on CPU 0), so it never migrates mid-round.
    Yields the CPUs as text ("1", "0,1") or "unpinned"; restores both on exit."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    allowed = None
    label = "unpinned"
    if device.type == "cpu" and hasattr(os, "sched_setaffinity"):
        try:
            allowed = os.sched_getaffinity(0)
            cpus = sorted(allowed)[-threads:]
            os.sched_setaffinity(0, cpus)
            label = ",".join(map(str, cpus))
        except OSError:  # a container or OS that refuses: measured unpinned, and tagged so
            allowed = None
    try:
        yield label
    finally:
        if allowed is not None:
            os.sched_setaffinity(0, allowed)
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the measurement

CPU_THREADS = 1  # torch threads of a CPU speed measurement (kb.threads): one pinned core, the least shared
MIN_ROUNDS = 8  # every callable is timed this often (the per-arm medians and IQRs); 6 give a first interval
MAX_SECONDS = 30.0  # cap on the timing: on the smoke matrix (2 shapes x 3 optimizers) a round takes ~0.6 s
SAMPLE_S = 0.01  # a timed block lasts at least this long (short callables are repeated within it)
MAX_SECONDS_ENV = "KB_SPEED_MAX_SECONDS"  # overrides MAX_SECONDS for `kimi-bench run` (the test suite sets 2)


def max_seconds_setting(console: Console | None = None) -> float:
    """MAX_SECONDS, or $KB_SPEED_MAX_SECONDS when it holds a number >= 0 (else one line says so)."""
    text = os.environ.get(MAX_SECONDS_ENV)
    if text is None:
        return MAX_SECONDS
    try:
        value = float(text)
        if value >= 0 and math.isfinite(value):
            return value
    except ValueError:
        pass
    if console is not None:
        console.print(
            f"[yellow]{MAX_SECONDS_ENV}={escape(text)}[/]: not a number of seconds >= 0; the speed "
            f"timing uses {MAX_SECONDS:g} s (set e.g. {MAX_SECONDS_ENV}=10)"
        )
    return MAX_SECONDS


def measure_speed(
    trials: list[TrialSpec],
    data,
    device: torch.device,
    min_rounds: int = MIN_ROUNDS,
    max_seconds: float = MAX_SECONDS,
    target_half_width: float = TARGET_HALF_WIDTH,
    sample_s: float = SAMPLE_S,
    warmup: int = 2,
    threads: int | None = None,
    memory: bool = True,
    console: Console | None = None,
) -> list[SpeedResult]:
    """Speed and memory of every distinct model shape of `trials`, all in this process, in paired rounds.

    data: a PreparedData (the fixed batch and prompts are its first training tokens) or a vocabulary size
    (seeded random tokens). threads: torch intra-op threads for the whole measurement (default: CPU_THREADS on
    CPU, pinned; on CUDA the current setting), recorded with the results. Timing (time_rounds): `min_rounds`
    rounds of every callable, then rounds of the callables of every pair of shapes whose ratio's 95% interval
    is wider than `target_half_width` (ln; harness/measure/bench/ratios.py), until none is or `max_seconds` pass."""
    groups = group_shapes(trials)
    if not groups:
        return []
    vocab = data if isinstance(data, int) else data.vocab_size
    source = None if isinstance(data, int) else data.train
    n_threads = threads or (CPU_THREADS if device.type == "cpu" else torch.get_num_threads())
    n_rows = max(max(g.train.micro_batch_size, *g.train.infer_batch_sizes) for g in groups)
    length = max(g.dims.block_size for g in groups) + 1
    rows = fixed_rows(source, vocab, n_rows, length, seed=groups[0].seed)
    console = console or Console(stderr=True, quiet=True)
    fns: dict[str, Callable[[], object]] = {}
    # auto_refresh off: rich's refresh thread would share the pinned core with the timing; refreshed per round
    with (
        _pinned(device, n_threads) as cpus,
        Progress(
            TextColumn("[bold]speed[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            auto_refresh=False,
        ) as bar,
    ):
        task = bar.add_task("building shapes", total=len(groups))
        prepared = []
        for g in groups:
            bar.update(task, description=f"building {g.label}", refresh=True)
            prepared.append(_prepare(g, rows[:, : g.dims.block_size + 1], device, fns, memory))
            bar.advance(task)
        compared = [c for p in prepared for c in compared_callables(p)]
        pairs = ratio_pairs(compared)
        ordered = {name: fns[name] for name in timing_order(list(fns), compared)}

        def settle(rounds: RoundTimes) -> list[str]:
            return unsettled((Pair(a.name, b.name, a.work, b.work) for a, b in pairs), rounds.times, target_half_width)

        def show(rounds: RoundTimes) -> None:
            w = widest(pairs, rounds)
            spread = f"widest ratio interval ±{math.expm1(w):.1%}" if math.isfinite(w) else "no interval yet"
            bar.update(
                task,
                description=f"round {rounds.rounds}, {rounds.seconds:.0f} s: {spread} (target "
                f"±{math.expm1(target_half_width):.0%}, cap {max_seconds:.0f} s)",
                completed=0,
                total=None,
                refresh=True,
            )

        bar.update(task, description=f"warming up {len(fns)} callables", completed=0, total=None, refresh=True)
        rounds = time_rounds(
            ordered,
            settle,
            min_rounds=min_rounds,
            max_seconds=max_seconds,
            sample_s=sample_s,
            warmup=warmup,
            on_round=show,
        )
    timings = {name: rounds.timing(name) for name in fns}
    ratios = ratio_metrics(pairs, rounds)
    common = {schema.SPEED_ROUNDS: float(rounds.rounds), schema.SPEED_TIMING_S: rounds.seconds}
    settings = {
        "min_rounds": min_rounds,
        "max_seconds": max_seconds,
        "sample_s": sample_s,
        "warmup": warmup,
        "half_width_target": round(math.expm1(target_half_width), 6),
    }
    results = []
    for p in prepared:
        s = {
            **settings,
            "micro_batch_size": p.group.train.micro_batch_size,
            "prompt_len": p.shape.prompt_len,
            "new_tokens": p.shape.new_tokens,
            "dtype": str(p.amp or "float32").removeprefix("torch."),
        }
        metrics = {**_metrics(p, timings), **ratios.get(p.group.key, {}), **common}
        results.append(SpeedResult(p.group, metrics, n_threads, device, s, cpus))
    return results


# ----------------------------------------------------------------------------- logging and printing


def speed_tags(result: SpeedResult, parent_id: str | None, common_tags: dict[str, str]) -> dict[str, str]:
    g = result.group
    tags = {
        **common_tags,
        schema.TAG_SHAPE: g.key,
        schema.TAG_VARIANT: g.variant,
        schema.TAG_PRESET: g.preset,
        schema.TAG_THREADS: str(result.threads),
        schema.TAG_SPEED_OPTIMIZERS: ",".join(g.optims),
        schema.TAG_SPEED_CPUS: result.cpus,
        schema.TAG_EXPERIMENT: g.experiment,
    }
    tags.setdefault(
        schema.TAG_DEVICE, torch.cuda.get_device_name(result.device) if result.device.type == "cuda" else "cpu"
    )
    if parent_id:
        tags[schema.TAG_SPEED_PARENT] = parent_id
    return tags


def log_speed(
    tracker, experiment_id: str, parent_id: str | None, results: list[SpeedResult], common_tags: dict[str, str]
) -> list[str]:
    """One finished speed run per shape, a child of the matrix run; returns their run ids."""
    run_ids = []
    for r in results:
        params = {f"model.{k}": v for k, v in variant_params(r.group.variant, r.group.dims).items()}
        params.update({f"speed.{k}": v for k, v in r.settings.items()})
        run = tracker.start_trial(
            experiment_id,
            parent_id,
            f"speed {r.group.label}",
            speed_tags(r, parent_id, common_tags),
            params,
            system_metrics=False,
            kind=SPEED_KIND,
        )
        run.log(0, r.metrics, final=True)
        run.end(schema.FINISHED)
        run_ids.append(run.run_id)
    return run_ids


def measure_matrix_speed(
    trials: list[TrialSpec],
    data,
    device: torch.device,
    tracker,
    experiment_id: str,
    parent_id: str | None,
    common_tags: dict[str, str],
    console: Console,
) -> list[str]:
    """What `run_matrix` calls after its trials: measure every shape, log the speed runs, print the table.
    A failure here is reported in one line and does not fail the matrix (its trials are already logged).
    Under torchrun (--nproc) the speed runs are skipped: Muon's and QK-Clip's steps would run collectives that
    the other ranks, done with their trials, no longer answer."""
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        console.print(
            "[yellow]speed runs skipped under --nproc[/]: rerun the matrix without --nproc to measure "
            "speed and memory per model shape (its finished trials are skipped)"
        )
        return []
    try:
        results = measure_speed(trials, data, device, max_seconds=max_seconds_setting(console), console=console)
        run_ids = log_speed(tracker, experiment_id, parent_id, results, common_tags)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        console.print(f"[red]speed measurement failed[/]: {escape(f'{type(e).__name__}: {first}')}")
        return []
    if results:
        console.print(speed_table(results))
        console.print(ratio_table(results))
    return run_ids
