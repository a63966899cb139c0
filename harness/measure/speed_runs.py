"""Controlled speed and memory of the model shapes of a matrix (speed runs), and a trial's exact memory facts.

Inference speed is a property of an architecture and its dims, not of the optimizer that trained it, so it is
measured once per distinct model shape (`shape_key`) of a matrix invocation, on a freshly built model, with all
shapes in one process and timed in interleaved rounds (A, B, C, A, B, C, ...) by the one timer
(`harness.measure.bench.timing.time_interleaved`: torch.utils.benchmark, warm-up, CUDA-synchronised, median / IQR / n).
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
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from arch.moe import moe_modules
from arch.muon import enable_max_logit_tracking
from arch.optimizers import OptimizerConfig
from harness import schema
from harness.measure.bench.timing import Timing, time_interleaved
from harness.measure.inference import (
    InferenceShape,
    inference_fns,
    inference_metrics,
    kv_bytes_per_token,
    serving_copy,
    timed_metrics,
)
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
        group = groups.setdefault(key, ShapeGroup(key, spec.variant, spec.preset, spec.experiment, spec.dims,
                                                  spec.train, spec.seed))
        group.optims.setdefault(spec.optimizer, spec.optim)
    return list(groups.values())


# ----------------------------------------------------------------------------- exact memory facts


def live_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, *tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages a training step starts with: parameters, buffers, grads, optimizer
    state and the batch."""
    seen: dict[int, int] = {}
    everything = [*model.parameters(), *model.buffers(), *tensors,
                  *(p.grad for p in model.parameters() if p.grad is not None),
                  *(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))]
    for t in everything:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# ----------------------------------------------------------------------------- one training step


