import dataclasses
import math
import re
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from reports.markdown import fmt, fmt_pm, write_report
from reports.stats import VERDICT_RULE, Estimate
from tests.reports.conftest import COMMAND, GIT

T2 = 0.95 * math.sqrt(2 / 0.0975)  # Student-t 0.975 quantile, 2 degrees of freedom (closed form)
REPORT_CMD = "kimi-bench report --experiment paper-test"


@pytest.fixture(scope="module")
def report(collected, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = write_report(collected, out, command=REPORT_CMD)
    return path, path.read_text()


def finished_runs(store, arm):
    """The finished runs of an arm, read straight from MLflow (not through collect)."""
    query = f"tags.`kb.arm` = '{arm}' and tags.`kb.status` = 'finished'"
    return MlflowClient(store.uri).search_runs([store.experiment_id], query)


def mlflow_finals(store, arm, key):
    return [r.data.metrics[key] for r in finished_runs(store, arm)]


def table_rows(md: str, title: str) -> dict[str, list[str]]:
    """The rows of the markdown table under heading `title`, keyed by first cell."""
    block = md.split(title, 1)[1].split("\n\n", 2)[1]
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in block.splitlines()]
    header, body = rows[0], rows[2:]
    return {r[0]: dict(zip(header, r, strict=True)) for r in body}


@pytest.mark.parametrize(
    "key", ["val/ppl_final", "train/tokens_per_s", "val/bpb", "mem/optim_state_bytes", "grad/norm_cv"]
)
def test_summary_csv_equals_mlflow(report, store, key):
    summary = pd.read_csv(report[0].parent / "summary.csv").set_index("arm")
    for arm in ("gpt+adamw", "kimi+muon"):
        vals = mlflow_finals(store, arm, key)
        assert len(vals) == 3
        mean = sum(vals) / 3
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / 2)
        row = summary.loc[arm]
        assert row[f"{key}:n"] == 3
        assert row[f"{key}:mean"] == pytest.approx(mean, rel=1e-14)
        assert row[f"{key}:ci_low"] == pytest.approx(mean - T2 * sd / math.sqrt(3), rel=1e-12, abs=1e-12)
        assert row[f"{key}:ci_high"] == pytest.approx(mean + T2 * sd / math.sqrt(3), rel=1e-12, abs=1e-12)
    assert summary.loc["gpt+adamw", "trials"] == "3 finished, 1 diverged"


def test_markdown_table_numbers_equal_mlflow(report, store):
    md = report[1]
    quality = table_rows(md, "### Quality and size")
    memory = table_rows(md, "### Memory (exact bytes")
    observed = table_rows(md, "### Throughput observed during training")
    for arm in ("gpt+adamw", "kimi+muon"):
        for rows, col, key, scale in [
            (quality, "val ppl", "val/ppl_final", 1),
            (quality, "val loss", "val/loss_final", 1),
            (quality, "val bits/byte", "val/bpb", 1),
            (quality, "total params (M)", "params/total", 1e6),
            (memory, "optimizer state (MB)", "mem/optim_state_bytes", 1e6),
            (observed, "train tok/s (observed during training)", "train/tokens_per_s", 1),
        ]:
            shown = float(rows[arm][col].split(" ± ")[0])
            vals = mlflow_finals(store, arm, key)
            # documented rounding: 4 significant digits -> relative error at most 5e-4
            assert shown == pytest.approx(sum(vals) / 3 / scale, rel=5e-4), (arm, col)
    assert quality["gpt+adamw"]["trials"] == "3 finished, 1 diverged"
    assert "peak, CUDA trial (MB)" not in memory["gpt+adamw"]  # CPU trials: process RSS is not shown


