"""The claims table: each of the nanoKimi paper's claims judged on the kind of evidence it needs.

- statistical claims (losses, gradient stability): paired over seeds, a t-test and a TOST equivalence test per
  claim, Holm-corrected across the table (stats.VERDICT_RULE); a claim measured two ways is one claim;
- exact facts (parameter counts, checkpoint bytes, KV bytes per token, FLOPs per token): no interval, the unrounded
  relative gap against the claim's threshold (stats.EXACT_RULE); "same parameters" only for a matched matrix;
- speed claims: the controlled speed runs, judged on the paired ratio A/B over interleaved rounds (95% interval;
  reports/speed.py), never trial-side single shots;
- compute to a target loss fixed before the runs: the multiplier A/B over seeds (tokens, FLOPs and seconds in
  one row: one claim), last crossing, censored seeds; a fitted multiplier over 4+ sizes is exploratory.
Arms that computed the same thing (muonclip whose QK-Clip never fired) are folded into one row with a note.
`row_verdict(row)` is the one final verdict of a row (word + the rule branch that produced it).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.mdformat import fmt, fmt_ci
from reports import names
from reports.fitted import fitted_rows, fitted_text  # noqa: F401
from reports.paper_claims import (  # noqa: F401
    CLAIMS,
    HEADLINE_NEEDS,
    IN_WORDS,
    NOT_MATCHED,
    NOT_MEASURED,
    OPT_NEEDS,
    OTHER_TOKENIZER,
    Claim,
    Row,
    _headline,
    _headline_and_same_opt,
    _muon_vs_adamw,
    arm_of,
    headline_pair,
    optimizer_pairs,
    row_verdict,
    same_optimizer_pairs,
    set_verdict,
)
from reports.stats import (
    EXPLORATORY,
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    Margins,
    Verdict,
    decide,
    estimate,
    exact_verdict,
    holm,
    paired_differences,
    side_of,
    t_p_value,
    tost_p_value,
)

# ----------------------------------------------------------------------------- pairs of arms


# ----------------------------------------------------------------------------- folding identical arms


def identical_arms(curves: pd.DataFrame) -> dict[str, str]:
    """{folded arm: the arm it equals}: a muonclip arm whose val-loss curve equals its variant's muon arm at every
    eval both logged, on every seed both ran (QK-Clip never fired, so they computed the same thing). A seed only
    one of them ran (an extra seed) does not prevent the fold: the shared seeds decide (at least one)."""
    out = {}
    if curves.empty:
        return out
    for arm in sorted(curves.arm.dropna().unique()):
        if not arm.endswith("+muonclip"):
            continue
        twin = arm.removesuffix("+muonclip") + "+muon"
        a, b = curves[curves.arm.eq(arm)], curves[curves.arm.eq(twin)]
        shared = set(a.seed) & set(b.seed)
        if not shared:
            continue
        a, b = a[a.seed.isin(shared)], b[b.seed.isin(shared)]
        m = a.merge(b, on=["seed", "step"], suffixes=("_a", "_b"))
        if len(m) and len(m) == len(a) == len(b) and np.allclose(m.loss_a, m.loss_b, rtol=1e-12, atol=0):
            out[arm] = twin
    return out


# ----------------------------------------------------------------------------- rows


@dataclass
class Context:
    """What the claims need from one block of runs."""

    runs: pd.DataFrame  # finished trials of the block (one preset)
    curves: pd.DataFrame  # compute.eval_curves of those runs
    speed_rows: pd.DataFrame  # speed.speed_rows_for(...)
    match: tuple[str, float] | None  # (by, tolerance) of a matched matrix, else None
    folded: dict[str, str]
    target: float | None = None  # target val loss fixed before the runs (matrix [verdicts] target_loss)
    margins: Margins = field(default_factory=Margins)


def _rel(a: float, b: float) -> str:
    return f"{100 * (a - b) / abs(b):+.1f}%" if b and math.isfinite(a) and math.isfinite(b) else "n/a"


def exact_value(
    runs: pd.DataFrame, arm: str, metric: str, fallback: tuple[str, ...] = (), speed_rows: pd.DataFrame | None = None
) -> tuple[float, bool]:
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
    a_text, b_text = f"{a}: {fmt(va, claim.scale)}", f"{b}: {fmt(vb, claim.scale)}"
    if not (math.isfinite(va) and math.isfinite(vb)):
        return Row(claim, label, a, b, a_text, b_text, "exact, not logged", verdict=NOT_MEASURED)
    gap = f"{100 * (va - vb) / abs(vb):+.2f}%" if vb else "n/a"
    diff = f"exact: {fmt(va - vb, claim.scale)} ({gap}, unrounded){note}"
    if claim.direction == 0:
        if ctx.match is None:
            return Row(
                claim,
                label,
                a,
                b,
                a_text,
                b_text,
                f"{diff}; the matrix is not matched",
                verdict=NOT_MATCHED,
                why="no [match] section: equality is not judged",
            )
        by, tol = ctx.match
        row = Row(claim, label, a, b, a_text, b_text, f"{diff}; matched on {by} params within ±{tol:.0%}")
        set_verdict(row, exact_verdict(va, vb, 0, tol))
        return row
    row = Row(claim, label, a, b, a_text, b_text, f"{diff}; threshold ±{100 * claim.threshold:g}%")
    set_verdict(row, exact_verdict(va, vb, claim.direction, claim.threshold))
    return row


def _log_metric(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The runs with `metric` replaced by its log (non-positive values dropped: no log)."""
    v = pd.to_numeric(runs[metric], errors="coerce")
    return runs.assign(**{metric: np.log(v.where(v > 0))})


