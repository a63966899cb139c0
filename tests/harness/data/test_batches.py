"""harness/data/batches.py: training windows from (seed, step) and the fixed val blocks."""

import numpy as np
import pytest
import torch

from harness.data import TokenBatches, n_val_tokens, val_batches
from harness.errors import UserError

TOKENS = (np.arange(10_000) * 7 % 60_000).astype(np.uint16)


def test_batches_deterministic_shifted_and_seeded():
    b = TokenBatches(TOKENS, block_size=16, micro_batch_size=4, seed=1)
    x, y = b.get(3)
    assert x.dtype == torch.long and x.shape == y.shape == (4, 16)
    x2, y2 = TokenBatches(TOKENS, 16, 4, seed=1).get(3)  # a fresh object: no state needed to resume
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    for row, start in enumerate(b.offsets(3)[:4]):  # rows are the windows at the step's offsets
        assert torch.equal(x[row], torch.from_numpy(TOKENS[start : start + 16].astype(np.int64)))
        assert torch.equal(y[row], torch.from_numpy(TOKENS[start + 1 : start + 17].astype(np.int64)))
    assert not torch.equal(x, TokenBatches(TOKENS, 16, 4, seed=2).get(3)[0])
    assert not torch.equal(x, b.get(4)[0])


def test_grad_accum_equals_ranks():
    one = TokenBatches(TOKENS, 8, 3, grad_accum=2, seed=5, world_size=1)
    two = TokenBatches(TOKENS, 8, 3, grad_accum=1, seed=5, world_size=2)
    for step in (0, 7):
        for m in range(2):
            assert torch.equal(one.get(step, micro=m)[0], two.get(step, micro=0, rank=m)[0])
    # 2 ranks x 2 micro-steps: rank r, micro m takes global rows (m * 2 + r) * B
    four = TokenBatches(TOKENS, 8, 3, grad_accum=2, seed=5, world_size=2)
    rows = np.concatenate([four.offsets(7)[(m * 2 + r) * 3 :][:3] for m in range(2) for r in range(2)])
    np.testing.assert_array_equal(np.sort(rows), np.sort(four.offsets(7)))


def test_batches_errors():
    with pytest.raises(UserError):
        TokenBatches(TOKENS[:10], block_size=16, micro_batch_size=2)
    with pytest.raises(ValueError):
        TokenBatches(TOKENS, 16, 2, grad_accum=2).get(0, micro=2)


def test_val_batches_cover_split_in_order():
    val = np.arange(1000, dtype=np.uint16)
    xs, ys = zip(*val_batches(val, block_size=10, batch_size=16), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert [len(t) for t in xs] == [16] * 6 + [3]  # 99 blocks: (1000 - 1) // 10
    assert n_val_tokens(val, 10) == x.numel() == 990
    assert torch.equal(x.flatten(), torch.arange(990)) and torch.equal(y.flatten(), torch.arange(1, 991))
    capped = list(val_batches(val, 10, 4, max_tokens=95))
    assert n_val_tokens(val, 10, max_tokens=95) == 90 == sum(b[0].numel() for b in capped)
    assert torch.equal(torch.cat([b[0] for b in capped]).flatten(), torch.arange(90))
    shards = [list(val_batches(val, 10, 16, rank=r, world_size=2)) for r in range(2)]
    assert sum(len(s) for s in shards) == 7 and torch.equal(shards[1][0][0], xs[1])
    with pytest.raises(UserError):
        list(val_batches(val[:5], 10, 4))
