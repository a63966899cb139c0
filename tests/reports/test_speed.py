"""Speed verdicts from paired ratios: the rule on hand-made intervals, the ratio read from either arm's run
(inverted from B's), and the fallback for speed runs that logged no ratio."""

import pandas as pd
import pytest

from reports import names
from reports.sections import speed_section
from reports.speed import (
    EQUAL,
    PairedRatio,
    fmt_ratio,
    paired_ratio,
    ratio_verdict,
    row_for_arm,
    speed_comparison,
    speed_rows_for,
)
from reports.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED

KEY = "speed/ratio/decode_tokens_per_s_b1/vs/G/decode_tokens_per_s_b1"


@pytest.mark.parametrize(
    "low, high, n, direction, verdict",
    [
        (1.45, 1.55, 20, +1, SUPPORTED),  # excludes 1 above, claimed A higher
        (1.45, 1.55, 20, -1, NOT_SUPPORTED),  # ... claimed A lower
        (0.80, 0.86, 20, +1, NOT_SUPPORTED),  # excludes 1 below
        (0.80, 0.86, 20, -1, SUPPORTED),
        (0.98, 1.02, 20, +1, EQUAL),  # inside [0.97, 1.03]
        (1.005, 1.02, 20, +1, EQUAL),  # excludes 1 but inside ±3%: equal is checked first
        (0.97, 1.03, 20, +1, EQUAL),  # the bounds themselves count as inside
        (0.969, 1.02, 20, +1, INCONCLUSIVE),  # straddles 1, reaches past -3%
        (0.95, 1.15, 20, +1, INCONCLUSIVE),
        (1.45, 1.55, 5, +1, INCONCLUSIVE),  # 5 rounds: no 95% order-statistic interval
        (float("nan"), float("nan"), 20, +1, INCONCLUSIVE),
    ],
)
def test_ratio_verdict_rule(low, high, n, direction, verdict):
    assert ratio_verdict(PairedRatio(1.0, low, high, n), direction) == verdict  # the verdict reads the interval


def test_no_ratio_is_inconclusive():
    assert ratio_verdict(None, +1) == INCONCLUSIVE


def test_ratio_read_from_a_or_inverted_from_b():
    kimi = {"shape": "K", KEY.replace("/G/", "/X/"): 9.0}  # a ratio against another shape: not this pair
    gpt = {
        "shape": "G",
        "speed/ratio/decode_tokens_per_s_b1/vs/K/decode_tokens_per_s_b1": 0.5,
        "speed/ratio/decode_tokens_per_s_b1/vs/K/decode_tokens_per_s_b1_lo": 0.4,
        "speed/ratio/decode_tokens_per_s_b1/vs/K/decode_tokens_per_s_b1_hi": 0.625,
        "speed/ratio/decode_tokens_per_s_b1/vs/K/decode_tokens_per_s_b1_n": 12.0,
    }
    m = "speed/decode_tokens_per_s_b1"
    r = paired_ratio(kimi, gpt, m, m)  # kimi/gpt from gpt's gpt/kimi
    assert (r.median, r.low, r.high, r.n) == (2.0, 1.6, 2.5, 12)
    direct = {"shape": "K", KEY: 2.0, KEY + "_lo": 1.6, KEY + "_hi": 2.5, KEY + "_n": 12.0}
    assert paired_ratio(direct, {"shape": "G"}, m, m) == PairedRatio(2.0, 1.6, 2.5, 12)
    assert paired_ratio({"shape": "K"}, {"shape": "G"}, m, m) is None
    assert fmt_ratio(r) == "×2.000 [1.600, 2.500], 12 paired rounds"
    assert fmt_ratio(PairedRatio(2.0, float("nan"), float("nan"), 4)) == "×2.000, 4 paired rounds (no interval)"