def _short(metric: str) -> str:
    return {names.GRAD_NORM_CV: "CV", names.GRAD_NORM_P99_OVER_MEDIAN: "p99/median"}.get(metric, metric)


def _stat_row(claim: Claim, ctx: Context, a: str, b: str, label: str) -> Row:

    fin = ctx.runs
    measures = (claim.metric, *claim.also)
    texts = []
    for arm in (a, b):
        parts = []
        for m in measures:
            e = estimate(fin.loc[fin.arm.eq(arm), m]) if m in fin else estimate([])
            parts.append((f"{_short(m)} " if claim.also else "") + fmt_ci(e, claim.scale))
        if claim.metric == names.VAL_PPL_FINAL and names.VAL_BPB in fin:
            parts.append(f"bpb {fmt_ci(estimate(fin.loc[fin.arm.eq(arm), names.VAL_BPB]))}")
        texts.append(f"{arm}: " + "; ".join(parts))
    log = claim.test == "log"
    margin = ctx.margins.loss_nats if claim.margin == "loss" else math.log1p(ctx.margins.ratio)
    margin_text = f"{ctx.margins.loss_nats:g} nats" if claim.margin == "loss" else f"{100 * ctx.margins.ratio:g}%"
    diffs, means, p_diff, p_eq, n = [], [], [], [], []
    for m in measures:
        if m not in fin:
            continue
        p = paired_differences(_log_metric(fin, m) if log else fin, m, a, b)
        if p.n == 0:
            continue
        d = p.pairs["diff"]
        means.append(p.diff.mean)
        p_diff.append(t_p_value(d))
        p_eq.append(tost_p_value(d, margin))
        n.append(p.n)
        if log:  # the tested quantity: the geometric-mean ratio A/B and its interval
            ratio = [math.exp(x) for x in (p.diff.mean, p.diff.low, p.diff.high)]
            ci = f"[{fmt(ratio[1])}, {fmt(ratio[2])}]" if p.n > 1 else "(n=1, no CI)"
            diffs.append(
                f"{(_short(m) + ' ') if claim.also else ''}×{fmt(ratio[0])} {ci} ({100 * (ratio[0] - 1):+.1f}%)"
            )
        else:
            rel = f"{100 * p.diff.mean / abs(p.b_mean):+.1f}%" if p.b_mean else "n/a"
            diffs.append(f"{fmt_ci(p.diff, claim.scale, sign=True)} ({rel})")
    if not diffs or len(diffs) < len(measures):
        return Row(
            claim,
            label,
            a,
            b,
            *texts,
            "no paired seeds" if not diffs else "a measure has no paired seeds",
            verdict=INCONCLUSIVE,
            why="no paired seeds: no test",
        )
    what = "A/B" if log else "A − B"
    diff = (
        f"{what} "
        + "; ".join(diffs)
        + f", unadjusted 95% CI, {min(n)} paired; margin ±{margin_text}"
        + (" (on log ppl)" if log and claim.margin == "loss" else "")
    )
    # one claim, several measures: intersection-union, the claim's p is the largest of its measures'
    p_all = max(p_diff) if all(math.isfinite(x) for x in p_diff) else math.nan
    eq_all = max(p_eq) if all(math.isfinite(x) for x in p_eq) else math.nan
    side = side_of(claim.direction, means)

    def decide_row(p_adj: float, p_eq_adj: float) -> Verdict:
        return decide(side, p_adj, p_eq_adj, margin_text)

    return Row(claim, label, a, b, *texts, diff, p=p_all, p_eq=eq_all, decide=decide_row)


