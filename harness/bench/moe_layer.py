"""MoE layer microbenchmark: median forward+backward time of the sparse MoE against its dense baselines.

    python -m harness.bench.moe_layer [--dim 384 --experts 8 --top-k 2 --inter 512 --tokens ...]

Rows (same router and expert weights where they apply):
  moe/<dispatch>   the sparse MoE of arch/moe.py, once per dispatch this device/dtype supports
  dense-active     one SwiGLU with the MoE's ACTIVE width: hidden = top_k*inter + n_shared*inter
  all-experts      every expert on every token, weighted by the (mostly zero) gate, as nanoKimi did
Defaults follow the nanoKimi paper's layer sizes (n_embd 384, 8 experts top-2, expert width 512).
A script that prints numbers, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from arch.common import SwiGLU, init_normal_
from arch.moe import MoE, MoEConfig, grouped_mm_supported


class AllExpertsMoE(nn.Module):
    """nanoKimi-style dispatch: run all E experts on all N tokens, multiply by a dense [N, E] gate matrix
    that is zero outside each token's top-k. Same math as MoE (shares its modules), E/k times the FLOPs."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, indices, _ = self.moe.gate(flat)
        gates = torch.zeros(flat.size(0), self.moe.n_experts, dtype=flat.dtype, device=flat.device)
        gates = gates.scatter(1, indices, weights)
        ex = self.moe.experts
        h = F.silu(torch.einsum("nd,eid->eni", flat, ex.w1)) * torch.einsum("nd,eid->eni", flat, ex.w3)
        y = torch.einsum("eni,edi->end", h, ex.w2)
        out = torch.einsum("ne,end->nd", gates, y)
        if self.moe.shared is not None:
            out = out + self.moe.shared(flat)
        return out.view(B, T, D)


def time_round_robin(fns: list[Callable[[], None]], warmup: int, repeats: int) -> list[list[float]]:
    """Milliseconds per call, one list per fn. Rounds visit every fn once, so slow phases of a shared
    machine hit all variants alike instead of whichever happened to be running."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for p in module.parameters():
            p.grad = None
        module(x).float().square().mean().backward()
    return run


def fwd_only(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(x)
    return run


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--inter", type=int, default=512, help="routed expert width (moe_inter_dim)")
    ap.add_argument("--shared", type=int, default=1, help="shared experts (width shared*inter; 0 = none)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--score-func", choices=["sigmoid", "softmax"], default="sigmoid")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    device = torch.device("cpu")

    x = torch.randn(args.batch, args.seq, args.dim, dtype=dtype, device=device)
    cfg = dict(dim=args.dim, n_routed_experts=args.experts, n_activated_experts=args.top_k,
               moe_inter_dim=args.inter, n_shared_experts=args.shared, score_func=args.score_func)
    dispatches = ["loop"] + (["grouped_mm"] if grouped_mm_supported(x, args.dim, args.inter) else [])
    rows: list[tuple[str, nn.Module, int]] = []
    for d in dispatches:
        moe = MoE(MoEConfig(**cfg, dispatch=d)).to(device, dtype)
        routed_active = 3 * args.top_k * args.inter * args.dim  # k experts' w1, w3, w2 per token
        active = n_params(moe.gate) + n_params(moe.shared or nn.Module()) + routed_active
        rows.append((f"moe/{d}", moe, active))
    hidden = (args.top_k + args.shared) * args.inter
    dense = init_normal_(SwiGLU(args.dim, hidden)).to(device, dtype)
    rows.append((f"dense-active (hidden {hidden})", dense, n_params(dense)))
    all_exp = AllExpertsMoE(MoE(MoEConfig(**cfg, dispatch="loop")).to(device, dtype))
    rows.append(("all-experts (nanoKimi)", all_exp, n_params(all_exp)))

    tokens = args.batch * args.seq
    fb = time_round_robin([fwd_bwd(m, x) for _, m, _ in rows], args.warmup, args.repeats)
    fo = time_round_robin([fwd_only(m, x) for _, m, _ in rows], args.warmup, args.repeats)
    dense_i = next(i for i, r in enumerate(rows) if r[0].startswith("dense"))
    dense_fb = statistics.median(fb[dense_i])

    table = Table(title=(f"MoE layer, {tokens} tokens (B={args.batch}, T={args.seq}), dim {args.dim}, "
                         f"{args.experts} experts top-{args.top_k}, inter {args.inter}, "
                         f"shared {args.shared}, {args.dtype}, {args.score_func}"))
    for col in ("variant", "params", "active/token", "fwd ms", "fwd+bwd ms", "fwd+bwd min ms",
                "tokens/s", "vs dense"):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    for i, (name, module, active) in enumerate(rows):
        med = statistics.median(fb[i])
        table.add_row(name, f"{n_params(module):,}", f"{active:,}", f"{statistics.median(fo[i]):.1f}",
                      f"{med:.1f}", f"{min(fb[i]):.1f}", f"{tokens / med * 1e3:,.0f}",
                      f"{med / dense_fb:.2f}x")
    console = Console(width=max(Console().width, 130))
    console.print(table)
    console.print(f"medians over {args.repeats} timed rounds after {args.warmup} warm-up (variants "
                  f"interleaved); "
                  f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; tokens/s = fwd+bwd; "
                  f"grouped_mm {'available' if 'grouped_mm' in dispatches else 'not available'} "
                  f"for {args.dtype}.")

if __name__ == "__main__":
    main()
