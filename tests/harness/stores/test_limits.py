"""harness.stores.limits: how many trials a cluster runs at once, and the sqlite warning past the measured limit."""

from __future__ import annotations

from harness.stores.limits import SQLITE_MAX_WRITERS, parallel_slots, sqlite_writers_warning


def test_parallel_slots():
    assert parallel_slots({"CPU": 8.0}, {"num_cpus": 2.0, "num_gpus": 0.0}) == 4
    assert parallel_slots({"CPU": 7.0}, {"num_cpus": 2.0, "num_gpus": 0.0}) == 3  # a slot is whole
    assert parallel_slots({"CPU": 64.0, "GPU": 8.0}, {"num_cpus": 1.0, "num_gpus": 1.0}) == 8  # GPUs bound it
    assert parallel_slots({"CPU": 64.0, "GPU": 8.0}, {"num_cpus": 1.0, "num_gpus": 0.5}) == 16
    assert parallel_slots({"CPU": 64.0}, {"num_cpus": 0, "num_gpus": 0}) == 64  # DDP launcher tasks


def test_warning_only_past_the_measured_limit_and_only_for_sqlite():
    uri = "sqlite:////tmp/x/mlflow.db"
    assert sqlite_writers_warning(uri, SQLITE_MAX_WRITERS) is None
    line = sqlite_writers_warning(uri, SQLITE_MAX_WRITERS + 1)
    assert line is not None and f"{SQLITE_MAX_WRITERS + 1} trials" in line and "/tmp/x/mlflow.db" in line
    assert f"hold {SQLITE_MAX_WRITERS} writers" in line and "postgresql://" in line and "\n" not in line
    assert sqlite_writers_warning("http://127.0.0.1:5000", 1000) is None
