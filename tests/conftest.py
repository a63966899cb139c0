import os

import pytest
import torch

# Tests run on 2 CPU cores beside other work: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# Matrices run by tests time their speed runs for at most 2 s past the first rounds (harness/measure.py), the
# CLI subprocesses included; tests of the timing itself pass their own cap.
os.environ.setdefault("KB_SPEED_MAX_SECONDS", "2")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
