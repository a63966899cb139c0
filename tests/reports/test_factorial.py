"""The 2x2 decomposition (reports/factorial.py), checked against effects computed by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from reports.factorial import Block, blocks, decomposition, section

# final val loss per arm and seed 0, 1, 2
LOSS = {
    "gpt+adamw": (3.0, 3.1, 2.9),
    "gpt+muon": (2.8, 2.85, 2.75),
    "kimi+adamw": (2.9, 3.0, 2.9),
    "kimi+muon": (2.6, 2.7, 2.7),
}
INTERACTION = "interaction (architecture effect at muon - at adamw)"
T2 = 4.302652729911275  # Student-t 97.5% quantile, 2 degrees of freedom


def _runs() -> pd.DataFrame:
    rows = [
        {
            "arm": arm,
            "variant": arm.split("+")[0],
            "optimizer": arm.split("+")[1],
            "seed": s,
            "val/loss_final": v[s],
            "val/bpb": v[s] / math.log(2),
        }
        for arm, v in LOSS.items()
        for s in range(3)
    ]
    return pd.DataFrame(rows)


def _curves() -> pd.DataFrame:
    """Two evals per run, (0 tokens, loss 5) and (100 tokens, final loss F): the target 4 (gpt+adamw's final, the
    worst) is reached at x = 100 (5 - 4) / (5 - F)."""
    final = {"gpt+adamw": (4.0, 4.0), "gpt+muon": (3.0, 3.0), "kimi+adamw": (3.75, 3.75), "kimi+muon": (2.5, 3.0)}
    rows = []
    for arm, fs in final.items():
        for seed, f in enumerate(fs):
            rid = f"{arm}-{seed}"
            rows += [
                {"run_id": rid, "arm": arm, "seed": seed, "step": 0, "loss": 5.0, "tokens": 0.0},
                {"run_id": rid, "arm": arm, "seed": seed, "step": 10, "loss": f, "tokens": 100.0},
            ]
    return pd.DataFrame(rows)


def test_blocks_need_all_four_arms():
    runs = _runs()
    assert blocks(runs) == [Block("kimi", "gpt", "muon", "adamw")]
    assert blocks(runs[~runs.arm.eq("kimi+adamw")]) == []


def test_effects_and_interaction_by_hand():
    got = {r["effect"]: r for r in decomposition(_runs(), _curves(), blocks(_runs())[0])}
    # optimizer at gpt: muon - adamw per seed = -0.2, -0.25, -0.15: mean -0.2, sd 0.05
    e = got["optimizer muon vs adamw, at gpt"]["val_loss"]
    assert (e.n, e.mean) == (3, pytest.approx(-0.2))
    assert e.high - e.mean == pytest.approx(T2 * 0.05 / math.sqrt(3), rel=1e-9)  # 0.12421
    # architecture at adamw: -0.1, -0.1, 0.0; at muon: -0.2, -0.15, -0.05
    assert got["architecture kimi vs gpt, at adamw"]["val_loss"].mean == pytest.approx(-0.1 / 1.5)
    assert got["architecture kimi vs gpt, at muon"]["val_loss"].mean == pytest.approx(-0.4 / 3)
    # interaction: (-0.2+0.1, -0.15+0.1, -0.05-0) = -0.1, -0.05, -0.05: mean -0.0667, sd 0.028868
    i = got[INTERACTION]["val_loss"]
    assert i.mean == pytest.approx(-0.2 / 3)
    assert (i.low, i.high) == (
        pytest.approx(-0.2 / 3 - T2 * 0.0288675 / math.sqrt(3), abs=1e-6),
        pytest.approx(-0.2 / 3 + T2 * 0.0288675 / math.sqrt(3), abs=1e-6),
    )
    assert got["both changes: kimi+muon vs gpt+adamw"]["val_loss"].mean == pytest.approx(-1.0 / 3)  # -0.4, -0.4, -0.2
    assert got[INTERACTION]["bpb"].mean == pytest.approx(-0.2 / 3 / math.log(2))
    # tokens to loss 4: gpt+adamw 100, gpt+muon 50, kimi+adamw 80, kimi+muon 40 (seed 0) and 50 (seed 1);
    # seed 2 has no curve. Architecture at muon: 0.8, 1.0 -> geometric mean sqrt(0.8) = 0.8944
    assert got["architecture kimi vs gpt, at muon"]["tokens"].mean == pytest.approx(math.sqrt(0.8))
    # interaction (ratio of ratios): 0.8 / 0.8 = 1, 1.0 / 0.8 = 1.25 -> sqrt(1.25) = 1.1180; 2 seeds: t(1) = 12.706
    t = got[INTERACTION]["tokens"]
    assert (t.n, t.mean) == (2, pytest.approx(math.sqrt(1.25)))
    half = 12.706204736174705 * math.log(1.25) / math.sqrt(2) / math.sqrt(2)  # sd of (0, log 1.25) = log1.25/sqrt2
    assert t.high == pytest.approx(math.exp(math.log(1.25) / 2 + half), rel=1e-9)
    assert got["optimizer muon vs adamw, at gpt"]["target"] == 4.0


def test_section_table():
    md = section(_runs(), _curves())
    assert "| interaction (architecture effect at muon - at adamw) | -0.06667 [" in md
    assert "Arms gpt+adamw, gpt+muon, kimi+adamw, kimi+muon; tokens to the target val loss 4.000" in md
    assert section(_runs()[lambda r: r.optimizer.eq("adamw")], _curves()) is None
