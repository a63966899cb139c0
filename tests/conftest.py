import os

import pytest
import torch

# On SIGTERM/SIGHUP and at session end, kill every process a test started (tests/reaper.py says why).
from tests.reaper import pytest_configure, pytest_unconfigure  # noqa: F401

# pytest-xdist workers get COLUMNS=80; rich would then draw the CLI's tables 80 wide (harness/console.py reads
# it when first imported) and cut the cells the tests read. A worker runs like a serial run instead.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)

# Tests run on 2 CPU cores beside other work: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# Matrices run by tests time their speed runs for at most 2 s past the first rounds (harness/measure/speed_runs.py), the
# CLI subprocesses included; tests of the timing itself pass their own cap.
os.environ.setdefault("KB_SPEED_MAX_SECONDS", "2")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