def test_speed_comparison_cells():
    m = "speed/decode_tokens_per_s_b1"
    kimi = {
        "shape": "K",
        m: 45.0,
        m + "_iqr": 1.5,
        m + "_n": 20.0,
        KEY: 1.5,
        KEY + "_lo": 1.45,
        KEY + "_hi": 1.55,
        KEY + "_n": 20.0,
    }
    gpt = {"shape": "G", m: 30.0, m + "_iqr": 9.0, m + "_n": 20.0}
    c = speed_comparison("kimi+muon", "gpt+adamw", kimi, gpt, m, m, +1)
    assert c.a_text == "kimi+muon: 45.00 (IQR 1.500, n=20)"
    assert c.b_text == "gpt+adamw: 30.00 (IQR 9.000, n=20) **noisy**"  # noisy stays as information
    assert c.diff_text == "A/B ×1.500 [1.450, 1.550], 20 paired rounds (decode_tokens_per_s_b1)"
    assert c.verdict == SUPPORTED and c.measured
    old = speed_comparison("kimi+muon", "gpt+adamw", {k: v for k, v in kimi.items() if "ratio" not in k}, gpt, m, m, +1)
    assert old.diff_text == "medians +50.0% (decode_tokens_per_s_b1); no paired ratio logged"
    assert old.verdict == INCONCLUSIVE
    missing = speed_comparison("kimi+muon", "gpt+adamw", None, gpt, m, m, +1)
    assert not missing.measured


def test_two_shapes_of_one_variant_each_keep_their_speed_run():
    """fair-cpu's tuned kimi+adamw and kimi+muon chose different MoE bias_update_speed: two model shapes, each
    timed by the speed run under its own optimizer. Picking one speed row per variant lost kimi+adamw's
    train step ("no controlled speed run for this shape") while its ratio to gpt+adamw sat in the table
    under a bare shape hash; each arm must find its own shape's row and the tables must name both."""
    train = names.speed_opt("adamw", "train_tokens_per_s")
    ratio = names.speed_ratio(train, "K1", train)
    runs = pd.DataFrame(
        [
            dict(
                arm=arm,
                variant=arm.split("+")[0],
                optimizer=arm.split("+")[1],
                preset="tiny",
                shape=shape,
                parent_run_id="P",
            )
            for arm, shape in (("gpt+adamw", "G"), ("kimi+adamw", "K1"), ("kimi+muon", "K2"))
            for _seed in range(2)
        ]
    )
    base = dict(variant=None, preset="tiny", parent_run_id="P", start_time=1, device="cpu", threads=1)
    speed = pd.DataFrame(
        [
            base
            | dict(
                variant="gpt",
                shape="G",
                optimizers="adamw",
                **{train: 1100.0, ratio: 1.107, ratio + "_lo": 1.077, ratio + "_hi": 1.126, ratio + "_n": 17.0},
            ),
            base | dict(variant="kimi", shape="K1", optimizers="adamw", **{train: 1000.0}),
            base
            | dict(
                variant="kimi", shape="K2", optimizers="muon", **{names.speed_opt("muon", "train_tokens_per_s"): 900.0}
            ),
        ]
    )
    rows = speed_rows_for(speed, runs)
    assert sorted(zip(rows["shape"], rows["arms"], strict=True)) == [
        ("G", "gpt+adamw"),
        ("K1", "kimi+adamw"),
        ("K2", "kimi+muon"),
    ]
    assert row_for_arm(rows, "kimi+adamw")["shape"] == "K1" and row_for_arm(rows, "kimi+muon")["shape"] == "K2"
    assert row_for_arm(rows, "gpt+muon") is None
    c = speed_comparison(
        "kimi+adamw", "gpt+adamw", row_for_arm(rows, "kimi+adamw"), row_for_arm(rows, "gpt+adamw"), train, train, +1
    )
    assert c.measured and c.verdict == NOT_SUPPORTED
    assert c.diff_text.startswith("A/B ×0.903 [0.888, 0.929], 17 paired rounds")  # 1/1.107, from gpt's run
    section = speed_section(rows)
    assert "| kimi (kimi+adamw) | tiny | K1 |" in section and "| kimi (kimi+muon) | tiny | K2 |" in section
    assert "| gpt | tiny | G |" in section  # one shape: the variant alone
    assert "| gpt+adamw | kimi+adamw | train_tokens_per_s | ×1.107 [1.077, 1.126], 17 paired rounds |" in section
