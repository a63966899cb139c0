"""What a matrix will cost before anything trains: steps, tokens, training FLOPs, checkpoint and optimizer bytes
and an estimated time per trial, computed offline (models are built on the meta device; no data is read
unless the vocabulary can only come from a corpus that is already on this machine).

Used by `kimi-bench params --matrix` and `kimi-bench run --dry-run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.errors import UserError
from harness.spec.registry import TrialSpec

# Assumed model-FLOPs utilization of the time estimates (stated beside every estimate). CUDA: 40% of the
# dense bf16 peak is what nanoGPT-class training reaches on A100/H100 (nanoGPT's README reports ~40% MFU for
# GPT-2 124M on A100s). CPU: 30% of a measured fp32 matmul rate: on the smoke matrix (2 shared cores, one
# torch thread) it estimated 11 s and 9 s per trial where the runs took 7-11 s of training.
CUDA_MFU = 0.40
CPU_MFU = 0.30
FP32_BYTES = 4


def vocab_size_for(fields: dict[str, Any], cache_dir: str | None = None) -> tuple[int, bool]:
    """harness.data.vocab_size_for with the CLI's --cache-dir: the vocabulary without the data (offline)."""
    from harness.data import vocab_size_for as from_definition

    return from_definition({**fields, **({"cache_dir": cache_dir} if cache_dir else {})})


@dataclass(frozen=True)
class TrialCost:
    name: str
    steps: int | None  # None: a wall-clock budget
    tokens: int | None
    flops_per_token: int
    train_flops: float | None
    checkpoint_bytes: int
    optimizer_bytes: int
    seconds: float | None  # estimated training time


@dataclass(frozen=True)
class DeviceRate:
    """Sustained FLOP/s assumed for the estimates, and how it was obtained (printed with them)."""

    device: str
    flops_per_s: float
    how: str
    gpus_per_trial: int = 0


