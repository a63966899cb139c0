"""What a trial writes to its folder: atomic saves (a kill never leaves half a file), the resume state it saves,
and the loss-curve figure."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness import schema


def atomic_save(obj: Any, path: Path) -> int:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def save_loss_curve(history: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for key, style in ((schema.TRAIN_LOSS, "-"), (schema.VAL_LOSS, "o-")):
        if history.get(key):
            steps, values = zip(*history[key], strict=True)
            ax.plot(steps, values, style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


HISTORY_KEYS = (schema.TRAIN_LOSS, schema.TRAIN_ELAPSED, schema.VAL_LOSS)  # kept per step in TrainState


@dataclass
class TrainState:
    """Everything a resumed trial needs besides model and optimizer weights."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    # (step, value) of train/loss, train/elapsed_s, val/loss; grad norms and tokens follow from losses' steps
    history: dict[str, list] = field(default_factory=lambda: {key: [] for key in HISTORY_KEYS})
    moe_rows: list[tuple[int, int, int, float]] = field(default_factory=list)
    last_eval: dict[str, float] = field(default_factory=dict)
    window_rates: list[float] = field(default_factory=list)