def train_step_fns(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   amp: torch.dtype | None, grad_clip: float, max_logit: bool, zero_first: bool = True,
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
    return sorted((e.start_ns(), e.nbytes()) for e in events
                  if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)


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


def step_peak_bytes(group: ShapeGroup, optimizer_name: str, x: torch.Tensor, y: torch.Tensor,
                    device: torch.device, amp: torch.dtype | None) -> int:
    """Peak tensor bytes of one steady-state training step of a freshly built (shape, optimizer): its live
    storages at the step's start plus the step's own peak. Built and freed here: nothing else counts."""
    torch.manual_seed(group.seed)
    model = build_model(group.variant, group.dims).to(device)
    optimizer = group.optims[optimizer_name].build(model)
    fns = train_step_fns(model, optimizer, x, y, amp, group.train.grad_clip, optimizer_name == "muonclip",
                         zero_first=False)
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


@dataclass
class _Prepared:
    group: ShapeGroup
    amp: torch.dtype | None
    shape: InferenceShape
    batch_sizes: tuple[int, ...]
    tokens: int  # tokens of one training step (one micro-batch)
    exact: dict[str, float]
    keep: list  # models and optimizers the callables close over


def _prepare(group: ShapeGroup, rows: torch.Tensor, device: torch.device, fns: dict[str, Callable[[], object]],
             memory: bool) -> _Prepared:
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


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_speed(trials: list[TrialSpec], data, device: torch.device, rounds: int = 5,
                  min_run_time: float = 0.1, warmup: int = 2, threads: int | None = None, memory: bool = True,
                  console: Console | None = None) -> list[SpeedResult]:
    """Speed and memory of every distinct model shape of `trials`, all in this process, interleaved.

    data: a PreparedData (the fixed batch and prompts are its first training tokens) or a vocabulary size
    (seeded random tokens). threads: torch intra-op threads for the whole measurement (default: the current
    setting), recorded with the results. rounds / min_run_time / warmup: time_interleaved's."""
    groups = group_shapes(trials)
    if not groups:
        return []
    vocab = data if isinstance(data, int) else data.vocab_size
    source = None if isinstance(data, int) else data.train
    n_threads = threads or torch.get_num_threads()
    n_rows = max(max(g.train.micro_batch_size, *g.train.infer_batch_sizes) for g in groups)
    length = max(g.dims.block_size for g in groups) + 1
    rows = fixed_rows(source, vocab, n_rows, length, seed=groups[0].seed)
    console = console or Console(stderr=True, quiet=True)
    fns: dict[str, Callable[[], object]] = {}
    with _threads(n_threads), Progress(TextColumn("[bold]speed[/] {task.description}"), BarColumn(),
                                       MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                                       transient=True) as bar:
        task = bar.add_task("building shapes", total=len(groups))
        prepared = []
        for g in groups:
            bar.update(task, description=f"building {g.label}")
            prepared.append(_prepare(g, rows[:, : g.dims.block_size + 1], device, fns, memory))
            bar.advance(task)
        bar.update(task, description=f"timing {len(fns)} callables x {rounds} interleaved rounds",
                   completed=0, total=None)
        timings = time_interleaved(fns, rounds=rounds, min_run_time=min_run_time, warmup=warmup,
                                   num_threads=n_threads)
    settings = {"rounds": rounds, "min_run_time": min_run_time, "warmup": warmup}
    results = []
    for p in prepared:
        s = {**settings, "micro_batch_size": p.group.train.micro_batch_size, "prompt_len": p.shape.prompt_len,
             "new_tokens": p.shape.new_tokens, "dtype": str(p.amp or "float32").removeprefix("torch.")}
        results.append(SpeedResult(p.group, _metrics(p, timings), n_threads, device, s))
    return results


# ----------------------------------------------------------------------------- logging and printing


def speed_tags(result: SpeedResult, parent_id: str | None, common_tags: dict[str, str]) -> dict[str, str]:
    g = result.group
    tags = {**common_tags, schema.TAG_SHAPE: g.key, schema.TAG_VARIANT: g.variant, schema.TAG_PRESET: g.preset,
            schema.TAG_THREADS: str(result.threads), schema.TAG_SPEED_OPTIMIZERS: ",".join(g.optims),
            schema.TAG_EXPERIMENT: g.experiment}
    tags.setdefault(schema.TAG_DEVICE, torch.cuda.get_device_name(result.device) if result.device.type == "cuda"
                    else "cpu")
    if parent_id:
        tags[schema.TAG_SPEED_PARENT] = parent_id
    return tags


def log_speed(tracker, experiment_id: str, parent_id: str | None, results: list[SpeedResult],
              common_tags: dict[str, str]) -> list[str]:
    """One finished speed run per shape, a child of the matrix run; returns their run ids."""
    run_ids = []
    for r in results:
        params = {f"model.{k}": v for k, v in variant_params(r.group.variant, r.group.dims).items()}
        params.update({f"speed.{k}": v for k, v in r.settings.items()})
        run = tracker.start_trial(experiment_id, parent_id, f"speed {r.group.label}",
                                  speed_tags(r, parent_id, common_tags), params, system_metrics=False,
                                  kind=SPEED_KIND)
        run.log(0, r.metrics, final=True)
        run.end(schema.FINISHED)
        run_ids.append(run.run_id)
    return run_ids


def speed_table(results: list[SpeedResult]) -> Table:
    """Medians +- IQR (n) of the speed runs, for the console."""
    table = Table(title=f"controlled speed ({results[0].threads} torch threads, {results[0].device.type})"
                  if results else "controlled speed", header_style="bold")
    for col in ("shape", "measure", "median", "IQR", "n"):
        table.add_column(col, justify="left" if col in ("shape", "measure") else "right")
    for r in results:
        for key in sorted(k for k in r.metrics if not k.endswith(("_iqr", "_n"))):
            value = r.metrics[key]
            iqr, n = r.metrics.get(f"{key}_iqr"), r.metrics.get(f"{key}_n")
            table.add_row(escape(r.group.label), key.removeprefix(schema.SPEED_PREFIX), f"{value:,.6g}",
                          "" if iqr is None else f"{iqr:,.3g}", "" if n is None else f"{n:.0f}")
    return table


def measure_matrix_speed(trials: list[TrialSpec], data, device: torch.device, tracker, experiment_id: str,
                         parent_id: str | None, common_tags: dict[str, str], console: Console) -> list[str]:
    """What `run_matrix` calls after its trials: measure every shape, log the speed runs, print the table.
    A failure here is reported in one line and does not fail the matrix (its trials are already logged).
    Under torchrun (--nproc) the speed runs are skipped: Muon's and QK-Clip's steps would run collectives that
    the other ranks, done with their trials, no longer answer."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        console.print("[yellow]speed runs skipped under --nproc[/]: rerun the matrix without --nproc to measure "
                      "speed and memory per model shape (its finished trials are skipped)")
        return []
    try:
        results = measure_speed(trials, data, device, console=console)
        run_ids = log_speed(tracker, experiment_id, parent_id, results, common_tags)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        console.print(f"[red]speed measurement failed[/]: {escape(f'{type(e).__name__}: {first}')}")
        return []
    if results:
        console.print(speed_table(results))
    return run_ids
