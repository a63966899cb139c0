"""Which change made the difference: the 2x2 decomposition of a variants x optimizers matrix.

The paper's headline pair (kimi+muon vs gpt+adamw) changes the architecture and the optimizer at once. With all
four arms of a 2x2 block (variant V vs base variant B, optimizer O vs base optimizer A; base: gpt and adamw), per
seed s (the four arms share the seed, so the data order):

    architecture effect at A:  x[V+A] - x[B+A]          optimizer effect at B:  x[B+O] - x[B+A]
    architecture effect at O:  x[V+O] - x[B+O]          optimizer effect at V:  x[V+O] - x[V+A]
    interaction:               (x[V+O] - x[B+O]) - (x[V+A] - x[B+A])   (difference of differences)
    both changes (headline):   x[V+O] - x[B+A]  =  architecture at A + optimizer at V

each with a 95% Student-t interval over the seeds all four arms finished. Val loss and bits per byte are
differences; compute to a target loss is a ratio (tokens A/B, the same formulas on log tokens: a multiplier, its
interval exp(t-interval of the mean log ratio); interaction 1 = none). The target is the worst of the four arms'
final val losses (every seed of every arm reaches it) unless the matrix sets one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports import names
from reports.stats import Estimate, estimate

BASE_VARIANT, BASE_OPTIMIZER = "gpt", "adamw"


@dataclass(frozen=True)
class Block:
    """The four arms of one 2x2: variant vs base variant, optimizer vs base optimizer."""

    variant: str
    base_variant: str
    optimizer: str
    base_optimizer: str

    def arm(self, variant_side: bool, optimizer_side: bool) -> str:
        return (
            f"{self.variant if variant_side else self.base_variant}+"
            f"{self.optimizer if optimizer_side else self.base_optimizer}"
        )

    @property
    def arms(self) -> list[str]:
        return [self.arm(v, o) for v in (False, True) for o in (False, True)]


def blocks(runs: pd.DataFrame) -> list[Block]:
    """Every 2x2 the finished runs hold, against the base variant (gpt, else the first) and the base optimizer
    (adamw, else the first)."""
    arms = set(runs.arm.dropna())
    variants = sorted(runs.variant.dropna().unique())
    optimizers = sorted(runs.optimizer.dropna().unique())
    if len(variants) < 2 or len(optimizers) < 2:
        return []
    bv = BASE_VARIANT if BASE_VARIANT in variants else variants[0]
    bo = BASE_OPTIMIZER if BASE_OPTIMIZER in optimizers else optimizers[0]
    out = []
    for v in variants:
        for o in optimizers:
            b = Block(v, bv, o, bo)
            if v != bv and o != bo and set(b.arms) <= arms:
                out.append(b)
    return out


# (label, the per-seed contrast as weights on x[V?+O?] keyed by (variant side, optimizer side))
CONTRASTS: list[tuple[str, dict[tuple[bool, bool], int]]] = [
    ("architecture {v} vs {bv}, at {bo}", {(True, False): 1, (False, False): -1}),
    ("architecture {v} vs {bv}, at {o}", {(True, True): 1, (False, True): -1}),
    ("optimizer {o} vs {bo}, at {bv}", {(False, True): 1, (False, False): -1}),
    ("optimizer {o} vs {bo}, at {v}", {(True, True): 1, (True, False): -1}),
    (
        "interaction (architecture effect at {o} - at {bo})",
        {(True, True): 1, (False, True): -1, (True, False): -1, (False, False): 1},
    ),
    ("both changes: {v}+{o} vs {bv}+{bo}", {(True, True): 1, (False, False): -1}),
]


def _label(text: str, b: Block) -> str:
    return text.format(v=b.variant, bv=b.base_variant, o=b.optimizer, bo=b.base_optimizer)


def per_seed(values: pd.DataFrame, b: Block) -> pd.DataFrame:
    """seed x arm table of the four arms (mean over duplicate runs), seeds where all four have a finite value."""
    v = values[values.arm.isin(b.arms)]
    table = v.pivot_table(index="seed", columns="arm", values="x", aggfunc="mean")
    table = table.reindex(columns=b.arms)
    return table[np.isfinite(table).all(axis=1)]


def contrast(table: pd.DataFrame, b: Block, weights: dict[tuple[bool, bool], int], log: bool = False) -> Estimate:
    """The contrast per seed, and its mean with a 95% t-interval; log=True: on log values, returned as a ratio."""
    x = np.log(table) if log else table
    d = sum(w * x[b.arm(*side)] for side, w in weights.items())
    e = estimate(d.to_numpy(float))
    if not log:
        return e
    return Estimate(e.n, _exp(e.mean), e.std, _exp(e.low), _exp(e.high))


def _exp(v: float) -> float:
    return math.exp(v) if math.isfinite(v) else math.nan


def metric_values(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    if metric not in runs:
        return pd.DataFrame(columns=["arm", "seed", "x"])
    return runs[["arm", "seed", metric]].rename(columns={metric: "x"}).dropna()


def compute_values(
    curves: pd.DataFrame, b: Block, target: float | None, axis: str = "tokens"
) -> tuple[pd.DataFrame, float]:
    """(arm, seed, x = tokens to reach the target) of the block's runs, and the target."""
    from reports.compute import reach

    cur = curves[curves.arm.isin(b.arms)]
    if target is None or (isinstance(target, float) and math.isnan(target)):
        last = cur.sort_values("step").groupby("run_id").loss.last()
        target = float(last.max()) if len(last) else math.nan
    rows = []
    for (_rid, arm, seed), g in cur.groupby(["run_id", "arm", "seed"], sort=True):
        g = g.sort_values("step")
        rows.append((arm, seed, reach(g[axis].to_numpy(), g.loss.to_numpy(), target)))
    return pd.DataFrame(rows, columns=["arm", "seed", "x"]), target


