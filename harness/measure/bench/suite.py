"""Benchmark suite entry: train-step tokens/s and MFU, MoE layer, MLA decode, Muon step, attention kernels.

    kimi-bench bench --device cuda --presets paper,gpt2-124m
    python -m harness.measure.bench.suite --device cuda --presets paper --out $OUT/paper.md    (same, no CLI needed)
    python -m harness.measure.bench.suite --device cpu --presets tiny --no-compile --repeats 2 (the code path, on CPU)
    reports/benchmarks/gpu-run.sh                                   (the one prepared GPU run, section by section)

One module per measured section (each a function returning rows, so tests and notebooks can call it alone):
train_step.py (train), moe_layer.py (moe), decode.py (decode), optim_step.py (optim), attention.py (attention);
targets.py states the targets over the rows, record.py writes the record.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console

from harness.errors import UserError
from harness.measure.bench.attention import bench_attention
from harness.measure.bench.decode import bench_decode
from harness.measure.bench.kit import TimingSettings, check_choices, measure_matmul_peak
from harness.measure.bench.moe_layer import bench_moe_layer
from harness.measure.bench.optim_step import bench_optimizer_step
from harness.measure.bench.record import (
    SECTIONS,
    default_record_path,
    environment,
    fmt,
    load_record,
    merge_records,
    merge_results,
    print_section,
    write_record,
)
from harness.measure.bench.targets import TARGET_DECODE_BATCH, evaluate_targets
from harness.measure.bench.train_step import bench_train_step
from harness.spec.registry import PRESETS, VARIANTS
from harness.trial.metrics import device_peak_flops
from harness.trial.step import resolve_device

MLA_VARIANTS = ("gpt-mla", "kimi")
MOE_VARIANTS = ("gpt-moe", "kimi")
OPTIMIZERS = ("adamw", "muon", "muonclip")


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    """Everything a section needs besides the preset: what to run and how long to time it."""

    device: torch.device
    variants: tuple[str, ...]
    compile_modes: tuple[bool, ...]
    optimizers: tuple[str, ...]
    timing: TimingSettings
    micro_batch: int | None
    decode_batches: tuple[int, ...]
    prompt_len: int | None
    new_tokens: int | None
    vocab_size: int | None
    peak_flops: float | None
    matmul_peak: float
    profile: bool


def _train_rows(s: SuiteSettings, preset: str) -> Iterator[dict]:
    for variant in s.variants:
        for optimizer in s.optimizers:
            # the optimizer step is never compiled: other optimizers' rows run eager (if selected)
            modes = s.compile_modes if optimizer == "adamw" else tuple(m for m in s.compile_modes if not m)
            for compiled in modes:
                yield bench_train_step(
                    variant,
                    preset,
                    s.device,
                    compile_model=compiled,
                    optimizer=optimizer,
                    micro_batch=s.micro_batch,
                    timing=s.timing,
                    vocab_size=s.vocab_size,
                    peak_flops=s.peak_flops,
                    matmul_peak=s.matmul_peak,
                    profile=s.profile,
                )


def _moe_rows(s: SuiteSettings, preset: str) -> Iterator[dict]:
    if any(v in MOE_VARIANTS for v in s.variants):
        yield from bench_moe_layer(preset, s.device, micro_batch=s.micro_batch, timing=s.timing, profile=s.profile)


def _decode_rows(s: SuiteSettings, preset: str) -> Iterator[dict]:
    for variant in s.variants:
        # the batch the decode verdict reads: the target's, else the largest measured
        target_batch = TARGET_DECODE_BATCH if TARGET_DECODE_BATCH in s.decode_batches else max(s.decode_batches)
        profile_batch = target_batch if s.profile and variant in MLA_VARIANTS else None
        yield from bench_decode(
            variant,
            preset,
            s.device,
            batch_sizes=s.decode_batches,
            prompt_len=s.prompt_len,
            new_tokens=s.new_tokens,
            timing=s.timing,
            vocab_size=s.vocab_size,
            profile_batch=profile_batch,
        )


def _optim_rows(s: SuiteSettings, preset: str) -> Iterator[dict]:
    for variant in s.variants:
        yield from bench_optimizer_step(variant, preset, s.device, timing=s.timing, vocab_size=s.vocab_size)


def _attention_rows(s: SuiteSettings, preset: str) -> Iterator[dict]:
    yield from bench_attention(preset, s.device, micro_batch=s.micro_batch, timing=s.timing)


SECTION_ROWS = {
    "train": _train_rows,
    "moe": _moe_rows,
    "decode": _decode_rows,
    "optim": _optim_rows,
    "attention": _attention_rows,
}
PROGRESS_KEYS = (
    "preset",
    "variant",
    "optimizer",
    "compile",
    "batch",
    "layer",
    "kind",
    "backend",
    "step_ms",
    "tokens_per_s",
    "mfu",
    "fwd_bwd_ms",
    "status",
)


def check_device(device: str | torch.device) -> torch.device:
    """--device as a torch device (harness.trial.step.resolve_device), refused in one line where the suite
    cannot run."""
    try:
        dev = resolve_device(device)
    except RuntimeError:
        raise UserError(f"--device: {device!r} is not a torch device; use cuda or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: cuda is not available here; use --device cpu --presets tiny for the code path")
    if dev.type not in ("cuda", "cpu"):
        raise UserError(f"--device: {dev.type} is not supported; use cuda or cpu")
    return dev


def _default_command() -> str:
    argv = sys.argv[:]
    suite = ["python", "-m", "harness.measure.bench.suite"]
    head = suite if argv and argv[0].endswith("suite.py") else [Path(argv[0]).name]
    return shlex.join(head + argv[1:])


def run_suite(
    device: str | torch.device,
    presets: Sequence[str],
    variants: Sequence[str],
    compile_modes: Sequence[bool] = (False, True),
    out_md: Path | None = None,
    *,
    sections: Sequence[str] = SECTIONS,
    optimizers: Sequence[str] = ("adamw", "muon"),
    timing: TimingSettings = TimingSettings(),
    micro_batch: int | None = None,
    decode_batches: Sequence[int] = (1, 32, 128),
    prompt_len: int | None = None,
    new_tokens: int | None = None,
    vocab_size: int | None = None,
    peak_tflops: float | None = None,
    profile: bool = False,
    append: bool = False,
    command: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the selected sections for every preset (and variant where it applies); print each section's table
    as it completes and rewrite the record (+ JSON) after each, so a run cut short keeps what it measured.
    out_md None: reports/benchmarks/<date>-<device-slug>.md. append: merge into the record already at out_md
    (a prepared script's steps build one record). Returns this run's results (merged, with append)."""
    dev = check_device(device)
    presets = check_choices("--presets", presets, tuple(PRESETS))
    variants = check_choices("--variants", variants, tuple(VARIANTS))
    sections = check_choices("--sections", sections, SECTIONS)
    optimizers = check_choices("--optimizers", optimizers, OPTIMIZERS)
    modes = tuple(dict.fromkeys(bool(c) for c in compile_modes))
    if not modes:
        raise UserError("--compile/--eager: no train-step mode left; keep --eager or --compile")
    timing.check()
    if append and out_md is None:
        raise UserError("--append: needs --out, the record to add to")
    console = console or (Console() if sys.stdout.isatty() else Console(width=200))
    if dev.type == "cuda":  # the trainer's settings (harness/trial/loop.py)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    env = environment(dev)
    peak = device_peak_flops(dev, peak_tflops)
    matmul_peak = measure_matmul_peak(dev)
    settings = {
        "device": str(dev),
        "presets": ",".join(presets),
        "variants": ",".join(variants),
        "compile_modes": ",".join("compiled" if c else "eager" for c in modes),
        "sections": ",".join(sections),
        "optimizers": ",".join(optimizers),
        **dataclasses.asdict(timing),
        "micro_batch": micro_batch or "preset default",
        "decode_batches": ",".join(map(str, decode_batches)),
        "vocab_size": vocab_size or "preset default",
        "profile": profile,
        "peak_flops": peak,
        "matmul_peak": matmul_peak,
    }
    run = {"command": command or _default_command(), "settings": settings, "seconds": None}
    results: dict[str, Any] = {"env": env, "settings": settings, "command": run["command"], "runs": [run]}
    path = out_md or default_record_path(env)
    previous = (
        load_record(path.with_suffix(".json"), "--append") if append and path.with_suffix(".json").exists() else None
    )
    s = SuiteSettings(
        dev,
        tuple(variants),
        modes,
        tuple(optimizers),
        timing,
        micro_batch,
        tuple(decode_batches),
        prompt_len,
        new_tokens,
        vocab_size,
        peak,
        matmul_peak,
        profile,
    )
    console.print(
        f"[bold]kimi-bench suite[/] on {env['device']} ({env['device_detail']}), torch {env['torch']}, "
        f"driver {env['driver']}; record: {path}" + (" (appending)" if previous else "")
    )
    console.print(
        f"measured matmul peak {matmul_peak / 1e12:.3g} TFLOP/s; datasheet peak (MFU denominator) "
        + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "n/a: MFU columns stay empty (--peak-tflops)")
    )

    def save() -> dict[str, Any]:
        run["seconds"] = time.perf_counter() - started
        results["targets"] = evaluate_targets(results)
        full = merge_results([previous, results]) if previous else results
        write_record(full, path)
        return full

    for section in sections:
        rows: list[dict] = []
        for preset in presets:
            for row in SECTION_ROWS[section](s, preset):
                rows.append(row)
                shown = {k: row[k] for k in PROGRESS_KEYS if k in row}
                console.print(
                    f"  {section}: "
                    + ", ".join(f"{k}={fmt(v, '{:.4g}') if isinstance(v, float) else v}" for k, v in shown.items()),
                    highlight=False,
                )
                results[section] = rows
                save()  # after every row: a run killed mid-section keeps the rows it finished
        results[section] = rows
        print_section(console, section, rows)
        save()
    full = save()
    print_section(console, "targets", full["targets"])
    console.print(f"record written: {path} (+ {path.with_suffix('.json').name})")
    return full