def test_claims_table_verdicts(report):
    claims = table_rows(report[1], "## Claims vs measured")
    verdicts = {k: v["verdict"] for k, v in claims.items()}
    # speed claims come from the controlled speed runs (median, IQR, n), not from the trials' single shots
    assert verdicts["Kimi infers faster (decode tokens/s, batch 1)"] == "**supported**"
    # the fixture scales both arms' perplexity by the same factor per seed: the log ratio has zero spread over
    # seeds, so there is no test (never p = 0)
    assert verdicts["Kimi has lower perplexity (val ppl; bits/byte beside it)"] == "**inconclusive**"
    assert (
        "zero spread" in claims["Kimi has lower perplexity (val ppl; bits/byte beside it)"]["why (the rule's branch)"]
    )
    assert claims["Kimi has lower perplexity (val ppl; bits/byte beside it)"]["tuning"] == "one tuned (kimi+muon)"
    assert claims["Kimi is smaller on disk (checkpoint MB)"]["tuning"] == ""  # exact facts say nothing of tuning
    assert verdicts["Same total parameters (M)"] == "**not matched**"  # the fixture logs no [match]
    assert "+1.83%" in claims["Same total parameters (M)"]["A vs B"]
    assert verdicts["Kimi is smaller on disk (checkpoint MB)"] == "**supported**"
    assert verdicts["Kimi trains faster (controlled train step, tokens/s)"] == "**not supported**"
    assert verdicts["Kimi infers faster at larger batch (decode tokens/s, largest batch)"] == "**inconclusive**"
    assert verdicts["Muon reaches lower loss than AdamW (val loss)"] == "not measured"
    row = claims["Kimi infers faster (decode tokens/s, batch 1)"]
    assert row["paper (Kimi vs GPT)"] == "45.2 vs 30.3"
    assert row["A measured"] == "kimi+muon: 45.00 (IQR 1.500, n=20)"
    assert row["B measured"] == "gpt+adamw: 30.00 (IQR 1.000, n=20)"
    # the verdict comes from the paired ratio; the train step's is logged on gpt's run and read inverted
    assert row["A vs B"] == "A/B ×1.500 [1.450, 1.550], 20 paired rounds (decode_tokens_per_s_b1)"
    assert claims["Kimi trains faster (controlled train step, tokens/s)"]["A vs B"] == (
        "A/B ×0.833 [0.800, 0.862], 15 paired rounds (muon/train_tokens_per_s / adamw/train_tokens_per_s)"
    )
    assert (
        "gpt+adamw: 200.0 (IQR 50.00, n=20) **noisy**"
        in claims["Kimi infers faster at larger batch (decode tokens/s, largest batch)"]["B measured"]
    )
    assert "not comparable" in claims["Kimi has lower perplexity (val ppl; bits/byte beside it)"]["paper (Kimi vs GPT)"]
    assert VERDICT_RULE.split(" A claim of equality")[0] in report[1]
    assert "Holm" in report[1].split("## Claims vs measured")[1].split("## ")[0]


def test_paired_differences_section(report, store):
    rows = [
        line
        for line in report[1].split("## Paired differences")[1].split("##")[0].splitlines()
        if line.startswith("| kimi+muon − gpt+adamw | val/ppl_final |")
    ]
    assert len(rows) == 1
    seeds = {}
    for arm in ("kimi+muon", "gpt+adamw"):
        for r in finished_runs(store, arm):
            seeds.setdefault(r.data.tags["kb.seed"], {})[arm] = r.data.metrics["val/ppl_final"]
    d = [v["kimi+muon"] - v["gpt+adamw"] for v in seeds.values()]
    assert len(d) == 3
    mean = sum(d) / 3
    half = T2 * math.sqrt(sum((x - mean) ** 2 for x in d) / 2) / math.sqrt(3)
    m = re.search(r"\| 3 \| (\S+) \[(\S+), (\S+)\] \|", rows[0])
    shown = [float(m.group(i)) for i in (1, 2, 3)]
    assert shown == pytest.approx([mean, mean - half, mean + half], rel=5e-4)


def test_header_failed_trials_and_reproducibility(report, store, collected):
    md = report[1]
    assert md.startswith("# kimi-bench report: paper-test\n")
    assert "newest trial started 2025-06-15 15:17 UTC" in md
    assert "Trials: 7 (6 finished, 1 diverged); 1 duplicate run(s) of a trial key dropped" in md
    failed = table_rows(md, "## Trials that did not finish")
    assert failed["gpt+adamw"]["status"] == "diverged"
    assert failed["gpt+adamw"]["step (diverged at, else last logged)"] == "12"
    assert store.runs[("kimi+muon", 1, "killed")] in md
    repro = md.split("## Reproducibility")[1]
    for text in (
        REPORT_CMD,
        COMMAND,
        GIT,
        "2.13.0",
        "`cpu`",
        "d00dfeed",
        store.uri,
        f"(id {store.experiment_id})",
        "study=kimi-tune trial=7",
    ):
        assert text in repro, text


def test_figures_are_written_and_linked(report):
    path, md = report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    names = {link.split("/")[-1] for link in links}
    assert {
        "val_loss_vs_step.png",
        "val_loss_vs_tokens.png",
        "val_loss_vs_seconds.png",
        "train_loss_vs_step.png",
        "grad_norm_vs_step.png",
        "throughput.png",
        "moe_load_kimi_muon.png",
    } <= names
    for link in links:
        assert not link.startswith("/")
        assert (path.parent / link).stat().st_size > 1000


def test_report_is_byte_identical_when_written_twice(report, collected, tmp_path):
    path = write_report(collected, tmp_path, command=REPORT_CMD)
    assert path.read_bytes() == report[0].read_bytes()
    assert (tmp_path / "summary.csv").read_bytes() == (report[0].parent / "summary.csv").read_bytes()
    for png in sorted((report[0].parent / "figures").glob("*.png")):
        assert (tmp_path / "figures" / png.name).read_bytes() == png.read_bytes(), png.name


