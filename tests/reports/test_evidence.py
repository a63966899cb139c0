"""The evidence, report side: groups never pooled, controlled speed, exact facts, compute to target, scaling fit."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from harness.measure.bench.timing import NOISY_REL_IQR
from reports import claims as cl
from reports.collect import collect
from reports.compute import eval_curves, fitted_multiplier, reach, to_target
from reports.markdown import write_report
from reports.speed import Measured
from reports.stats import NOT_SUPPORTED, SUPPORTED, holm
from tests.reports.test_markdown import table_rows

T0 = 1_760_000_000_000


# ----------------------------------------------------------------------------- two budgets in one store


def _two_budget_store(root) -> tuple[str, dict]:
    """Arms gpt+adamw and kimi+muon x seeds 0, 1, first at 20 steps (matrix run 1), then rerun at 3 steps
    (matrix run 2): final val losses differ by budget, so pooling would show in every mean."""
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("budgets", artifact_location=(root / "art").as_uri())
    finals = {}
    for i, steps in enumerate((20, 3)):
        parent = client.create_run(
            exp, start_time=T0 + i * 10**6, tags={"kb.kind": "matrix", "kb.command": f"run --steps {steps}"}
        )
        for j, (arm, seed) in enumerate((a, s) for a in ("gpt+adamw", "kimi+muon") for s in (0, 1)):
            variant, opt = arm.split("+")
            start = T0 + i * 10**6 + 1000 * (j + 1)
            run = client.create_run(
                exp,
                start_time=start,
                tags={
                    "kb.kind": "trial",
                    "mlflow.parentRunId": parent.info.run_id,
                    "kb.arm": arm,
                    "kb.variant": variant,
                    "kb.optimizer": opt,
                    "kb.preset": "tiny",
                    "kb.seed": str(seed),
                    "kb.status": "finished",
                    "kb.trial_key": f"{arm}-{seed}-{steps}",
                    "kb.git_commit": "abc",
                    "kb.data_hash": "d",
                    "kb.device": "cpu",
                },
            )
            loss = (3.0 if steps == 20 else 5.0) + 0.1 * seed + (0.2 if variant == "gpt" else 0.0)
            finals[(steps, arm, seed)] = loss
            ms = [Metric("val/loss_final", loss, start, steps), Metric("params/total", 1e5, start, steps)]
            evals = range(0, steps + 1, max(1, steps // 4))
            ms += [Metric("val/loss", loss + 1.0 - k / steps, start, k) for k in evals]
            ms += [Metric("train/tokens", 100.0 * k, start, k) for k in range(1, steps + 1)]
            client.log_batch(
                run.info.run_id,
                metrics=ms,
                params=[
                    Param("seed", str(seed)),
                    Param("train.steps", str(steps)),
                    Param("model.dim", "64"),
                    Param("optim.lr", "0.001"),
                    Param("variant", variant),
                    Param("optimizer", opt),
                ],
            )
            client.set_terminated(run.info.run_id, "FINISHED")
    return uri, finals


@pytest.fixture(scope="module")
def budgets(tmp_path_factory):
    root = tmp_path_factory.mktemp("budgets")
    uri, finals = _two_budget_store(root)
    return collect(uri, "budgets"), finals


@pytest.mark.slow
def test_two_budgets_are_never_averaged(budgets, tmp_path):
    c, finals = budgets
    md = write_report(c, tmp_path, figures=False).read_text()
    s = pd.read_csv(tmp_path / "summary.csv").set_index("arm")
    for arm in ("gpt+adamw", "kimi+muon"):
        assert s.loc[arm, "n_trials"] == 2  # not 4: one budget only
        newest = [finals[(3, arm, seed)] for seed in (0, 1)]  # the newest matrix invocation (3 steps)
        assert s.loc[arm, "val/loss_final:mean"] == pytest.approx(sum(newest) / 2, rel=1e-12)
    groups = table_rows(md, "## Groups in this experiment")
    assert set(groups) == {"G1 (shown)", "G2"}
    assert groups["G1 (shown)"]["budget"] == "3 steps" and groups["G2"]["budget"] == "20 steps"
    assert "train.steps=3" in groups["G1 (shown)"]["differs in"]
    assert "--all-runs" in md


def test_all_runs_shows_every_group_as_its_own_block(budgets, tmp_path):
    c, finals = budgets
    md = write_report(c, tmp_path, figures=False, all_runs=True).read_text()
    assert "## Group G1" in md and "## Group G2" in md
    s = pd.read_csv(tmp_path / "summary.csv").set_index(["group", "arm"])
    for group, steps in (("G1", 3), ("G2", 20)):
        for arm in ("gpt+adamw", "kimi+muon"):
            vals = [finals[(steps, arm, seed)] for seed in (0, 1)]
            assert s.loc[(group, arm), "n_trials"] == 2
            assert s.loc[(group, arm), "val/loss_final:mean"] == pytest.approx(sum(vals) / 2, rel=1e-12)
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert len(trials) == 8 and set(trials.group) == {"G1", "G2"}


def test_an_arm_with_two_configurations_is_split_not_averaged(budgets):
    from reports.groups import assign_groups

    c, _ = budgets
    runs = c.runs.copy()
    newest = runs[runs["param.train.steps"].eq("3")].copy()
    # retune gpt+adamw's lr in the newest budget for seed 1 only: that run must leave the group
    i = newest.index[(newest.arm == "gpt+adamw") & (newest.seed == 1)][0]
    runs.loc[i, "param.optim.lr"] = "0.01"
    g = assign_groups(runs)
    assert g.loc[i, "group"] != g.loc[newest.index[0], "group"]
    for _, grp in g.groupby("group"):
        assert grp.groupby("arm").config_id.nunique().max() == 1


# ----------------------------------------------------------------------------- speed


def test_speed_claims_read_only_the_controlled_runs(collected, tmp_path):
    # the trials still carry single-shot infer/* metrics: without speed runs the speed claims are not measured
    assert collected.runs["infer/decode_tokens_per_s"].notna().any()
    c = dataclasses.replace(collected, speed=collected.speed.iloc[0:0])
    md = write_report(c, tmp_path, figures=False).read_text()
    claims = table_rows(md, "## Claims vs measured")
    for text in (
        "Kimi infers faster (decode tokens/s, batch 1)",
        "Kimi trains faster (controlled train step, tokens/s)",
    ):
        assert claims[text]["verdict"] == "not measured"
    assert "No controlled speed run" in md


def test_speed_section_shows_median_iqr_and_n(report_md):
    section = report_md.split("## Speed and memory (controlled measurements)")[1].split("\n## ")[0]
    assert "| kimi | tiny | shape-kimi | cpu, 1 | 8000 (IQR 200.0, n=20) |" in section
    assert "200.0 (IQR 50.00, n=20) **noisy**" in section  # gpt decode b8: IQR 25% of the median
    assert "| gpt+adamw | tiny | 500.0 (IQR 10.00, n=15) |" in section
    # the paired ratios, each pair once, as logged (gpt's run holds the train step's)
    assert "| kimi | gpt | decode_tokens_per_s_b1 | ×1.500 [1.450, 1.550], 20 paired rounds |" in section
    assert "| kimi | gpt | decode_tokens_per_s_b8 | ×1.050 [0.950, 1.150], 20 paired rounds |" in section
    assert "| gpt+adamw | kimi+muon | train_tokens_per_s | ×1.200 [1.160, 1.250], 15 paired rounds |" in section


@pytest.fixture(scope="module")
def report_md(collected, tmp_path_factory):
    return write_report(collected, tmp_path_factory.mktemp("ev"), figures=False).read_text()


@pytest.mark.parametrize("iqr, noisy", [(0.0, False), (9.9, False), (10.0, False), (10.1, True), (30.0, True)])
def test_noisy_flag_on_synthetic_timings(iqr, noisy):
    assert NOISY_REL_IQR == 0.10
    m = Measured(100.0, iqr, 20)
    assert m.noisy() is noisy


# ----------------------------------------------------------------------------- exact facts


def _exact_ctx(a_vals: dict, b_vals: dict, match=None, seeds=(0,)) -> cl.Context:
    rows = []
    for arm, vals in (("kimi+muon", a_vals), ("gpt+adamw", b_vals)):
        for s in seeds:
            rows.append(
                {
                    "arm": arm,
                    "variant": arm.split("+")[0],
                    "optimizer": arm.split("+")[1],
                    "seed": s,
                    "preset": "tiny",
                    **vals,
                }
            )
    return cl.Context(
        pd.DataFrame(rows), pd.DataFrame(columns=["run_id", "arm", "seed", "step", "loss"]), pd.DataFrame(), match, {}
    )


EXACT = [c for c in cl.CLAIMS if c.kind == "exact"]


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
@pytest.mark.parametrize("kimi_smaller", [True, False])
def test_exact_rows_are_never_inconclusive(seeds, kimi_smaller):
    small = {
        "params/total": 1.00e5,
        "params/active": 0.5e5,
        "ckpt/bytes": 4.0e5,
        "train/flops_per_token": 6e5,
        "speed/kv_bytes_per_token": 512.0,
    }
    big = {k: v * 1.5 for k, v in small.items()}
    a, b = (small, big) if kimi_smaller else (big, small)
    rows = cl.claim_rows(_exact_ctx(a, b, match=("total", 0.03), seeds=seeds))
    got = {r.claim.text: r.verdict for r in rows if r.claim.kind == "exact"}
    assert set(got) == {c.text for c in EXACT}
    for claim in EXACT:
        if claim.direction == 0:
            assert got[claim.text] == NOT_SUPPORTED  # 50% apart: outside the 3% match tolerance
        else:
            assert got[claim.text] == (SUPPORTED if kimi_smaller else NOT_SUPPORTED)


def test_same_parameters_needs_a_matched_matrix_and_states_the_gap():
    a, b = {"params/total": 101_800.0}, {"params/total": 100_000.0}
    same = next(c for c in EXACT if c.direction == 0)
    unmatched = [r for r in cl.claim_rows(_exact_ctx(a, b)) if r.claim is same][0]
    assert unmatched.verdict == cl.NOT_MATCHED and "+1.80%" in unmatched.diff_text
    matched = [r for r in cl.claim_rows(_exact_ctx(a, b, match=("total", 0.03))) if r.claim is same][0]
    assert matched.verdict == SUPPORTED and "+1.80%" in matched.diff_text and "threshold ±3%" in matched.why
    tight = [r for r in cl.claim_rows(_exact_ctx(a, b, match=("total", 0.01))) if r.claim is same][0]
    assert tight.verdict == NOT_SUPPORTED


@pytest.mark.parametrize(
    "a, b, verdict, gap",
    [
        # the rounding accidents, now read unrounded against the claim's 1% threshold:
        (1.049e6, 1.051e6, "equivalent within ±1%", "-0.19%"),  # 0.2% apart: was "supported" at 2 digits (1.0 vs 1.1)
        (1.01e6, 1.04e6, SUPPORTED, "-2.88%"),  # 2.9% apart: was "not supported" (1.0 vs 1.0)
        (1.04e6, 1.01e6, NOT_SUPPORTED, "+2.97%"),  # beyond the threshold on the other side
        (0.6612e6, 0.6551e6, "equivalent within ±1%", "+0.93%"),  # the smoke checkpoints: 600 MB's digits do not apply
    ],
)
def test_exact_facts_are_compared_unrounded_against_a_relative_threshold(a, b, verdict, gap):
    ckpt = next(c for c in EXACT if c.metric == "ckpt/bytes")
    assert ckpt.direction == -1 and ckpt.threshold == 0.01
    row = [r for r in cl.claim_rows(_exact_ctx({"ckpt/bytes": a}, {"ckpt/bytes": b})) if r.claim is ckpt][0]
    assert row.verdict == verdict
    assert f"({gap}, unrounded)" in row.diff_text and "threshold ±1%" in row.diff_text  # shown in the row
    assert f"relative gap {gap}, threshold ±1%" in row.why


def test_matched_fixture_reports_the_match(collected, tmp_path):
    m = collected.matrix_runs.assign(**{"match.by": "total", "match.tolerance": "0.03"})
    md = write_report(dataclasses.replace(collected, matrix_runs=m), tmp_path, figures=False).read_text()
    row = table_rows(md, "## Claims vs measured")["Same total parameters (M)"]
    assert row["verdict"] == "**supported**" and "matched on total params within ±3%" in row["A vs B"]


# ----------------------------------------------------------------------------- compute to target


def _curves(arm, seed, tokens, losses):
    return pd.DataFrame(
        {
            "run_id": f"{arm}-{seed}",
            "arm": arm,
            "seed": seed,
            "step": range(len(tokens)),
            "loss": losses,
            "tokens": tokens,
            "flops": np.asarray(tokens, float) * 10.0,
            "seconds": np.asarray(tokens, float) / 1000,
        }
    )


def test_reach_interpolates_between_evals():
    assert reach([0, 100, 200, 300], [5.0, 4.0, 3.0, 2.5], 3.2) == pytest.approx(180.0, rel=1e-12)
    assert reach([0, 100], [5.0, 4.0], 3.0) != reach([0, 100], [5.0, 4.0], 3.0)  # never reached: NaN
    assert reach([0, 100], [3.0, 2.0], 4.0) == 0.0


def test_compute_to_target_equals_hand_interpolation():
    cur = pd.concat(
        [
            _curves("kimi+muon", 0, [0, 100, 200, 300], [5.0, 4.0, 3.0, 2.5]),
            _curves("kimi+muon", 1, [0, 100, 200, 300], [5.0, 4.2, 3.1, 2.6]),
            _curves("gpt+adamw", 0, [0, 100, 200, 300], [5.0, 4.5, 3.6, 3.2]),
            _curves("gpt+adamw", 1, [0, 100, 200, 300], [5.0, 4.4, 3.5, 3.1]),
        ]
    )
    t = to_target(cur, "kimi+muon", "gpt+adamw", "tokens")
    assert t.target == 3.2  # the worse arm's (worst seed's) final loss
    # by hand: kimi s0 crosses 3.2 between (100, 4.0) and (200, 3.0): 100 + 0.8/1.0*100 = 180
    #          kimi s1 between (100, 4.2) and (200, 3.1): 100 + 1.0/1.1*100; gpt s0 at 300; gpt s1 between
    #          (200, 3.5) and (300, 3.1): 200 + 0.3/0.4*100 = 275
    a = [180.0, 100 + 1.0 / 1.1 * 100]
    b = [300.0, 275.0]
    assert t.per_seed.a.tolist() == pytest.approx(a, rel=1e-12)
    assert t.per_seed.b.tolist() == pytest.approx(b, rel=1e-12)
    r = [x / y for x, y in zip(a, b, strict=True)]
    assert t.multiplier.mean == pytest.approx(math.sqrt(r[0] * r[1]), rel=1e-12)
    lr = np.log(r)
    half = 12.706204736174698 * lr.std(ddof=1) / math.sqrt(2)  # t(0.975, 1)
    assert t.multiplier.low == pytest.approx(math.exp(lr.mean() - half), rel=1e-9)
    assert t.multiplier.high == pytest.approx(math.exp(lr.mean() + half), rel=1e-9)
    f = to_target(cur, "kimi+muon", "gpt+adamw", "flops")
    assert f.per_seed.a.tolist() == pytest.approx([10 * x for x in a], rel=1e-12)


def test_eval_curves_read_tokens_and_flops_at_eval_steps():
    hist = pd.DataFrame(
        [
            *[("r", "a+x", 0, "val/loss", s, v, 0) for s, v in ((0, 5.0), (10, 4.0), (20, 3.0))],
            *[("r", "a+x", 0, "train/tokens", s, 64.0 * s, 0) for s in (5, 15, 20)],
            *[("r", "a+x", 0, "train/elapsed_s", s, 0.5 * s, 0) for s in (5, 15, 20)],
        ],
        columns=["run_id", "arm", "seed", "key", "step", "value", "timestamp"],
    )
    runs = pd.DataFrame({"run_id": ["r"], "train/flops_per_token": [1000.0]})
    cur = eval_curves(hist, runs)
    assert cur.tokens.tolist() == [0.0, 640.0, 1280.0]
    assert cur.flops.tolist() == [0.0, 640e3, 1280e3]
    assert cur.seconds.tolist() == [0.0, 5.0, 10.0]


@pytest.mark.slow
def test_fitted_multiplier_recovers_a_known_multiplier():
    """A needs k = 2.5x less compute than B for any loss: L_A(C) = L_B(k C). Three sizes x three seeds with
    0.3% noise; the fitted curves give C_A / C_B = 1 / k = 0.4 within 5%."""
    rng = np.random.default_rng(1)
    k, a, b, c = 2.5, 2.0, 0.3, 1.5
    rows = []
    for size, compute in zip(("tiny", "small", "paper"), (1e15, 1e16, 1e17), strict=True):
        for seed in range(3):
            for arm, mult in (("kimi+muon", k), ("gpt+adamw", 1.0)):
                loss = a * (mult * compute / 1e16) ** -b + c
                rows.append(
                    {
                        "arm": arm,
                        "size": size,
                        "seed": seed,
                        "compute": compute,
                        "loss": loss * (1 + 0.003 * rng.standard_normal()),
                    }
                )
    f = fitted_multiplier(pd.DataFrame(rows), "kimi+muon", "gpt+adamw")
    assert f.n_sizes == 3
    assert f.multiplier == pytest.approx(1 / k, rel=0.05)
    assert f.low < f.multiplier < f.high
    assert f.fit_b.b == pytest.approx(b, rel=0.25)


def test_fitted_interval_keeps_resamples_where_a_curve_never_reaches_the_target(monkeypatch):
    """A refit of arm A that flattens above the target needs unbounded compute: the resample's ratio is inf and
    stays in the interval (dropping it, as before, moved the upper bound under 1 and made 'A needs less' look
    supported). Scripted fits: the two full fits, then per resample A's and B's; every 4th A refit misses."""
    from reports import compute

    reaches = compute.PowerLaw(a=1.0, b=0.5, c=2.0, c0=1.0)  # reaches loss 2.5 at compute 4
    calls = {"n": 0}

    def scripted_fit(c, loss):
        calls["n"] += 1
        i = calls["n"] - 3  # 0, 1: A and B of resample 0, ...
        if i >= 0 and i % 2 == 0 and (i // 2) % 4 == 0:
            return compute.PowerLaw(a=1.0, b=0.5, c=2.6, c0=1.0)  # A's refit: asymptote above the target
        return reaches

    monkeypatch.setattr(compute, "fit_power_law", scripted_fit)
    points = pd.DataFrame(
        [
            {"arm": arm, "size": size, "seed": seed, "compute": 10.0**k, "loss": 3.0}
            for arm in ("kimi+muon", "gpt+adamw")
            for k, size in enumerate(("s", "m", "l"))
            for seed in (0, 1)
        ]
    )
    f = fitted_multiplier(points, "kimi+muon", "gpt+adamw", target=2.5, n_boot=200)
    assert f.multiplier == pytest.approx(1.0)
    assert f.n_resamples == 200 and f.n_unreached == 50  # resamples 0, 4, 8, ...
    assert f.high == math.inf and f.low == pytest.approx(1.0)  # 25% of the mass at inf: above the 97.5% point
    row_text = f"[{cl.fmt(f.low)}, {cl.fmt(f.high)}]"
    assert row_text == "[1.000, inf]"


def test_holm_by_hand():
    # p = (0.01, 0.04, 0.03, nan): sorted 0.01 x 3, 0.03 x 2, 0.04 x 1 -> 0.03, 0.06, 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(holm([0.01, 0.04, 0.03, float("nan")])[3])


def test_identical_arms_are_folded(collected, tmp_path):
    c = collected
    clip = c.runs[c.runs.arm.eq("kimi+muon")].assign(arm="kimi+muonclip", optimizer="muonclip")
    cur = pd.DataFrame(
        {
            "run_id": ["x", "y"],
            "arm": ["kimi+muon", "kimi+muonclip"],
            "seed": [0, 0],
            "step": [5, 5],
            "loss": [2.0, 2.0],
        }
    )
    assert cl.identical_arms(cur) == {"kimi+muonclip": "kimi+muon"}
    assert cl.identical_arms(cur.assign(loss=[2.0, 2.0001])) == {}
    assert len(clip) == 3
    # an extra seed of the muonclip arm (seed 1, not run for muon) does not undo the fold: the shared seed decides
    extra = pd.concat(
        [cur, pd.DataFrame({"run_id": ["z"], "arm": ["kimi+muonclip"], "seed": [1], "step": [5], "loss": [2.3]})]
    )
    assert cl.identical_arms(extra) == {"kimi+muonclip": "kimi+muon"}
    # ... but a shared seed that differs does
    differs = pd.concat(
        [extra, pd.DataFrame({"run_id": ["w"], "arm": ["kimi+muon"], "seed": [1], "step": [5], "loss": [2.2]})]
    )
    assert cl.identical_arms(differs) == {}


def test_curves_are_downsampled_with_first_last_and_every_eval(collected, store):
    rid = store.runs[("gpt+adamw", 0, "finished")]
    h = collected.curves(["train/loss", "val/loss"], [rid], points=5)
    train = h[h.key.eq("train/loss")].step.tolist()
    assert len(train) <= 5 and train[0] == 0 and train[-1] == 19
    assert h[h.key.eq("val/loss")].step.tolist() == [0, 5, 10, 15, 19]
    full = collected.history("train/loss", [rid]).set_index("step").value
    assert h[h.key.eq("train/loss")].set_index("step").value.to_dict() == {s: full[s] for s in train}


def test_noisy_threshold_is_the_timers_without_importing_torch(monkeypatch):
    import sys

    from reports import speed

    monkeypatch.delitem(sys.modules, "torch")  # the source-reading path (the report does not load torch)
    assert speed.noisy_threshold.__wrapped__() == NOISY_REL_IQR


def _scaling(k: float, sizes: int, noise: float, seed: int):
    """runs + curves of a scaling matrix: kimi needs 1/k of gpt's compute for any loss, `sizes` sizes x 3 seeds."""
    rng = np.random.default_rng(seed)
    runs, curves = [], []
    for i in range(sizes):
        size, compute = f"s{i}", 1e15 * 10 ** (i * 2 / max(sizes - 1, 1))
        for s in range(3):
            for arm, mult in (("kimi+muon", k), ("gpt+adamw", 1.0)):
                rid = f"{arm}-{size}-{s}"
                variant, opt = arm.split("+")
                runs.append(
                    {"run_id": rid, "arm": arm, "variant": variant, "optimizer": opt, "preset": size, "seed": s}
                )
                loss = (2.0 * (mult * compute / 1e16) ** -0.3 + 1.5) * (1 + noise * rng.standard_normal())
                curves.append(
                    {
                        "run_id": rid,
                        "arm": arm,
                        "seed": s,
                        "step": 100,
                        "loss": loss,
                        "tokens": compute / 1e6,
                        "flops": compute,
                        "seconds": compute / 1e12,
                    }
                )
    return pd.DataFrame(runs), pd.DataFrame(curves)


