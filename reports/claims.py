"""The claims table: each of the nanoKimi paper's claims judged on the kind of evidence it needs.

- statistical claims (losses, gradient stability): paired over seeds, 95% CI, Holm-corrected across rows;
- exact facts (parameter counts, checkpoint bytes, KV bytes per token, FLOPs per token): no interval, the verdict
  compares the values with the claim's own rounding; "same parameters" only for a matched matrix;
- speed claims: the controlled speed runs (median, IQR, n), never trial-side single shots;
- compute to a target loss: the multiplier A/B with a CI over seeds (and, with 3+ sizes, read off fitted curves).
Arms that computed the same thing (muonclip whose QK-Clip never fired) are folded into one row with a note.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from reports import names
from reports.stats import (
    EQUIVALENCE_MARGIN,
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    estimate,
    exact_verdict,
    holm,
    holm_verdict,
    paired_differences,
    paired_p_value,
)

NOT_MEASURED = "not measured"
NOT_MATCHED = "not matched"
IN_WORDS = "(in words)"
OTHER_TOKENIZER = " (GPT-2 BPE tokens on other data: not comparable)"


# ----------------------------------------------------------------------------- pairs of arms

def arm_of(runs: pd.DataFrame, variant: str, optimizer: str) -> str | None:
    arms = runs.loc[runs.variant.eq(variant) & runs.optimizer.eq(optimizer), "arm"].dropna().unique()
    return sorted(arms)[0] if len(arms) else None


def headline_pair(runs: pd.DataFrame) -> tuple[str | None, str | None]:
    """The paper's table pair: Kimi (muon, else muonclip) vs GPT with AdamW."""
    kimi = arm_of(runs, "kimi", "muon") or arm_of(runs, "kimi", "muonclip")
    return kimi, arm_of(runs, "gpt", "adamw")


def same_optimizer_pairs(runs: pd.DataFrame, a_variant: str = "kimi", b_variant: str = "gpt") -> list:
    out = []
    for opt in sorted(runs.optimizer.dropna().unique()):
        a, b = arm_of(runs, a_variant, opt), arm_of(runs, b_variant, opt)
        if a and b:
            out.append((a, b))
    return out


def optimizer_pairs(runs: pd.DataFrame, a_opt: str, b_opt: str = "adamw") -> list:
    out = []
    for var in sorted(runs.variant.dropna().unique()):
        a, b = arm_of(runs, var, a_opt), arm_of(runs, var, b_opt)
        if a and b:
            out.append((a, b))
    return out


def _headline(runs):
    return [headline_pair(runs)]


def _headline_and_same_opt(runs):
    return list(dict.fromkeys(_headline(runs) + same_optimizer_pairs(runs)))


def _muon_vs_adamw(runs):
    return optimizer_pairs(runs, "muon") + optimizer_pairs(runs, "muonclip")


HEADLINE_NEEDS = "kimi+muon (or kimi+muonclip) and gpt+adamw"
OPT_NEEDS = "one variant trained with both muon (or muonclip) and adamw"


@dataclass(frozen=True)
class Claim:
    text: str
    paper: str                      # the paper's numbers "Kimi vs GPT", or "(in words)"
    kind: str                       # "stat" | "exact" | "speed" | "compute"
    metric: str                     # stat/exact: a trial metric; speed: a speed metric (may hold {optimizer});
    direction: int                  # compute: the axis (tokens, flops, seconds). +1: A higher, -1: lower, 0: equal
    scale: float
    pairs: Callable[[pd.DataFrame], list[tuple[str | None, str | None]]]
    needs: str
    digits: int | None = None       # exact claims: the paper's rounding (significant digits)
    fallback: tuple[str, ...] = field(default_factory=tuple)   # exact: older metric names to read instead