def test_claims_not_measured_come_after_the_measured_ones(report):
    verdicts = [r["verdict"] for r in table_rows(report[1], "## Claims vs measured").values()]
    measured = [v != "not measured" for v in verdicts]
    assert any(measured) and not all(measured)
    assert measured == sorted(measured, reverse=True), verdicts


def test_credentials_are_stripped_from_the_tracking_uri(collected, tmp_path):
    c = dataclasses.replace(collected, tracking_uri="https://alice:s3cr3t@mlflow.example.com:5000")
    md = write_report(c, tmp_path, figures=False).read_text()
    assert "s3cr3t" not in md and "alice" not in md
    assert "`https://mlflow.example.com:5000`" in md


def test_missing_arms_say_not_measured(collected, tmp_path):
    only_gpt = collected.runs[collected.runs.arm == "gpt+adamw"].reset_index(drop=True)
    c = dataclasses.replace(collected, runs=only_gpt)
    claims = table_rows(write_report(c, tmp_path, figures=False).read_text(), "## Claims vs measured")
    assert all(r["verdict"] == "not measured" for r in claims.values())
    cell = claims["Kimi has lower perplexity (val ppl; bits/byte beside it)"]["A vs B"]
    assert "needs kimi+muon (or kimi+muonclip) and gpt+adamw" in cell


def test_optuna_figures(collected, tmp_path):
    trials = pd.DataFrame(
        {"number": [0, 1, 2, 3], "value": [3.0, 2.5, 2.7, 2.2], "state": ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]}
    )
    from reports.plots import plot_optuna

    paths = plot_optuna(trials, tmp_path, {"optim.lr": 0.8, "optim.wd": 0.2})
    assert [p.name for p in paths] == ["optuna_history.png", "optuna_importances.png"]
    assert plot_optuna(trials.iloc[0:0], tmp_path / "none") == []


@pytest.mark.parametrize(
    "x, scale, text",
    [
        (22.837999, 1, "22.84"),
        (3.13221, 1, "3.132"),
        (1001.67, 1, "1002"),
        (74_000_000, 1e6, "74.00"),
        (0.000123, 1, "1.230e-04"),
        (0.0, 1, "0"),
        (float("nan"), 1, "n/a"),
        (float("inf"), 1, "inf"),
        (1.7976931348623157e308, 1, "inf"),
        (-1.7976931348623157e308, 1, "-inf"),  # MLflow's stored inf
    ],
)
def test_fmt(x, scale, text):
    assert fmt(x, scale) == text


def test_fmt_pm():
    assert fmt_pm(Estimate(3, 22.838, 0.29, 22.125, 23.551)) == "22.84 ± 0.71"
    assert fmt_pm(Estimate(1, 5.0, math.nan, math.nan, math.nan)) == "5.000 (n=1)"
    assert fmt_pm(Estimate(0, math.nan, math.nan, math.nan, math.nan)) == "n/a"


def test_each_row_states_the_branch_of_the_printed_rule_that_decided_it(collected, tmp_path):
    """The rule printed under the table is the rule applied: a row in the Holm family shows its adjusted p's in
    'p → Holm p' and the same numbers, compared with 0.05, in its 'why' cell. (Kimi's perplexity gets a per-seed
    wobble so that its log ratio has spread and a test.)"""
    from reports.stats import VERDICT_RULE

    runs = collected.runs.copy()
    kimi = runs.arm.eq("kimi+muon")
    runs.loc[kimi, "val/ppl_final"] *= 1 + 0.004 * runs.loc[kimi, "seed"].astype(float) ** 2
    md = write_report(dataclasses.replace(collected, runs=runs), tmp_path, figures=False).read_text()
    assert VERDICT_RULE in md and "Holm family of this table:" in md
    tested = 0
    for text, row in table_rows(md, "## Claims vs measured").items():
        cell, why = row["p → Holm p"], row["why (the rule's branch)"]
        if "→" not in cell or "exploratory" in cell:
            continue
        tested += 1
        adj = cell.split("diff ")[1].split(" → ")[1].split(";")[0]
        assert f"Holm p_diff {adj} " in why, (text, cell, why)
        below = float(adj) < 0.05
        verdict = re.sub(r", [^,]*: provisional\*\*$", "**", row["verdict"])  # the tuning marker (fairness)
        assert (verdict in ("**supported**", "**not supported**") or "real, below" in verdict) == (
            below and "different sides" not in why
        ), (text, row["verdict"], why)
    assert tested >= 1


def test_the_report_links_the_verdicts_page_when_written_in_the_repository(tmp_path):
    from reports.claims_table import _docs_link

    root = Path(__file__).resolve().parents[2]
    assert _docs_link(root / "reports" / "out" / "smoke") == "[How verdicts are decided](../../../docs/verdicts.md)"
    assert (root / "docs" / "verdicts.md").is_file()
    assert "`docs/verdicts.md`" in _docs_link(None)