# ============================================================================ CLI


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _csv_ints(field: str, value: str) -> list[int]:
    try:
        out = [int(v) for v in _csv(value)]
    except ValueError:
        out = []
    if not out or any(v < 1 for v in out):
        raise UserError(f"{field}: {value!r} is not a comma-separated list of positive integers; e.g. 1,32,128")
    return out


def bench_command(
    device: Annotated[str, typer.Option(help="cuda (the purpose) or cpu (code path, with --presets tiny)")] = "cuda",
    presets: Annotated[str, typer.Option(help="comma-separated size presets")] = "paper,gpt2-124m",
    variants: Annotated[str, typer.Option(help="comma-separated model variants")] = "gpt,gpt-mla,gpt-moe,kimi",
    compile_: Annotated[bool, typer.Option("--compile/--no-compile", help="time torch.compile'd train steps")] = True,
    eager: Annotated[bool, typer.Option("--eager/--no-eager", help="time eager train steps (Muon rows: eager)")] = True,
    repeats: Annotated[int, typer.Option(help="timed train steps (median, IQR)")] = 30,
    warmup: Annotated[int, typer.Option(help="untimed calls before timing")] = 5,
    rounds: Annotated[int, typer.Option(help="interleaved timing rounds (every section but train)")] = 5,
    min_run_time: Annotated[float, typer.Option(help="seconds of calls per measurement per round")] = 0.1,
    sections: Annotated[str, typer.Option(help=f"comma-separated, of {','.join(SECTIONS)}")] = ",".join(SECTIONS),
    optimizers: Annotated[str, typer.Option(help="train-step optimizers (non-adamw run eager only)")] = "adamw,muon",
    micro_batch: Annotated[int | None, typer.Option(help="sequences per step (default: per preset)")] = None,
    decode_batches: Annotated[str, typer.Option(help="decode batch sizes")] = "1,32,128",
    prompt_len: Annotated[int | None, typer.Option(help="decode prompt (default block/2)")] = None,
    new_tokens: Annotated[int | None, typer.Option(help="decode steps per timed call (default 32)")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="override the vocabulary (default: preset's or 50304)")] = None,
    peak_tflops: Annotated[float | None, typer.Option(help="MFU denominator (default: datasheet peak)")] = None,
    profile: Annotated[
        bool, typer.Option("--profile/--no-profile", help="top kernels (torch.profiler) of targets missed by >20%")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="record (default reports/benchmarks/<date>-<device>.md)")] = None,
    append: Annotated[bool, typer.Option("--append/--no-append", help="add to the record at --out")] = False,
    merge: Annotated[
        str | None,
        typer.Option(help="comma-separated .json of earlier runs: merge them into --out instead of measuring"),
    ] = None,
) -> None:
    """Benchmark suite: train-step tokens/s and MFU, MoE layer, MLA decode, Muon step, attention; writes a record."""
    if merge:
        if out is None:
            raise UserError("--merge: needs --out, the merged record's path")
        merge_records([Path(p) for p in _csv(merge)], out)
        return
    modes = [False] * eager + [True] * compile_
    run_suite(
        device,
        _csv(presets),
        _csv(variants),
        modes,
        out,
        sections=_csv(sections),
        optimizers=_csv(optimizers),
        timing=TimingSettings(repeats, warmup, rounds, min_run_time),
        micro_batch=micro_batch,
        decode_batches=_csv_ints("--decode-batches", decode_batches),
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        vocab_size=vocab_size,
        peak_tflops=peak_tflops,
        profile=profile,
        append=append,
    )


def main() -> None:
    """`python -m harness.measure.bench.suite ...`: bench_command with the CLI's one-line UserError handling."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(bench_command)
    try:
        app()
    except UserError as e:
        print(f"kimi-bench: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