def test_fitted_rows_are_exploratory_and_need_four_sizes():
    runs, curves = _scaling(2.0, 3, 0.002, 2)
    rows = cl.fitted_rows(runs, curves, {})
    assert len(rows) == 1 and rows[0].verdict == "exploratory" and rows[0].exploratory
    assert "not read: 3 sizes (needs 4" in rows[0].diff_text
    runs, curves = _scaling(2.0, 4, 0.002, 2)
    rows = cl.fitted_rows(runs, curves, {})
    assert len(rows) == 1 and rows[0].label == "fit over 4 sizes" and rows[0].verdict == "exploratory"
    assert rows[0].decide is None and not math.isfinite(rows[0].p)  # outside the Holm family
    mult = float(rows[0].diff_text.split("×")[1].split(" ")[0])
    assert mult == pytest.approx(1 / 2.0, rel=0.05)
    assert "cluster bootstrap over seed ids 0, 1, 2" in rows[0].diff_text
    assert "exploratory reading: interval below 1" in rows[0].diff_text


def test_fitted_rows_give_no_reading_where_the_fit_extrapolates():
    """kimi already beats the target at its smallest size: the multiplier would be read off an extrapolation."""
    runs, curves = _scaling(1e3, 4, 0.002, 3)
    rows = cl.fitted_rows(runs, curves, {})
    assert len(rows) == 1 and rows[0].verdict == "exploratory"
    assert "the point fit extrapolates: kimi+muon" in rows[0].diff_text
    assert "resamples extrapolate" in rows[0].diff_text  # checked on every resample
    assert "exploratory reading: no reading" in rows[0].diff_text


