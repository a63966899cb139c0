"""reports/claims.py: which arms each claim compares, folding arms that computed the same thing, and reading exact
facts. (The verdict rules themselves: tests/reports/test_evidence.py and test_stats.py.)"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from reports import claims, names


def _runs(arms: list[str], **metrics) -> pd.DataFrame:
    rows = []
    for i, arm in enumerate(arms):
        variant, optimizer = arm.split("+")
        rows.append(
            {"arm": arm, "variant": variant, "optimizer": optimizer, "seed": 0, **{k: v[i] for k, v in metrics.items()}}
        )
    return pd.DataFrame(rows)


FULL = _runs(["gpt+adamw", "gpt+muon", "gpt+muonclip", "kimi+adamw", "kimi+muon", "kimi+muonclip"])


def _pairs(claim_text_start: str, runs: pd.DataFrame) -> list:
    claim = next(c for c in claims.CLAIMS if c.text.startswith(claim_text_start))
    return claim.pairs(runs)


def test_the_headline_pair_is_kimi_muon_against_gpt_adamw():
    assert claims.headline_pair(FULL) == ("kimi+muon", "gpt+adamw")
    no_muon = FULL[~FULL.arm.eq("kimi+muon")]
    assert claims.headline_pair(no_muon) == ("kimi+muonclip", "gpt+adamw")  # muonclip stands in for muon
    assert claims.headline_pair(FULL[FULL.variant.eq("kimi")]) == ("kimi+muon", None)
    assert claims.arm_of(FULL, "gpt-moe", "adamw") is None


def test_same_optimizer_and_optimizer_pairs():
    assert claims.same_optimizer_pairs(FULL) == [
        ("kimi+adamw", "gpt+adamw"),
        ("kimi+muon", "gpt+muon"),
        ("kimi+muonclip", "gpt+muonclip"),
    ]
    assert claims.optimizer_pairs(FULL, "muon") == [("gpt+muon", "gpt+adamw"), ("kimi+muon", "kimi+adamw")]
    # an optimizer only one variant trained with gives that variant's pair alone
    partial = FULL[~FULL.arm.isin(["kimi+adamw"])]
    assert claims.optimizer_pairs(partial, "muon") == [("gpt+muon", "gpt+adamw")]


def test_each_claim_compares_the_pairs_it_names():
    # the paper's table rows: the headline pair only
    assert _pairs("Kimi has lower perplexity", FULL) == [("kimi+muon", "gpt+adamw")]
    # Muon claims: every variant, muon then muonclip, each against its adamw arm
    assert _pairs("Muon reaches lower loss", FULL) == [
        ("gpt+muon", "gpt+adamw"),
        ("kimi+muon", "kimi+adamw"),
        ("gpt+muonclip", "gpt+adamw"),
        ("kimi+muonclip", "kimi+adamw"),
    ]
    # training speed: the headline pair, then each optimizer's kimi vs gpt, the headline pair not repeated
    assert _pairs("Kimi trains faster", FULL) == [
        ("kimi+muon", "gpt+adamw"),
        ("kimi+adamw", "gpt+adamw"),
        ("kimi+muon", "gpt+muon"),
        ("kimi+muonclip", "gpt+muonclip"),
    ]


def test_every_claim_has_a_builder_and_a_known_direction():
    assert len({c.text for c in claims.CLAIMS}) == len(claims.CLAIMS)
    for c in claims.CLAIMS:
        assert c.kind in claims._BUILDERS and c.direction in (-1, 0, 1) and c.scale > 0, c.text
    kinds = {c.kind for c in claims.CLAIMS}
    assert kinds == {"stat", "exact", "speed", "compute"}


def _curves(arm_losses: dict[str, list[float]], seeds=(0,)) -> pd.DataFrame:
    rows = [
        {"arm": arm, "seed": s, "step": 10 * i, "loss": loss}
        for arm, losses in arm_losses.items()
        for s in seeds
        for i, loss in enumerate(losses)
    ]
    return pd.DataFrame(rows)


def test_muonclip_folds_into_muon_only_when_its_curve_is_identical():
    same = _curves(
        {
            "kimi+muon": [5.0, 4.0, 3.5],
            "kimi+muonclip": [5.0, 4.0, 3.5],
            "gpt+muon": [5.0, 4.1, 3.6],
            "gpt+muonclip": [5.0, 4.1, 3.6000001],
        }
    )
    assert claims.identical_arms(same) == {"kimi+muonclip": "kimi+muon"}  # 1e-7 apart is a real difference
    shorter = _curves({"kimi+muon": [5.0, 4.0, 3.5], "kimi+muonclip": [5.0, 4.0]})
    assert claims.identical_arms(shorter) == {}  # a curve that stops early is not the same run
    assert claims.identical_arms(_curves({"kimi+muonclip": [5.0]})) == {}  # no twin
    assert claims.identical_arms(pd.DataFrame()) == {}


def test_exact_value_reads_the_first_seed_and_says_whether_seeds_agree():
    runs = pd.DataFrame(
        {
            "arm": ["kimi+muon"] * 2 + ["gpt+adamw"] * 2,
            "variant": ["kimi"] * 2 + ["gpt"] * 2,
            names.PARAMS_TOTAL: [162432.0, 162432.0, 120576.0, 120577.0],
        }
    )
    assert claims.exact_value(runs, "kimi+muon", names.PARAMS_TOTAL) == (162432.0, True)
    assert claims.exact_value(runs, "gpt+adamw", names.PARAMS_TOTAL) == (120576.0, False)
    value, agree = claims.exact_value(runs, "kimi+muon", names.CKPT_BYTES)
    assert math.isnan(value) and agree


def test_exact_value_falls_back_to_older_names_then_to_the_speed_runs():
    runs = pd.DataFrame({"arm": ["kimi+muon"], "variant": ["kimi"], names.INFER_KV_BYTES: [160.0]})
    assert claims.exact_value(runs, "kimi+muon", names.SPEED_KV_BYTES, (names.INFER_KV_BYTES,)) == (160.0, True)
    speed = pd.DataFrame({"variant": ["gpt", "kimi"], names.SPEED_KV_BYTES: [512.0, 320.0]})
    bare = pd.DataFrame({"arm": ["kimi+muon"], "variant": ["kimi"]})
    assert claims.exact_value(bare, "kimi+muon", names.SPEED_KV_BYTES, speed_rows=speed) == (320.0, True)


@pytest.mark.parametrize(
    "a,b,text",
    [
        (110.0, 100.0, "+10.0%"),
        (90.0, 100.0, "-10.0%"),
        (1.0, 0.0, "n/a"),
        (math.nan, 1.0, "n/a"),
        (-50.0, -100.0, "+50.0%"),
    ],
)
def test_relative_difference_is_against_b_in_percent(a, b, text):
    assert claims._rel(a, b) == text
