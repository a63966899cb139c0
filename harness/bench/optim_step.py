"""Optimizer-step microbenchmark: median time of one Muon step vs one AdamW step, and Muon's split.

    python -m harness.bench.optim_step [--models kimi,gpt --repeats 5 --warmup 1 --device cpu]

Models: the nanoKimi paper's Kimi (arch.kimi.NANOKIMI_PAPER: 6 layers, dim 384, 8 experts of 384x512,
vocab 50257, untied head; ~75M parameters) and a dense GPT of about the same total size (5 layers,
n_embd 768, 12 heads, vocab 50257, tied head; ~75M). Each parameter gets a fixed random gradient; only
`optimizer.step()` is timed (no forward/backward), after warm-up steps that create the optimizer state.

Rows: one per (model, optimizer) with the step time, and for the Muon arm the time of its Muon groups
alone and of its AdamW groups alone (the same groups, stepped by two separate optimizers), so the
share of the step spent orthogonalizing is visible, and the Newton-Schulz GFLOP per step (exact count,
independent of timing noise) with the rate achieved. Newton-Schulz runs in fp32 on CPU, bf16 on CUDA.
A script that prints numbers, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from arch.muon import Muon
from arch.optimizers import OptimizerConfig


def build_model(name: str) -> nn.Module:
    if name == "kimi":
        from arch.kimi import NANOKIMI_PAPER, Kimi

        return Kimi(NANOKIMI_PAPER)
    if name == "gpt":
        from arch.gpt import GPT, GPTConfig

        return GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=5, n_head=12, n_embd=768))
    raise SystemExit(f"--models: unknown {name!r}; use kimi, gpt")


def fill_grads(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.device, p.dtype)


def time_ms(fn: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> float:
    """Median wall time of fn in ms, synchronized on CUDA."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def split_muon(opt: Muon) -> tuple[Muon, Muon]:
    """Two optimizers over the same groups (all keys already filled): Muon groups only, AdamW only."""
    def sub(use_muon: bool) -> Muon:
        return Muon([dict(g) for g in opt.param_groups if g["use_muon"] == use_muon])

    return sub(True), sub(False)


def ns_gflop(opt: Muon) -> float:
    """Newton-Schulz GFLOP of one step: per [m, n] matrix (m <= n after the transpose) and NS step,
    X X^T costs 2m^2 n, A A costs 2m^3 and B X costs 2m^2 n (the elementwise terms are negligible)."""
    total = 0.0
    for g in opt.param_groups:
        if not g["use_muon"]:
            continue
        for p in g["params"]:
            rows, cols = p.shape[-2] // g["split"], p.shape[-1]
            n_mat = (p.shape[0] if p.ndim == 3 else 1) * g["split"]
            m, n = min(rows, cols), max(rows, cols)
            total += n_mat * g["ns_steps"] * (4 * m * m * n + 2 * m**3)
    return total / 1e9


def n_params(opt: torch.optim.Optimizer, use_muon: bool | None) -> int:
    return sum(p.numel() for g in opt.param_groups if use_muon is None or g.get("use_muon") == use_muon
               for p in g["params"])


def bench(model_name: str, device: torch.device, warmup: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    fill_grads(model)
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for opt_name in ("adamw", "muon"):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opt = OptimizerConfig(name=opt_name, lr=1e-3).build(model)
        row = {"model": model_name, "optimizer": opt_name, "params": total,
               "step_ms": time_ms(opt.step, warmup, repeats, device)}
        if opt_name == "muon":
            muon_part, adamw_part = split_muon(opt)
            row["muon_params"], row["adamw_params"] = n_params(opt, True), n_params(opt, False)
            row["ns_gflop"] = ns_gflop(opt)
            row["muon_ms"] = time_ms(muon_part.step, warmup, repeats, device)
            row["adamw_ms"] = time_ms(adamw_part.step, warmup, repeats, device)
        rows.append(row)
        model.load_state_dict(state)  # the next arm starts from the same weights
    return rows


def print_table(rows: list[dict], device: torch.device, threads: int) -> None:
    table = Table(title=f"optimizer.step() on {device.type} ({threads} threads), median ms")
    for col in ("model", "params", "optimizer", "step ms", "vs adamw", "Muon groups (params, ms)",
                "AdamW groups (params, ms)", "Muon share", "NS GFLOP (GFLOP/s)"):
        table.add_column(col, justify="left" if col in ("model", "optimizer") else "right")
    adamw_ms = {r["model"]: r["step_ms"] for r in rows if r["optimizer"] == "adamw"}
    for r in rows:
        muon = r["optimizer"] == "muon"
        cells = [r["model"], f"{r['params'] / 1e6:.1f}M", r["optimizer"], f"{r['step_ms']:.1f}",
                 f"{r['step_ms'] / adamw_ms[r['model']]:.2f}x"]
        if muon:
            share = r["muon_ms"] / (r["muon_ms"] + r["adamw_ms"])
            cells += [f"{r['muon_params'] / 1e6:.1f}M, {r['muon_ms']:.1f}",
                      f"{r['adamw_params'] / 1e6:.1f}M, {r['adamw_ms']:.1f}", f"{share:.0%}",
                      f"{r['ns_gflop']:.0f} ({r['ns_gflop'] / r['muon_ms'] * 1e3:.0f})"]
        else:
            cells += ["", "", "", ""]
        table.add_row(*cells)
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="kimi,gpt")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [r for name in args.models.split(",")
            for r in bench(name.strip(), device, args.warmup, args.repeats)]
    print_table(rows, device, torch.get_num_threads())


if __name__ == "__main__":
    main()
