import os

import pytest
import torch

# On SIGTERM/SIGHUP and at session end, kill every process a test started (tests/reaper.py says why).
from tests.reaper import pytest_configure, pytest_unconfigure  # noqa: F401

# Tests run on 2 CPU cores beside other work: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
