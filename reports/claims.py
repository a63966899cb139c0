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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.mdformat import fmt, fmt_ci
from reports import names
from reports.stats import (
    EXACT_THRESHOLD,
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
    paper: str  # the paper's numbers "Kimi vs GPT", or "(in words)"
    kind: str  # "stat" | "exact" | "speed" | "compute"
    metric: str  # stat/exact: a trial metric; speed: a speed metric (may hold {optimizer});
    direction: int  # compute: the axis (tokens, flops, seconds). +1: A higher, -1: lower, 0: equal
    scale: float
    pairs: Callable[[pd.DataFrame], list[tuple[str | None, str | None]]]
    needs: str
    fallback: tuple[str, ...] = field(default_factory=tuple)  # exact: older metric names to read instead
    also: tuple[str, ...] = ()  # stat: the claim's other measures (one claim, each must agree)
    test: str = "diff"  # stat: "diff" (A - B in the metric's units) or "log" (log A - log B: a ratio)
    margin: str = "loss"  # stat: "loss" (Margins.loss_nats, in nats) or "ratio" (Margins.ratio, relative)
    threshold: float = EXACT_THRESHOLD  # exact: relative gap that counts as a difference (equality: match tol.)


CLAIMS: list[Claim] = [
    Claim(
        "Kimi infers faster (decode tokens/s, batch 1)",
        "45.2 vs 30.3",
        "speed",
        names.speed_decode(1),
        +1,
        1.0,
        _headline,
        HEADLINE_NEEDS,
    ),
    # log ppl = the val loss in nats: the ratio of perplexities is tested, with the loss margin
    Claim(
        "Kimi has lower perplexity (val ppl; bits/byte beside it)",
        "18.1 vs 22.8" + OTHER_TOKENIZER,
        "stat",
        names.VAL_PPL_FINAL,
        -1,
        1.0,
        _headline,
        HEADLINE_NEEDS,
        test="log",
        margin="loss",
    ),
    Claim("Same total parameters (M)", "75 vs 74", "exact", names.PARAMS_TOTAL, 0, 1e6, _headline, HEADLINE_NEEDS),
    Claim(
        "Kimi is smaller on disk (checkpoint MB)",
        "580 vs 620 (0.58 vs 0.62 GB)",
        "exact",
        names.CKPT_BYTES,
        -1,
        1e6,
        _headline,
        HEADLINE_NEEDS,
    ),
    Claim(
        "Kimi activates fewer parameters per token (M)",
        IN_WORDS,
        "exact",
        names.PARAMS_ACTIVE,
        -1,
        1e6,
        _headline,
        HEADLINE_NEEDS,
    ),
    Claim(
        "Kimi needs fewer FLOPs per token (MFLOP)",
        IN_WORDS,
        "exact",
        names.FLOPS_PER_TOKEN,
        -1,
        1e6,
        _headline,
        HEADLINE_NEEDS,
    ),
    Claim(
        "Kimi caches fewer KV bytes per token",
        IN_WORDS,
        "exact",
        names.SPEED_KV_BYTES,
        -1,
        1.0,
        _headline,
        HEADLINE_NEEDS,
        fallback=(names.INFER_KV_BYTES,),
    ),
    Claim(
        "Muon reaches lower loss than AdamW (val loss)",
        IN_WORDS,
        "stat",
        names.VAL_LOSS_FINAL,
        -1,
        1.0,
        _muon_vs_adamw,
        OPT_NEEDS,
    ),
    Claim(
        "Muon converges faster (tokens to the target val loss, A/B; FLOPs, seconds beside)",
        IN_WORDS,
        "compute",
        "tokens",
        -1,
        1.0,
        _muon_vs_adamw,
        OPT_NEEDS,
    ),
    Claim(
        "Muon gives more stable gradients (grad-norm CV and p99/median, A/B)",
        IN_WORDS,
        "stat",
        names.GRAD_NORM_CV,
        -1,
        1.0,
        _muon_vs_adamw,
        OPT_NEEDS,
        also=(names.GRAD_NORM_P99_OVER_MEDIAN,),
        test="log",
        margin="ratio",
    ),
    Claim(
        "Kimi infers faster at larger batch (decode tokens/s, largest batch)",
        IN_WORDS,
        "speed",
        "decode:max",
        +1,
        1.0,
        _headline,
        HEADLINE_NEEDS,
    ),
    Claim(
        "Kimi trains faster (controlled train step, tokens/s)",
        IN_WORDS,
        "speed",
        names.speed_opt("{optimizer}", "train_tokens_per_s"),
        +1,
        1.0,
        _headline_and_same_opt,
        HEADLINE_NEEDS,
    ),
    Claim(
        "Kimi is more compute-efficient (FLOPs to the target val loss, A/B; tokens, seconds beside)",
        IN_WORDS,
        "compute",
        "flops",
        -1,
        1.0,
        _headline_and_same_opt,
        HEADLINE_NEEDS,
    ),
]


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
class Row:
    claim: Claim
    label: str
    a: str
    b: str
    a_text: str
    b_text: str
    diff_text: str
    p: float = math.nan  # raw p of the difference test (stat / compute rows); NaN: no p-value
    verdict: str = INCONCLUSIVE  # the verdict as shown (Verdict.text)
    decide: Callable[..., Verdict | str] | None = None  # (p_adj[, p_eq_adj]) -> verdict, after Holm
    p_adj: float = math.nan
    p_eq: float = math.nan  # raw p of the equivalence test (TOST); NaN: none
    p_eq_adj: float = math.nan
    why: str = ""  # the branch of the rule that decided the row, with its numbers
    exploratory: bool = False  # outside the Holm family: no verdict word from the rule
    tuning: str = ""  # the pair's tuning status (reports/fairness.py); "" on exact / speed rows


def row_verdict(row: Row) -> Verdict:
    """The final verdict of a row (after apply_holm for rows with a p-value): word and the rule text applied."""
    return Verdict(row.verdict, row.why)


def set_verdict(row: Row, v: Verdict | str) -> None:
    v = v if isinstance(v, Verdict) else Verdict(v, row.why)
    row.verdict, row.why = v.text, v.rule


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
    from reports.speed import row_for, speed_comparison

    rows = []
    for arm in (a, b):
        variant = ctx.runs.loc[ctx.runs.arm.eq(arm), "variant"]
        rows.append(row_for(ctx.speed_rows, variant.iloc[0], None) if len(variant) else None)
    c = speed_comparison(
        a, b, *rows, _speed_metric(claim, ctx, a), _speed_metric(claim, ctx, b), claim.direction, claim.scale
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


def fitted_rows(
    runs: pd.DataFrame, curves: pd.DataFrame, folded: dict[str, str], target: float | None = None
) -> list[Row]:
    """With three or more sizes: the FLOPs multiplier read off fitted loss-vs-compute curves (each run's last eval),
    cluster bootstrap over shared seed ids. Exploratory rows (no p-value, outside the Holm family); fewer than
    MIN_SIZES sizes: not read (a 3-parameter curve through 3 sizes has no residual degrees of freedom)."""
    from reports.compute import MIN_SIZES, fitted_multiplier, scaling_points

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
            sizes = min(points.loc[points.arm.eq(arm), "size"].nunique() for arm in (a, b))
            head = (claim, f"fit over {sizes} sizes", a, b, f"{a}: L = a C^-b + c", f"{b}: L = a C^-b + c")
            if sizes < MIN_SIZES:
                rows.append(
                    Row(
                        *head,
                        f"not read: {sizes} sizes (needs {MIN_SIZES}: L = a C^-b + c has 3 "
                        "parameters, so 3 sizes leave no residual degree of freedom)",
                        verdict=EXPLORATORY,
                        why="fewer than 4 sizes",
                        exploratory=True,
                    )
                )
                continue
            f = fitted_multiplier(points, a, b, target)
            if not math.isfinite(f.multiplier):
                continue
            rows.append(
                Row(
                    *head,
                    fitted_text(f),
                    verdict=EXPLORATORY,
                    why="no p-value: outside the Holm family",
                    exploratory=True,
                )
            )
    return rows


def fitted_text(f) -> str:
    """The fitted multiplier as the row states it: point, interval, and how many resamples miss or extrapolate."""
    has_ci = not math.isnan(f.low)
    ci = f"[{fmt(f.low)}, {fmt(f.high)}]" if has_ci else "(no interval: fewer than 2 shared seeds)"
    notes = [f"cluster bootstrap over seed ids {', '.join(map(str, f.seeds))} (both arms, all sizes)"]
    if f.n_unreached:
        notes.append(f"{f.n_unreached} of {f.n_resamples} resamples: a refitted curve never reaches the target")
    if f.n_extrapolated:
        notes.append(
            f"{f.n_extrapolated} of {f.n_resamples} resamples extrapolate (a refit reaches the target "
            "outside its measured compute range)"
        )
    if f.extrapolated:
        notes.append(f"the point fit extrapolates: {f.extrapolated} reaches the target outside its measured range")
    reading = "no reading"
    if has_ci and not f.n_extrapolated and not f.extrapolated and f.low > 0 and f.high < math.inf:
        reading = "interval below 1" if f.high < 1 else "interval above 1" if f.low > 1 else "interval spans 1"
    return (
        f"FLOPs ×{fmt(f.multiplier)} {ci} at val loss {fmt(f.target)}; "
        + "; ".join(notes)
        + f"; exploratory reading: {reading}"
    )
