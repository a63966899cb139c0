"""The learning-rate schedule of a trial: linear warmup, then cosine to min_ratio (nanoGPT's shape) or
warmup-stable-decay (a constant stable phase whose losses compare across arms and token counts)."""

from __future__ import annotations

import math


def lr_factor(
    progress: float, warmup: float, min_ratio: float, schedule: str = "cosine", cooldown: float = 0.2
) -> float:
    """Linear warmup over the first `warmup` fraction, then cosine from 1 to min_ratio (nanoGPT's shape), or with
    schedule="wsd" (warmup-stable-decay) 1 until the last `cooldown` fraction, then linear down to min_ratio: every
    arm sits at the same constant learning rate through the stable phase, so losses read there compare across
    arms and token counts (reports/compute.py reads compute to target there)."""
    if progress < warmup:
        return (progress + 1e-12) / warmup if warmup > 0 else 1.0
    if schedule == "wsd":
        start = 1.0 - cooldown
        if progress <= start:
            return 1.0
        return 1.0 - (1.0 - min_ratio) * min(1.0, (progress - start) / max(cooldown, 1e-12))
    span = max(1e-12, 1.0 - warmup)
    decay = min(1.0, (progress - warmup) / span)
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * decay))