CLAIMS: list[Claim] = [
    Claim("Kimi infers faster (decode tokens/s, batch 1)", "45.2 vs 30.3", "speed", names.speed_decode(1), +1,
          1.0, _headline, HEADLINE_NEEDS),
    Claim("Kimi has lower perplexity (val ppl; bits/byte beside it)", "18.1 vs 22.8" + OTHER_TOKENIZER, "stat",
          names.VAL_PPL_FINAL, -1, 1.0, _headline, HEADLINE_NEEDS),
    Claim("Same total parameters (M)", "75 vs 74", "exact", names.PARAMS_TOTAL, 0, 1e6, _headline,
          HEADLINE_NEEDS, digits=2),
    Claim("Kimi is smaller on disk (checkpoint MB)", "580 vs 620 (0.58 vs 0.62 GB)", "exact", names.CKPT_BYTES,
          -1, 1e6, _headline, HEADLINE_NEEDS, digits=2),
    Claim("Kimi activates fewer parameters per token (M)", IN_WORDS, "exact", names.PARAMS_ACTIVE, -1, 1e6,
          _headline, HEADLINE_NEEDS),
    Claim("Kimi needs fewer FLOPs per token (MFLOP)", IN_WORDS, "exact", names.FLOPS_PER_TOKEN, -1, 1e6,
          _headline, HEADLINE_NEEDS),
    Claim("Kimi caches fewer KV bytes per token", IN_WORDS, "exact", names.SPEED_KV_BYTES, -1, 1.0, _headline,
          HEADLINE_NEEDS, fallback=(names.INFER_KV_BYTES,)),
    Claim("Muon reaches lower loss than AdamW (val loss)", IN_WORDS, "stat", names.VAL_LOSS_FINAL, -1, 1.0,
          _muon_vs_adamw, OPT_NEEDS),
    Claim("Muon converges faster (tokens to the target val loss, A/B)", IN_WORDS, "compute", "tokens", -1, 1.0,
          _muon_vs_adamw, OPT_NEEDS),
    Claim("Muon gives more stable gradients (grad-norm CV)", IN_WORDS, "stat", names.GRAD_NORM_CV, -1, 1.0,
          _muon_vs_adamw, OPT_NEEDS),
    Claim("Muon gives more stable gradients (grad-norm p99/median)", IN_WORDS, "stat",
          names.GRAD_NORM_P99_OVER_MEDIAN, -1, 1.0, _muon_vs_adamw, OPT_NEEDS),
    Claim("Kimi infers faster at larger batch (decode tokens/s, largest batch)", IN_WORDS, "speed",
          "decode:max", +1, 1.0, _headline, HEADLINE_NEEDS),
    Claim("Kimi trains faster (controlled train step, tokens/s)", IN_WORDS, "speed",
          names.speed_opt("{optimizer}", "train_tokens_per_s"), +1, 1.0, _headline_and_same_opt, HEADLINE_NEEDS),
    Claim("Kimi is more compute-efficient (FLOPs to the target val loss, A/B)", IN_WORDS, "compute", "flops", -1,
          1.0, _headline_and_same_opt, HEADLINE_NEEDS),
]


# ----------------------------------------------------------------------------- folding identical arms

def identical_arms(curves: pd.DataFrame) -> dict[str, str]:
    """{folded arm: the arm it equals}: a muonclip arm whose val-loss curve equals its variant's muon arm at every
    eval of every shared seed (QK-Clip never fired, so they computed the same thing)."""
    out = {}
    if curves.empty:
        return out
    for arm in sorted(curves.arm.dropna().unique()):
        if not arm.endswith("+muonclip"):
            continue
        twin = arm.removesuffix("+muonclip") + "+muon"
        a, b = curves[curves.arm.eq(arm)], curves[curves.arm.eq(twin)]
        if a.empty or b.empty:
            continue
        m = a.merge(b, on=["seed", "step"], suffixes=("_a", "_b"))
        if len(m) and len(m) == len(a) == len(b) and np.allclose(m.loss_a, m.loss_b, rtol=1e-12, atol=0):
            out[arm] = twin
    return out


# ----------------------------------------------------------------------------- rows

