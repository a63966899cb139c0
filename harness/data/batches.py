"""Batch streams: random training windows that depend only on (seed, step), and the fixed val blocks."""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from harness.errors import UserError


class TokenBatches:
    """Random training windows that depend only on (seed, step): each step draws the GLOBAL
    micro_batch_size * grad_accum * world_size offsets from a generator seeded with (seed, step); rank r,
    micro-step m takes rows [(m * world_size + r) * B, +B). So 1 process x grad_accum 2 sees exactly the
    rows of 2 ranks x grad_accum 1, and resuming at any step needs no state."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        micro_batch_size: int,
        grad_accum: int = 1,
        seed: int = 0,
        world_size: int = 1,
    ):
        for name, v in (
            ("block_size", block_size),
            ("micro_batch_size", micro_batch_size),
            ("grad_accum", grad_accum),
            ("world_size", world_size),
        ):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise UserError(f"{name}: must be a positive integer, got {v!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed: must be an integer >= 0, got {seed!r}")
        if len(tokens) < block_size + 2:
            raise UserError(
                f"block_size: {block_size} needs at least {block_size + 2} tokens but the split "
                f"has {len(tokens)}; use a smaller block_size or more data (max_chars)"
            )
        self.tokens, self.block_size, self.micro_batch_size = tokens, block_size, micro_batch_size
        self.grad_accum, self.seed, self.world_size = grad_accum, seed, world_size
        self._step, self._offsets = None, None

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def offsets(self, step: int) -> np.ndarray:
        """All start offsets of `step` (int64 [rows_per_step]); windows are tokens[o : o + block_size + 1]."""
        step = operator.index(step)
        if step != self._step:
            if step < 0:
                raise ValueError(f"step must be >= 0, got {step}")
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))
            high = len(self.tokens) - self.block_size  # exclusive: the last window ends at the last token
            self._step, self._offsets = step, rng.integers(0, high, size=self.rows_per_step, dtype=np.int64)
        return self._offsets

    def get(self, step: int, micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) LongTensors [micro_batch_size, block_size] on the CPU; y is x shifted left by one token."""
        if not (0 <= micro < self.grad_accum and 0 <= rank < self.world_size):
            raise ValueError(
                f"micro={micro} rank={rank} out of range (grad_accum={self.grad_accum}, world_size={self.world_size})"
            )
        b, t = self.micro_batch_size, self.block_size
        start = (micro * self.world_size + rank) * b
        rows = self.offsets(step)[start : start + b]
        buf = np.stack([self.tokens[o : o + t + 1] for o in rows])
        # numpy makes the shifted int64 copies: torch's threaded copy is slower on small, busy CPUs
        return torch.from_numpy(buf[:, :-1].astype(np.int64)), torch.from_numpy(buf[:, 1:].astype(np.int64))


def _n_val_blocks(tokens: Sequence, block_size: int, max_tokens: int | None) -> int:
    n = (len(tokens) - 1) // block_size
    return n if max_tokens is None else min(n, max_tokens // block_size)


def n_val_tokens(tokens: Sequence, block_size: int, max_tokens: int | None = None) -> int:
    """How many target tokens val_batches evaluates (whole blocks: a tail shorter than a block is not)."""
    return _n_val_blocks(tokens, block_size, max_tokens) * block_size


def val_batches(
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    max_tokens: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The val split as fixed, non-overlapping, contiguous blocks in order: block k is
    x = tokens[k*T : (k+1)*T], y = tokens[k*T+1 : (k+1)*T+1], for the first n_val_tokens(...) // T blocks
    (max_tokens keeps the first blocks). Batches hold up to batch_size blocks (the last may hold fewer, so
    average losses per token, not per batch). With world_size > 1, rank r gets batches r, r + world_size..."""
    n_blocks = _n_val_blocks(tokens, block_size, max_tokens)
    if n_blocks == 0:
        raise UserError(
            f"block_size: the val split ({len(tokens)} tokens, max_tokens={max_tokens}) holds no "
            f"block of {block_size} tokens; use a smaller block_size or more val data"
        )
    for i, first in enumerate(range(0, n_blocks, batch_size)):
        if i % world_size != rank:
            continue
        n = min(batch_size, n_blocks - first)
        lo = first * block_size
        buf = torch.from_numpy(np.asarray(tokens[lo : lo + n * block_size + 1], dtype=np.int64))
        yield buf[:-1].view(n, block_size), buf[1:].view(n, block_size)