def test_an_interval_that_touches_zero_is_no_reading(monkeypatch):
    """scaling-cpu's 'FLOPs ×0.08705 [0, 0.1708] ... supported': B's refit misses the target on some resamples
    (ratio 0), so the interval touches 0; that is no reading, not 'A needs less'. Scripted fits as above: every
    8th resample B's refit flattens above the target."""
    from reports import compute

    reaches = compute.PowerLaw(a=1.0, b=0.5, c=2.0, c0=100.0)  # loss 2.5 at C = 400, inside [1, 1000]
    calls = {"n": 0}

    def scripted_fit(c, loss):
        calls["n"] += 1
        i = calls["n"] - 3
        if i >= 0 and i % 2 == 1 and (i // 2) % 8 == 0:
            return compute.PowerLaw(a=1.0, b=0.5, c=2.6, c0=100.0)  # B's refit: asymptote above the target
        return reaches

    monkeypatch.setattr(compute, "fit_power_law", scripted_fit)
    points = pd.DataFrame(
        [
            {"arm": arm, "size": size, "seed": s, "compute": 10.0**k, "loss": 3.0}
            for arm in ("kimi+muon", "gpt+adamw")
            for k, size in enumerate(("a", "b", "c", "d"))
            for s in (0, 1)
        ]
    )
    f = compute.fitted_multiplier(points, "kimi+muon", "gpt+adamw", target=2.5, n_boot=200)
    assert f.n_resamples == 200 and f.n_unreached == 25 and f.low == 0.0
    assert "exploratory reading: no reading" in cl.fitted_text(f)


def test_cluster_bootstrap_uses_only_seeds_shared_by_both_arms_and_all_sizes():
    from reports.compute import shared_seeds

    pts = pd.DataFrame(
        [{"arm": arm, "size": size, "seed": s} for arm in ("A", "B") for size in ("x", "y") for s in (0, 1, 2)]
        + [{"arm": "A", "size": "x", "seed": 3}, {"arm": "B", "size": "x", "seed": 4}]
    )
    pts = pts[~((pts.arm == "B") & (pts["size"] == "y") & (pts.seed == 2))]  # B lacks seed 2 at size y
    assert shared_seeds(pts, ("A", "B")) == [0, 1]
