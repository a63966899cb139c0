"""2 gloo processes under torchrun train exactly like 1 process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[3]


def train(tmp_path, corpus, nproc: int, grad_accum: int, variant: str, optimizer: str) -> dict:
    out = tmp_path / f"{variant}-{optimizer}-{nproc}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "tests/harness/trial/ddp_worker.py"),
        str(corpus),
        str(tmp_path / "cache"),
        str(out),
        variant,
        optimizer,
        str(grad_accum),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("variant,optimizer", [("gpt", "adamw"), ("kimi", "muonclip")])
def test_two_process_ddp_equals_one_process_same_global_batch(tmp_path, variant, optimizer):
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"word{i % 37} token{i % 11}" for i in range(6000)))
    one = train(tmp_path, corpus, nproc=1, grad_accum=2, variant=variant, optimizer=optimizer)
    two = train(tmp_path, corpus, nproc=2, grad_accum=1, variant=variant, optimizer=optimizer)
    assert len(one["losses"]) == len(two["losses"]) == 5
    for a, b in zip(one["losses"], two["losses"], strict=True):
        assert abs(a - b) <= 1e-5, (one["losses"], two["losses"])
    for key, value in one["params"].items():
        torch.testing.assert_close(torch.tensor(two["params"][key]), torch.tensor(value), rtol=0, atol=1e-5, msg=key)
