"""The MLflow UI, checked in a real browser: what `kimi-bench run` + `kimi-bench report` logged is what a
person finds in `mlflow ui`.

Headless Debian Chromium driven by Python Playwright (`bash .ci/browser-deps` installs both; Playwright's
own browser download is never used). Skips, with the reason, only when either is missing.
Screenshots: docs/img/mlflow-first-sight.png (README's "Browse the runs" shows it; this test rewrites it),
tests/artifacts/mlflow-ui.png (gitignored) and the test's tmp folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import REPO, mlflow_server, run_cli, trial_runs, write_matrix

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = REPO / "tests" / "artifacts" / "mlflow-ui.png"
FIRST_SIGHT = REPO / "docs" / "img" / "mlflow-first-sight.png"  # in the README: regenerated here, never by hand
EXPERIMENT = "browser-check"
DESCRIPTION = "browser check: gpt with adamw vs muon, tiny"
UI_TIMEOUT_MS = 60_000  # the UI is a large React bundle; on 2 busy cores the first paint takes seconds


def _chromium() -> str:
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("no chromium binary: run `bash .ci/browser-deps` (Debian package chromium, as root)")


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Python Playwright is not installed: run `bash .ci/browser-deps` (pip playwright)")
    return sync_playwright


def _fill_store(tmp_path: Path) -> tuple[str, Path, str]:
    """A tiny 4-trial matrix (gpt x adamw, muon x 2 seeds), then `kimi-bench report` on it; -> (store URI,
    report folder, the runs-page link `kimi-bench run` printed last)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # one warmup step and Muon's own learning rate: the arms train differently within 12 steps (at this size
    # their curves still nearly overlap in the screenshot)
    matrix = write_matrix(
        tmp_path / "m.toml",
        EXPERIMENT,
        optimizers=("adamw", "muon"),
        seeds=(0, 1),
        train={"steps": 12, "eval_interval": 4, "warmup_steps": 1},
        optim={"muon": {"muon_lr": 0.05}},
    )
    matrix.write_text(f'description = "{DESCRIPTION}"\n' + matrix.read_text())
    cache = ["--cache-dir", str(tmp_path / "cache")]
    ran = run_cli(
        ["run", "--matrix", str(matrix), "--tracking-uri", uri, "--out", str(tmp_path / "runs"), *cache], cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    report_dir = tmp_path / "report"
    rep = run_cli(["report", "--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(report_dir)], cwd=tmp_path)
    assert rep.returncode == 0, f"`kimi-bench report` failed:\n{rep.stdout[-3000:]}\n{rep.stderr[-3000:]}"
    assert (report_dir / "report.md").is_file()
    link = ran.stdout.strip().splitlines()[-1]
    assert link.startswith("runs: http://127.0.0.1:5000/#/experiments/"), ran.stdout[-2000:]
    return uri, report_dir, link.removeprefix("runs: http://127.0.0.1:5000")


def _assert_training_view(page) -> None:
    """The page shows MLflow's model-training experiment view, not the GenAI one (its Overview / Traces /
    Evaluation sidebar), which MLflow 3.17 opens unless the link asks for the training view."""
    page.get_by_text("Model training", exact=True).first.wait_for()
    genai = [
        name
        for name in ("Overview", "Evaluation runs", "Sessions", "Judges")
        if page.get_by_text(name, exact=True).count()
    ]
    assert not genai, f"the GenAI experiment view is showing ({genai} in the sidebar): {page.url}"
    assert "/runs" in page.url, page.url


def _shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path


def _close_assistant(page) -> None:
    """MLflow 3's assistant panel takes a third of the window; close it when it is there."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def _plotted_lines(page, metric: str) -> list[str]:
    """The drawn lines (plotly's `path.js-line` with at least two segments) of the chart titled `metric`."""
    card = page.locator('[data-testid="experiment-view-compare-runs-card"]').filter(
        has=page.get_by_text(metric, exact=True)
    )
    card.first.locator("path.js-line").first.wait_for()
    paths = card.first.locator("path.js-line").evaluate_all("els => els.map(e => e.getAttribute('d') || '')")
    return [d for d in paths if d.count("L") >= 1]


def test_mlflow_ui_shows_trials_metrics_and_report(tmp_path):
    chromium, sync_playwright = _chromium(), _playwright()
    uri, _, runs_link = _fill_store(tmp_path)

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    trials = trial_runs(client, EXPERIMENT)
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`kb.kind` = 'matrix'")
    assert len(trials) == 4 and len(parents) == 1
    parent_id = parents[0].info.run_id
    # the matrix's children: its trials and the controlled speed measurement (one run per model shape)
    speed = client.search_runs([exp.experiment_id], filter_string="tags.`kb.kind` = 'speed'")
    assert len(speed) == 1, [r.info.run_name for r in speed]  # two optimizers, one architecture: one shape
    trial_names = sorted(r.info.run_name for r in trials)
    arms = sorted({r.data.tags["kb.arm"] for r in trials})

    with mlflow_server(uri, tmp_path, command="ui") as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)

            # 1. first sight: the link `kimi-bench run` printed opens the training view's charts with, without a
            #    click, every trial by name under its arm's group and the loss curves drawn (one line per arm)
            page.goto(f"{url}{runs_link}")
            for name in trial_names:
                page.get_by_role("link", name=name, exact=True).first.wait_for()
            _close_assistant(page)
            _assert_training_view(page)
            for arm in arms:
                page.get_by_text(f"Group: {arm}", exact=True).first.wait_for()
            for metric in ("train/loss", "val/loss"):
                lines = _plotted_lines(page, metric)
                assert len(lines) >= len(arms), f"{metric}: {len(lines)} plotted line(s) for {len(arms)} arms"
            page.wait_for_timeout(1500)  # the charts' last redraw after the data came in
            FIRST_SIGHT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(FIRST_SIGHT))
            shutil.copy(FIRST_SIGHT, tmp_path / "1-first-sight.png")

            # the parent run (the report's home) and the speed run are one click away, in "Additional runs"
            page.locator("[role=gridcell]", has_text="Additional runs").locator("[role=button]").first.click()
            page.get_by_role("link", name=f"matrix {EXPERIMENT}", exact=True).first.wait_for()

            # 1b. the same view as a table: the columns a reader compares first, one row per trial
            page.goto(f"{url}{runs_link.replace('compareRunsMode=CHART', 'compareRunsMode=TABLE')}")
            for column in ("val/loss_final", "val/bpb_final", "params/total", "params/active", "train/tokens_per_s"):
                page.get_by_role("columnheader", name=column).first.wait_for()
            for name in trial_names:
                page.get_by_role("link", name=name, exact=True).first.wait_for()
            _shot(page, tmp_path, "1b-runs-table")

            # 2. a trial run: the model-metrics tab has the val/loss chart (MLflow titles it "loss" in the
            #    "val" section; its legend reads "<run name> (val/loss)")
            page.get_by_role("link", name=trial_names[0], exact=True).first.click()
            page.get_by_role("tab", name="Model metrics").click()
            page.get_by_placeholder("Search metric charts").fill("val/loss")
            page.get_by_text(f"{trial_names[0]} (val/loss)").first.wait_for()
            page.get_by_text("Step", exact=True).first.wait_for()  # the x axis: the chart has drawn
            _shot(page, tmp_path, "2-val-loss-chart")

            # 3. the parent run's page shows the matrix's description, and its matrix.toml artifact the file
            page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{parent_id}?workflowType=machine_learning")
            page.get_by_text(DESCRIPTION).first.wait_for()
            _shot(page, tmp_path, "3a-parent-description")
            page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{parent_id}/artifacts")
            page.get_by_text("matrix.toml", exact=True).first.click()
            page.get_by_text(f'description = "{DESCRIPTION}"').first.wait_for()
            page.get_by_text(f'name = "{EXPERIMENT}"').first.wait_for()
            _shot(page, tmp_path, "3b-parent-matrix-toml")

            # 4. the matrix parent run holds the report: report.md opens in the artifact viewer
            page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{parent_id}/artifacts")
            report = page.get_by_text("report.md", exact=True)
            try:
                report.first.wait_for(timeout=20_000)
            except Exception:
                _shot(page, tmp_path, "3-parent-artifacts-missing")
                listed = [a.path for a in client.list_artifacts(parent_id)]
                pytest.fail(
                    f"report.md is not an artifact of the matrix run {parent_id} (it has {listed}): "
                    "`kimi-bench report` writes its folder but does not log it to MLflow"
                )
            report.first.click()
            page.get_by_text(f"kimi-bench report: {EXPERIMENT}").first.wait_for()
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
            shutil.copy(SCREENSHOT, tmp_path / "3-report-artifact.png")
        finally:
            browser.close()

    logged = {a.path for a in client.list_artifacts(parent_id)}
    assert {"report.md", "summary.csv", "figures"} <= logged, logged
    figures = {Path(a.path).name for a in client.list_artifacts(parent_id, "figures")}
    assert "val_loss_vs_step.png" in figures, figures
