"""The nanoKimi paper's claims as data (what is claimed, on which metric, between which pairs of arms, at which
threshold or margin), the pairs of arms each claim compares, and a claims-table row (Row) with its verdict."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from reports import names
from reports.stats import EXACT_THRESHOLD, INCONCLUSIVE, Verdict

NOT_MEASURED = "not measured"


NOT_MATCHED = "not matched"


IN_WORDS = "(in words)"


OTHER_TOKENIZER = " (GPT-2 BPE tokens on other data: not comparable)"


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
