"""Preflight of the prepared GPU runs: in their first seconds, one bf16 train step and one cached decode step
per arm on the device the run uses, so a broken path (bf16 autocast, fused AdamW, Muon's Newton-Schulz, the MoE
dispatch, the bf16 decode cache) stops the run in seconds instead of failing after minutes of timed work.

    python -m harness.measure.preflight --device cuda \
        --arms gpt@gpt2-124m:adamw,kimi@paper:muon,gpt-mla@paper:adamw

It also says which MoE dispatch ran: torch builds without `F.grouped_mm` (the H200 image's 2.11 may be one)
send arch/moe.py to its loop over experts, which reads the token counts back to the host in every layer, so
kimi's speed rows would measure the loop. The dispatch is reported, not failed: the run still measures.

Always bf16 autocast, on CPU too (CPU autocast: the dtype the GPU run trains in, on the CPU's kernels; the
rehearsals themselves train in float32). Each check prints one line; a failure prints its traceback, the other
arms still run (one call shows every failure), and the last line names every failed check (exit 1).
harness/measure/paper_h200.py builds its arms from the matrix's trials (the trial loop's Trainer) and runs
them through the same `run_preflight`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from arch.moe import moe_modules
from harness.errors import UserError
from harness.measure.bench.kit import check_choices, free_memory, micro_batch_for, preset_dims
from harness.measure.bench.timing import synchronize
from harness.measure.inference import InferenceShape, random_prompt, serving_copy
from harness.spec.registry import PRESETS, VARIANTS, build_model, resolve_optimizer

AMP = torch.bfloat16
OPTIMIZERS = ("adamw", "muon", "muonclip")


@dataclass
class Arm:
    """One arm to check: its model (fp32 master weights, on the device) and a callable taking one optimizer
    step the way the run takes it, returning the (device) loss."""

    label: str
    model: nn.Module
    train_step: Callable[[], torch.Tensor]
    vocab_size: int
    block_size: int
    decode_batch: int = 1


class CheckFailed(Exception):
    """A check's own verdict (a non-finite loss or logits), as opposed to an exception the code raised."""


def grouped_mm_line() -> str:
    has = hasattr(F, "grouped_mm")
    return f"torch {torch.__version__}: F.grouped_mm {'present' if has else 'MISSING'}" + (
        "" if has else " (the MoE takes its loop over experts: one host sync per MoE layer)"
    )


def _moe_dispatch(model: nn.Module) -> str | None:
    moes = moe_modules(model)
    return moes[0].last_dispatch if moes else None


def decode_step(model: nn.Module, amp: torch.dtype | None, vocab_size: int, block_size: int, batch: int) -> str | None:
    """The trial's decode path (harness.measure.inference: a bf16 serving copy on CUDA, autocast on CPU): prefill one
    block's prompt, then one cached step; returns the MoE dispatch the step took."""
    device = next(model.parameters()).device
    served, amp = serving_copy(model, amp)
    served.eval()
    shape = InferenceShape.for_block(block_size, 1)
    prompt = random_prompt(vocab_size, batch, shape.prompt_len, device, seed=0)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        cache = served.make_cache(batch, shape.prompt_len + shape.new_tokens)
        served(prompt, cache=cache)
        logits, _ = served(prompt[:, -1:], cache=cache)
    if not torch.isfinite(logits).all():
        raise CheckFailed("non-finite logits")
    return _moe_dispatch(served)


def _check(label: str, what: str, fn: Callable[[], str], device: torch.device, failures: list[str]) -> bool:
    """fn() under a stopwatch: one ok line (with fn's note), or a traceback, one FAILED line and a failure."""
    t0 = time.perf_counter()
    try:
        note = fn()
        synchronize(device)
    except Exception as e:  # every arm is checked: one call shows every failure
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if not isinstance(e, CheckFailed):
            traceback.print_exc(file=sys.stdout)
        failures.append(f"{label} {what} ({type(e).__name__}: {first})")
        print(f"preflight {label}: {what} FAILED: {type(e).__name__}: {first}", flush=True)
        return False
    print(f"preflight {label}: {what} ok ({time.perf_counter() - t0:.2f} s{note})", flush=True)
    return True


def _check_arm(
    label: str, build: Callable[[], Arm], device: torch.device, failures: list[str], dispatches: set[str]
) -> None:
    built: list[Arm] = []

    def build_arm() -> str:
        built.append(build())
        return ""

    def train() -> str:
        loss = built[0].train_step().item()
        if not math.isfinite(loss):
            raise CheckFailed(f"non-finite loss {loss}")
        d = _moe_dispatch(built[0].model)
        dispatches.update([d] if d else [])
        return f", loss {loss:.3f}" + (f", MoE dispatch {d}" if d else "")

    def decode() -> str:
        arm = built[0]
        d = decode_step(arm.model, AMP, arm.vocab_size, arm.block_size, arm.decode_batch)
        dispatches.update([d] if d else [])
        return f", batch {arm.decode_batch}" + (f", MoE dispatch {d}" if d else "")

    if _check(label, "build", build_arm, device, failures):
        _check(label, "train step", train, device, failures)  # a failed step still leaves the decode to check
        _check(label, "decode step", decode, device, failures)


