"""reports/bench_report.py runs end to end on a small store (its timings are printed, not judged here): the
synthetic runs carry the curves artifact a real trial logs, and the report it times reads them."""

import pytest

from reports import bench_report

pytestmark = pytest.mark.slow


def test_the_report_benchmark_runs_on_a_small_store(tmp_path, capsys):
    bench_report.main(["--runs", "4", "--steps", "300", "--dir", str(tmp_path), "--no-server", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "4 runs x 300 steps" in out and "4 of 4 runs with a curves artifact" in out
    assert "report on sqlite:" in out and "status on sqlite:" in out
    report = (tmp_path / "out-sqlite" / "report.md").read_text()
    assert "kimi-bench report: bench-report" in report
    assert (tmp_path / "out-sqlite" / "figures" / "val_loss_vs_step.png").is_file()