def decomposition(runs: pd.DataFrame, curves: pd.DataFrame, b: Block, target: float | None = None) -> list[dict]:
    """One dict per contrast: label, val loss / bpb differences, tokens multiplier (Estimates), seeds."""
    loss = per_seed(metric_values(runs, names.VAL_LOSS_FINAL), b)
    bpb = per_seed(metric_values(runs, names.VAL_BPB), b)
    tok_values, tgt = compute_values(curves, b, target)
    tokens = per_seed(tok_values, b)
    tokens = tokens[(tokens > 0).all(axis=1)]
    out = []
    for text, weights in CONTRASTS:
        out.append(
            {
                "effect": _label(text, b),
                "val_loss": contrast(loss, b, weights),
                "bpb": contrast(bpb, b, weights),
                "tokens": contrast(tokens, b, weights, log=True),
                "target": tgt,
            }
        )
    return out


def section(runs: pd.DataFrame, curves: pd.DataFrame, target: float | None = None) -> str | None:
    """The decomposition table(s) of the finished runs; None when the matrix is not a variants x optimizers 2x2."""
    from harness.mdformat import fmt, fmt_ci, md_table

    bs = blocks(runs)
    if not bs:
        return None
    parts = []
    for b in bs:
        rows = decomposition(runs, curves, b, target)
        table = [
            [
                r["effect"],
                fmt_ci(r["val_loss"], sign=True),
                fmt_ci(r["bpb"], sign=True),
                f"×{fmt_ci(r['tokens'])}",
                max(r["val_loss"].n, r["tokens"].n),
            ]
            for r in rows
        ]
        parts.append(
            f"Arms {', '.join(b.arms)}; tokens to the target val loss {fmt(rows[0]['target'])}:\n\n"
            + md_table(
                ["effect", "val loss Δ [95% CI]", "bits/byte Δ [95% CI]", "tokens to target × [95% CI]", "seeds"], table
            )
        )
    parts.append(
        "Each effect per seed over the seeds all four arms finished (paired: same seed, same data order), mean and "
        "95% Student-t interval; Δ < 0 and × < 1 favour the first-named side (the variant, or the optimizer). "
        "Architecture effect: the variant against the base variant at one optimizer; optimizer effect: the optimizer "
        "against the base optimizer at one variant; interaction: how much the architecture effect changes with the "
        "optimizer (difference of differences; tokens: ratio of ratios, 1 = none). Both changes = architecture at "
        "the base optimizer + optimizer at the variant. These effects carry the arms' tuning status (see Tuning "
        "budget): an optimizer effect between untuned arms is provisional."
    )
    return "\n\n".join(parts)