def _speed_metric(claim: Claim, ctx: Context, arm: str) -> str:
    if claim.metric == "decode:max":
        from reports.speed import decode_batches

        batches = [x for x in decode_batches(ctx.speed_rows) if x > 1] if len(ctx.speed_rows) else []
        return names.speed_decode(max(batches)) if batches else names.speed_decode(8)
    optimizer = ctx.runs.loc[ctx.runs.arm.eq(arm), "optimizer"]
    return claim.metric.replace("{optimizer}", optimizer.iloc[0] if len(optimizer) else "?")


def _speed_row(claim: Claim, ctx: Context, a: str, b: str, label: str) -> Row:
    """reports/speed.py judges it: per-arm medians beside, the verdict from the paired ratio A/B."""
    from reports.speed import row_for_arm, speed_comparison

    c = speed_comparison(
        a,
        b,
        row_for_arm(ctx.speed_rows, a),
        row_for_arm(ctx.speed_rows, b),
        _speed_metric(claim, ctx, a),
        _speed_metric(claim, ctx, b),
        claim.direction,
        claim.scale,
    )
    return Row(claim, label, a, b, c.a_text, c.b_text, c.diff_text, verdict=c.verdict if c.measured else NOT_MEASURED)


def _compute_row(claim: Claim, ctx: Context, a: str, b: str, label: str) -> Row:
    from reports.compute import AXES, schedule_of, stable_evals, target_loss, to_target

    wsd = schedule_of(ctx.runs) == "wsd"
    curves = stable_evals(ctx.curves, ctx.runs) if wsd else ctx.curves
    fixed = ctx.target is not None and math.isfinite(ctx.target)
    target = float(ctx.target) if fixed else target_loss(ctx.curves, a, b)
    t = to_target(curves, a, b, claim.metric, target, ctx.margins.ratio)
    med = t.per_seed.median(numeric_only=True) if len(t.per_seed) else pd.Series(dtype=float)
    unit = AXES[claim.metric]
    a_text = f"{a}: {fmt(med.get('a', math.nan))} {unit}"
    b_text = f"{b}: {fmt(med.get('b', math.nan))} {unit}"
    where = (
        "target val loss "
        + fmt(target)
        + (" (set before the runs)" if fixed else " (the worse arm's final loss, chosen after the runs)")
        + ("; stable-phase evals of a WSD schedule" if wsd else "; cosine schedule")
    )
    if t.n == 0:
        return Row(
            claim,
            label,
            a,
            b,
            a_text,
            b_text,
            f"{where}: no seed with a ratio",
            verdict=INCONCLUSIVE,
            why="no seed on which at least one arm reaches the target",
        )
    beside = []
    for axis in AXES:
        if axis != claim.metric:
            o = to_target(curves, a, b, axis, target)
            beside.append(f"{AXES[axis]} ×{fmt_ci(o.multiplier)}")
    cens = [
        f"{arm} never reaches it on seed(s) {', '.join(map(str, s))} (counted at the compute it had)"
        for arm, s in ((a, t.censored("a")), (b, t.censored("b")))
        if s
    ]
    if t.both_censored:
        cens.append(f"{t.both_censored} seed(s) where neither reaches it (no ratio)")
    diff = (
        f"{unit} ×{fmt_ci(t.multiplier)} (unadjusted 95% CI) over {t.n} seed(s); "
        + "; ".join(beside)
        + " (same seeds: the same evidence, not tested apart); "
        + where
        + "".join(f"; {c}" for c in cens)
        + f"; margin ±{100 * ctx.margins.ratio:g}%"
    )
    reasons = ([] if fixed else ["no target_loss set before the runs ([verdicts] target_loss)"]) + (
        []
        if wsd
        else [
            "cosine schedule: an arm read mid-run is at a higher learning rate than one read at its "
            'end (schedule and speed confounded; use train.schedule = "wsd")'
        ]
    )
    if reasons:
        return Row(
            claim,
            label,
            a,
            b,
            a_text,
            b_text,
            diff,
            p=t.p_value,
            verdict=EXPLORATORY,
            why="outside the Holm family: " + "; ".join(reasons),
            exploratory=True,
        )
    margin_text = f"{100 * ctx.margins.ratio:g}%"
    # a censored seed enters at its bound: it can only count against its arm
    favoured, other = ("a", "b") if claim.direction < 0 else ("b", "a")
    side = side_of(claim.direction, [math.log(t.multiplier.mean)]) if t.multiplier.mean > 0 else 0

    def decide_row(p_adj: float, p_eq_adj: float) -> Verdict:
        v = decide(side, p_adj, p_eq_adj, margin_text)
        blocked = {SUPPORTED: favoured, NOT_SUPPORTED: other}.get(v.word)
        if v.word in ("equivalent", "real, below the margin"):
            blocked = "a" if t.censored("a") else "b" if t.censored("b") else None
        if blocked and t.censored(blocked):
            arm = a if blocked == "a" else b
            return Verdict(
                INCONCLUSIVE,
                v.rule + f"; but {arm} is censored (it needs at least the compute it had, "
                "a bound that cannot count in its favour)",
                v.margin,
            )
        return v

    return Row(claim, label, a, b, a_text, b_text, diff, p=t.p_value, p_eq=t.p_eq, decide=decide_row)