@dataclass
class Row:
    claim: Claim
    label: str
    a: str
    b: str
    a_text: str
    b_text: str
    diff_text: str
    p: float = math.nan              # raw p-value (stat / compute rows); NaN: no p-value
    verdict: str = INCONCLUSIVE
    decide: Callable[[float], str] | None = None   # verdict from the Holm-adjusted p
    p_adj: float = math.nan
    tuning: str = ""                 # the pair's tuning status (reports/fairness.py); "" on exact / speed rows


@dataclass
class Context:
    """What the claims need from one block of runs."""
    runs: pd.DataFrame                 # finished trials of the block (one preset)
    curves: pd.DataFrame               # compute.eval_curves of those runs
    speed_rows: pd.DataFrame           # speed.speed_rows_for(...)
    match: tuple[str, float] | None    # (by, tolerance) of a matched matrix, else None
    folded: dict[str, str]
    target: float | None = None        # matrix-set target loss


def _fmt(x, scale=1.0):
    from reports.markdown import fmt
    return fmt(x, scale)


def _rel(a: float, b: float) -> str:
    return f"{100 * (a - b) / abs(b):+.1f}%" if b and math.isfinite(a) and math.isfinite(b) else "n/a"


def exact_value(runs: pd.DataFrame, arm: str, metric: str, fallback: tuple[str, ...] = (),
                speed_rows: pd.DataFrame | None = None) -> tuple[float, bool]:
    """The arm's value of a deterministic metric and whether all its seeds agree (they should)."""
    for m in (metric, *fallback):
        vals = runs.loc[runs.arm.eq(arm), m].dropna() if m in runs else pd.Series(dtype=float)
        if vals.empty and speed_rows is not None and len(speed_rows) and m in speed_rows:
            variant = runs.loc[runs.arm.eq(arm), "variant"]
            if len(variant):
                vals = speed_rows.loc[speed_rows.variant.eq(variant.iloc[0]), m].dropna()
        if len(vals):
            return float(vals.iloc[0]), bool((vals == vals.iloc[0]).all())
    return math.nan, True


def _exact_row(claim: Claim, ctx: Context, a: str, b: str, label: str) -> Row:
    metric = claim.metric
    if claim.direction == 0 and ctx.match is not None and ctx.match[0] == "active":
        metric = names.PARAMS_ACTIVE
    va, sa = exact_value(ctx.runs, a, metric, claim.fallback, ctx.speed_rows)
    vb, sb = exact_value(ctx.runs, b, metric, claim.fallback, ctx.speed_rows)
    note = "" if sa and sb else " (seeds disagree: first seed shown)"
    a_text, b_text = f"{a}: {_fmt(va, claim.scale)}", f"{b}: {_fmt(vb, claim.scale)}"
    if not (math.isfinite(va) and math.isfinite(vb)):
        return Row(claim, label, a, b, a_text, b_text, "exact, not logged", verdict=NOT_MEASURED)
    diff = f"exact: {_fmt(va - vb, claim.scale)} ({_rel(va, vb)}){note}"
    if claim.direction == 0:
        if ctx.match is None:
            return Row(claim, label, a, b, a_text, b_text, f"{diff}; the matrix is not matched", verdict=NOT_MATCHED)
        by, tol = ctx.match
        v = exact_verdict(va, vb, 0, tolerance=tol)
        return Row(claim, label, a, b, a_text, b_text, f"{diff}; matched on {by} params within ±{tol:.0%}",
                   verdict=v)
    v = exact_verdict(va, vb, claim.direction, digits=claim.digits)
    rounding = f" (compared at {claim.digits} significant digits)" if claim.digits else ""
    return Row(claim, label, a, b, a_text, b_text, diff + rounding, verdict=v)