def run_preflight(arms: Sequence[tuple[str, Callable[[], Arm]]], device: torch.device) -> int:
    """Build each arm in turn, take one train step and one decode step; 0 when all passed, else 1."""
    t0 = time.perf_counter()
    where = "CUDA autocast" if device.type == "cuda" else "CPU autocast (the rehearsal itself trains in float32)"
    print(f"preflight: {len(arms)} arms on {device}, bf16 {where}; {grouped_mm_line()}", flush=True)
    failures: list[str] = []
    dispatches: set[str] = set()
    for label, build in arms:
        free_memory(device)  # the previous arm's model is gone with _check_arm's frame
        _check_arm(label, build, device, failures, dispatches)
    free_memory(device)
    if dispatches:
        slow = " (the host-syncing loop: kimi's speed rows measure it, not grouped_mm)" if "loop" in dispatches else ""
        print(f"preflight: MoE dispatch: {', '.join(sorted(dispatches))}{slow}", flush=True)
    took = time.perf_counter() - t0
    if failures:
        print(
            f"preflight FAILED on {device} after {took:.1f} s, {len(failures)} check(s): {'; '.join(failures)}",
            flush=True,
        )
        return 1
    print(
        f"preflight ok: {len(arms)} arms, a bf16 train step and a decode step each, on {device} in {took:.1f} s",
        flush=True,
    )
    return 0


# ------------------------------------------------------------------ the bench's arms (gpu-run.sh)
def parse_arms(text: str) -> list[tuple[str, str, str]]:
    """`variant@preset:optimizer,...` -> [(variant, preset, optimizer)], each checked, duplicates dropped."""
    arms: list[tuple[str, str, str]] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        variant, at, rest = item.partition("@")
        preset, colon, optimizer = rest.partition(":")
        if not (at and colon):
            raise UserError(f"--arms: {item!r} is not variant@preset:optimizer (e.g. kimi@paper:muon)")
        check_choices("--arms variant", [variant], tuple(VARIANTS))
        check_choices("--arms preset", [preset], tuple(PRESETS))
        check_choices("--arms optimizer", [optimizer], OPTIMIZERS)
        if (variant, preset, optimizer) not in arms:
            arms.append((variant, preset, optimizer))
    if not arms:
        raise UserError("--arms: empty; give at least one variant@preset:optimizer")
    return arms


def bench_arm(
    variant: str,
    preset: str,
    optimizer: str,
    device: torch.device,
    vocab_size: int | None,
    micro_batch: int | None,
    decode_batch: int,
) -> Arm:
    """The bench's train step (harness/measure/bench/train_step.py: forward + MoE aux loss, backward, clip 1.0, step,
    zero_grad, MoE bias update) on one random micro-batch of the bench's size."""
    dims = preset_dims(preset, vocab_size)
    torch.manual_seed(0)
    model = build_model(variant, dims).to(device).train()
    opt = resolve_optimizer(optimizer).build(model)
    B, T = micro_batch_for(preset, micro_batch), dims.block_size
    x, y = (torch.randint(0, dims.vocab_size, (B, T), device=device) for _ in range(2))

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=AMP):
            _, loss = model(x, y)
            total = loss + model.aux_loss
        total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for m in moe_modules(model):
            m.update_bias()
        return loss.detach()

    return Arm(f"{variant}@{preset}:{optimizer}", model, step, dims.vocab_size, T, decode_batch)


def resolve_device(name: str) -> torch.device:
    if name not in ("cuda", "cpu"):
        raise UserError(f"--device: {name!r}; use cuda or cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: cuda is not available here (no GPU, or torch without CUDA); use --device cpu")
    return torch.device(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arms", required=True, help="comma-separated variant@preset:optimizer")
    parser.add_argument("--vocab-size", type=int, help="vocabulary of every arm (default: the preset's)")
    parser.add_argument("--micro-batch", type=int, help="train-step sequences (default: the bench's per preset)")
    parser.add_argument("--decode-batch", type=int, default=32, help="decode-step batch (the decode target's)")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        specs = parse_arms(args.arms)
    except UserError as e:
        print(f"preflight: error: {e}", file=sys.stderr)
        sys.exit(2)
    arms = [
        (
            f"{v}@{p}:{o}",
            lambda v=v, p=p, o=o: bench_arm(v, p, o, device, args.vocab_size, args.micro_batch, args.decode_batch),
        )
        for v, p, o in specs
    ]
    sys.exit(run_preflight(arms, device))


if __name__ == "__main__":
    main()