_BUILDERS = {"exact": _exact_row, "stat": _stat_row, "speed": _speed_row, "compute": _compute_row}


def claim_rows(ctx: Context, label: str = "") -> list[Row]:
    rows = []
    for claim in CLAIMS:
        pairs = [(a, b) for a, b in claim.pairs(ctx.runs) if a and b and a not in ctx.folded and b not in ctx.folded]
        if not pairs:
            row = Row(
                claim,
                label,
                "",
                "",
                NOT_MEASURED,
                NOT_MEASURED,
                f"{NOT_MEASURED} (needs {claim.needs})",
                verdict=NOT_MEASURED,
            )
            rows.append(row)
            continue
        for a, b in pairs:
            rows.append(_BUILDERS[claim.kind](claim, ctx, a, b, label))
    return rows


def family(rows: list[Row]) -> list[tuple[Row, str]]:
    """The Holm family: (row, "diff" | "eq") for every finite p of every row with a decision (exploratory rows
    are not in it). Its size is what the table's note states."""
    out = []
    for r in rows:
        if r.decide is None or r.exploratory:
            continue
        out += [(r, k) for k, p in (("diff", r.p), ("eq", r.p_eq)) if math.isfinite(p)]
    return out


def apply_holm(rows: list[Row]) -> int:
    """Holm across every p of the family (difference and equivalence tests of each claim); each row's verdict comes
    from its adjusted p-values. Returns the family size."""
    fam = family(rows)
    adjusted = holm([r.p if k == "diff" else r.p_eq for r, k in fam])
    for (r, k), adj in zip(fam, adjusted, strict=True):
        setattr(r, "p_adj" if k == "diff" else "p_eq_adj", adj)
    for r in rows:
        if r.decide is None or r.exploratory:
            continue
        two = len(inspect.signature(r.decide).parameters) >= 2
        set_verdict(r, r.decide(r.p_adj, r.p_eq_adj) if two else r.decide(r.p_adj))
    return len(fam)