def _stat_row(claim: Claim, ctx: Context, a: str, b: str, label: str) -> Row:
    fin = ctx.runs
    ea, eb = (estimate(fin.loc[fin.arm.eq(arm), claim.metric]) if claim.metric in fin else estimate([])
              for arm in (a, b))
    from reports.markdown import fmt_ci
    a_text, b_text = f"{a}: {fmt_ci(ea, claim.scale)}", f"{b}: {fmt_ci(eb, claim.scale)}"
    if claim.metric == names.VAL_PPL_FINAL and names.VAL_BPB in fin:
        ba, bb = (estimate(fin.loc[fin.arm.eq(arm), names.VAL_BPB]) for arm in (a, b))
        a_text += f"; bpb {fmt_ci(ba)}"
        b_text += f"; bpb {fmt_ci(bb)}"
    p = paired_differences(fin, claim.metric, a, b) if claim.metric in fin else None
    if p is None or p.n == 0:
        return Row(claim, label, a, b, a_text, b_text, "no paired seeds", verdict=INCONCLUSIVE)
    rel = f"{100 * p.diff.mean / abs(p.b_mean):+.1f}%" if p.b_mean else "n/a"
    diff = f"{fmt_ci(p.diff, claim.scale, sign=True)}, {rel}, {p.n} paired"
    margin = EQUIVALENCE_MARGIN * abs(p.b_mean) if math.isfinite(p.b_mean) else 0.0
    d = p.diff

    def decide(p_adj: float) -> str:
        return holm_verdict(d.mean, d.low, d.high, claim.direction, p_adj, d.n, margin)
    return Row(claim, label, a, b, a_text, b_text, diff, p=paired_p_value(p), decide=decide)


def _speed_metric(claim: Claim, ctx: Context, arm: str) -> str:
    if claim.metric == "decode:max":
        from reports.speed import decode_batches
        batches = [x for x in decode_batches(ctx.speed_rows) if x > 1] if len(ctx.speed_rows) else []
        return names.speed_decode(max(batches)) if batches else names.speed_decode(8)
    optimizer = ctx.runs.loc[ctx.runs.arm.eq(arm), "optimizer"]
    return claim.metric.replace("{optimizer}", optimizer.iloc[0] if len(optimizer) else "?")


def _speed_row(claim: Claim, ctx: Context, a: str, b: str, label: str) -> Row:
    from reports.speed import fmt_measured, measured, row_for, speed_verdict

    texts, ms = [], []
    for arm in (a, b):
        variant = ctx.runs.loc[ctx.runs.arm.eq(arm), "variant"]
        row = row_for(ctx.speed_rows, variant.iloc[0], None) if len(variant) else None
        metric = _speed_metric(claim, ctx, arm)
        m = measured(row, metric)
        ms.append(m)
        texts.append(f"{arm}: {fmt_measured(m, claim.scale)}")
    if ms[0].n == 0 or ms[1].n == 0:
        return Row(claim, label, a, b, *texts, "no controlled speed run (kb.kind=speed) for this shape",
                   verdict=NOT_MEASURED)
    diff = f"medians {_rel(ms[0].median, ms[1].median)} ({_speed_metric(claim, ctx, a).split('/')[-1]})"
    return Row(claim, label, a, b, *texts, diff, verdict=speed_verdict(ms[0], ms[1], claim.direction))


def _compute_row(claim: Claim, ctx: Context, a: str, b: str, label: str) -> Row:
    from reports.compute import to_target
    from reports.markdown import fmt_ci

    t = to_target(ctx.curves, a, b, claim.metric, ctx.target)
    med = t.per_seed.median(numeric_only=True) if len(t.per_seed) else pd.Series(dtype=float)
    a_text = f"{a}: {_fmt(med.get('a', math.nan))}"
    b_text = f"{b}: {_fmt(med.get('b', math.nan))}"
    if t.n == 0:
        return Row(claim, label, a, b, a_text, b_text, f"target {_fmt(t.target)}: not reached by both",
                   verdict=INCONCLUSIVE)
    diff = f"×{fmt_ci(t.multiplier)[0:]} over {t.n} seed(s), target val loss {_fmt(t.target)}"
    m = t.multiplier

    def decide(p_adj: float) -> str:
        if m.n < 2 or not math.isfinite(p_adj):
            return INCONCLUSIVE
        if math.isfinite(m.low) and m.low >= 1 - EQUIVALENCE_MARGIN and m.high <= 1 + EQUIVALENCE_MARGIN:
            return NOT_SUPPORTED
        if p_adj < 0.05:
            return SUPPORTED if claim.direction * (m.mean - 1) > 0 else NOT_SUPPORTED
        return INCONCLUSIVE
    return Row(claim, label, a, b, a_text, b_text, diff, p=t.p_value, decide=decide)