def checkpoint_bytes(model) -> int:
    """model.pt's tensor bytes: every unique parameter and persistent buffer of the state dict (fp32)."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def optimizer_state_bytes(model, optimizer: str) -> int:
    """AdamW keeps two fp32 moments per parameter; Muon one fp32 momentum per Muon parameter, AdamW's two
    for the rest (embeddings, head, router, norms: arch.optimizers.PARAM_RULES)."""
    from arch.optimizers import classify

    total = 0
    for name, p in model.named_parameters():
        muon = optimizer in ("muon", "muonclip") and classify(name, p).startswith("muon")
        total += p.numel() * FP32_BYTES * (1 if muon else 2)
    return total


def trial_cost(spec: TrialSpec, rate: DeviceRate, world_size: int = 1) -> TrialCost:
    import torch

    from arch.counting import flops_per_token
    from harness.spec.registry import build_model

    with torch.device("meta"):
        model = build_model(spec.variant, spec.dims)
    fpt = flops_per_token(model, spec.dims.block_size)
    steps = spec.train.total_steps(spec.dims.block_size, world_size)
    tokens = steps * spec.train.tokens_per_step(spec.dims.block_size, world_size) if steps else None
    flops = float(fpt) * tokens if tokens else None
    seconds = flops / rate.flops_per_s if flops else spec.train.seconds
    return TrialCost(
        spec.name,
        steps,
        tokens,
        fpt,
        flops,
        checkpoint_bytes(model),
        optimizer_state_bytes(model, spec.optimizer),
        seconds,
    )


def measured_cpu_flops(seconds: float = 0.3, n: int = 512) -> float:
    """fp32 matmul FLOP/s of this process's torch threads, timed for ~`seconds` (n x n matrices) by the one
    timer (harness.measure.bench.timing.time_fn: median seconds per call after a warm-up call)."""
    import torch

    from harness.measure.bench.timing import time_fn

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / time_fn(lambda: a @ b, min_run_time=seconds, warmup=1).median_s


def device_rate(device: str | None, peak_tflops: float | None = None, gpus_per_trial: int = 1) -> DeviceRate:
    """The rate behind the time estimates: CUDA from the peak table (or --peak-tflops) at CUDA_MFU, CPU from
    a quick measured matmul at CPU_MFU. `auto` means CUDA when one is visible."""
    import torch

    want = device or "auto"
    cuda = want.startswith("cuda") or (want == "auto" and torch.cuda.is_available())
    if cuda:
        from harness.trial.metrics import PEAK_BF16_FLOPS, device_peak_flops

        name = (
            torch.cuda.get_device_name(torch.device(want if want != "auto" else "cuda"))
            if torch.cuda.is_available()
            else "H100"
        )
        peak = device_peak_flops(torch.device("cuda"), peak_tflops) if torch.cuda.is_available() else None
        peak = peak or (peak_tflops * 1e12 if peak_tflops else PEAK_BF16_FLOPS["H100"])
        return DeviceRate(
            name,
            peak * CUDA_MFU * gpus_per_trial,
            f"{peak / 1e12:.0f} TFLOP/s bf16 peak ({name}) x {CUDA_MFU:.0%} MFU"
            f"{f' x {gpus_per_trial} GPUs' if gpus_per_trial > 1 else ''}",
            gpus_per_trial,
        )
    measured = measured_cpu_flops()
    return DeviceRate(
        "cpu", measured * CPU_MFU, f"measured fp32 matmul {measured / 1e9:.1f} GFLOP/s x {CPU_MFU:.0%} assumed MFU"
    )


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".strip()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def cost_table(costs: Sequence[TrialCost], rate: DeviceRate, title: str) -> Table:
    table = Table(title=title, header_style="bold")
    columns = ["trial", "steps", "tokens", "train FLOPs", "checkpoint", "optimizer state", f"time ({rate.device})"]
    if rate.gpus_per_trial:
        columns.append("GPU-hours")
    for col in columns:
        table.add_column(col, justify="left" if col == "trial" else "right")
    for c in costs:
        row = [
            c.name,
            f"{c.steps:,}" if c.steps else "(seconds budget)",
            f"{c.tokens:,}" if c.tokens else "-",
            _si(c.train_flops, "FLOP"),
            _si(c.checkpoint_bytes, "B"),
            _si(c.optimizer_bytes, "B"),
            _duration(c.seconds),
        ]
        if rate.gpus_per_trial:
            row.append(f"{c.seconds * rate.gpus_per_trial / 3600:,.2f}" if c.seconds else "-")
        table.add_row(*row)
    return table


def totals_line(costs: Sequence[TrialCost], rate: DeviceRate) -> str:
    flops = sum(c.train_flops or 0 for c in costs)
    seconds = sum(c.seconds or 0 for c in costs)
    tokens = sum(c.tokens or 0 for c in costs)
    gpu = f", {seconds * rate.gpus_per_trial / 3600:,.1f} GPU-hours" if rate.gpus_per_trial else ""
    return (
        f"total: {len(costs)} trials, {tokens:,} tokens, {_si(flops, 'FLOP')}, about {_duration(seconds)} "
        f"one after another{gpu} (estimate: {rate.how})"
    )


def params_table(trials: Sequence[TrialSpec], title: str) -> Table:
    """One row per (arm, preset): parameter counts, FLOPs and KV bytes per token, the dims that matter."""
    import torch

    from arch.counting import count_params, flops_per_token, kv_cache_bytes_per_token
    from harness.spec.matching import describe_shape
    from harness.spec.registry import build_model

    table = Table(title=title, header_style="bold")
    for col in (
        "arm",
        "preset",
        "seeds",
        "total params",
        "active params",
        "embedding",
        "GFLOP/token",
        "KV B/token",
        "shape",
    ):
        table.add_column(col, justify="left" if col in ("arm", "preset", "shape") else "right")
    seeds: dict[tuple[str, str], list[int]] = {}
    for t in trials:
        seeds.setdefault((t.arm, t.preset), []).append(t.seed)
    shown = set()
    for t in trials:
        if (t.arm, t.preset) in shown:
            continue
        shown.add((t.arm, t.preset))
        with torch.device("meta"):
            model = build_model(t.variant, t.dims)
        c = count_params(model)
        table.add_row(
            t.arm,
            t.preset,
            ",".join(map(str, seeds[(t.arm, t.preset)])),
            f"{c.total:,}",
            f"{c.active:,}",
            f"{c.embedding:,}",
            f"{flops_per_token(model, t.dims.block_size) / 1e9:.4f}",
            f"{kv_cache_bytes_per_token(model, 2):,}",
            describe_shape(t.variant, t.dims),
        )
    return table


def show_plan(
    trials: Sequence[TrialSpec],
    title: str,
    console: Console,
    vocab: tuple[int, bool],
    device: str | None = None,
    peak_tflops: float | None = None,
    nproc: int = 1,
) -> list[TrialCost]:
    """Print the parameter table, the per-trial cost table and the totals; -> the costs."""
    if not trials:
        raise UserError("matrix: expands to no trials; list at least one arm, preset and seed")
    console.print(params_table(trials, title))
    rate = device_rate(device or trials[0].train.device, peak_tflops, nproc)
    costs = [trial_cost(t, rate, nproc) for t in trials]
    console.print(cost_table(costs, rate, "per trial: budget, compute, bytes, estimated time"))
    vocab_size, exact = vocab
    if not exact:
        console.print(
            f"vocabulary: {vocab_size} is an estimate (the corpus is not on this machine to count its "
            "characters); the real counts follow once the data is prepared",
            markup=False,
        )
    console.print(totals_line(costs, rate), markup=False, highlight=False)
    return costs