_BUILDERS = {"exact": _exact_row, "stat": _stat_row, "speed": _speed_row, "compute": _compute_row}


def claim_rows(ctx: Context, label: str = "") -> list[Row]:
    rows = []
    for claim in CLAIMS:
        pairs = [(a, b) for a, b in claim.pairs(ctx.runs) if a and b and a not in ctx.folded and b not in ctx.folded]
        if not pairs:
            row = Row(claim, label, "", "", NOT_MEASURED, NOT_MEASURED, f"{NOT_MEASURED} (needs {claim.needs})",
                      verdict=NOT_MEASURED)
            rows.append(row)
            continue
        for a, b in pairs:
            rows.append(_BUILDERS[claim.kind](claim, ctx, a, b, label))
    return rows


def apply_holm(rows: list[Row]) -> None:
    """Holm across every row with a p-value; the verdict of those rows comes from the adjusted p."""
    with_p = [r for r in rows if r.decide is not None]
    for r, adj in zip(with_p, holm([r.p for r in with_p]), strict=True):
        r.p_adj = adj
        r.verdict = r.decide(adj)


EDGE_SLACK = 1.5  # a fitted curve may reach the target up to 1.5x beyond the compute its runs span


def _extrapolated(points: pd.DataFrame, f) -> str:
    """The arm whose fitted curve reaches the target outside the compute its runs span ("" if none): a
    multiplier read there is an extrapolation of the fit, not a measurement, and gets no verdict. The default
    target is the worse arm's final loss at its largest size, so that arm meets it at the edge of its range:
    EDGE_SLACK allows the fit's noise there."""
    for arm, fit in ((f.a_arm, f.fit_a), (f.b_arm, f.fit_b)):
        c = points[points.arm.eq(arm)].compute
        need = fit.compute_for(f.target) if fit is not None else math.inf
        if not (c.min() / EDGE_SLACK <= need <= c.max() * EDGE_SLACK):
            return arm
    return ""


def fitted_rows(runs: pd.DataFrame, curves: pd.DataFrame, folded: dict[str, str]) -> list[Row]:
    """With three or more sizes: the FLOPs multiplier read off fitted loss-vs-compute curves, bootstrap CI."""
    from reports.compute import fitted_multiplier, scaling_points

    if runs.preset.nunique() < 3:
        return []
    points = scaling_points(curves, runs, "flops")
    rows = []
    for claim in CLAIMS:
        if claim.kind != "compute":
            continue
        for a, b in claim.pairs(runs):
            if not a or not b or a in folded or b in folded:
                continue
            f = fitted_multiplier(points, a, b)
            if not math.isfinite(f.multiplier):
                continue
            has_ci = not math.isnan(f.low)
            ci = f"[{_fmt(f.low)}, {_fmt(f.high)}]" if has_ci else "(no interval: one seed per size)"
            if f.n_unreached:
                ci += f" ({f.n_unreached} of {f.n_resamples} resamples: a refitted curve never reaches the target)"
            extrapolated = _extrapolated(points, f)
            v = INCONCLUSIVE                  # claimed: A/B < 1 (A needs less compute)
            if extrapolated:
                ci += f"; extrapolated: {extrapolated} reaches the target outside its measured compute range"
            elif has_ci and f.high < 1:
                v = SUPPORTED
            elif has_ci and f.low > 1:
                v = NOT_SUPPORTED
            rows.append(Row(claim, f"fit over {f.n_sizes} sizes", a, b, f"{a}: L = a C^-b + c",
                            f"{b}: L = a C^-b + c",
                            f"FLOPs ×{_fmt(f.multiplier)} {ci} at val loss {_fmt(f.target)} (bootstrap over seeds)",
                            verdict=v))
    return rows
