"""A trial's evaluation: mean token NLL over the fixed validation set (perplexity, bits per byte), the largest
attention logit, and the MoE load meter whose per-expert counts become the load statistics."""

from __future__ import annotations

import math

import torch
from torch import nn

from arch.moe import moe_modules
from arch.muon import enable_max_logit_tracking
from harness import schema
from harness.data import PreparedData, val_batches
from harness.errors import UserError
from harness.spec.registry import TrialSpec
from harness.trial.dist import all_reduce_
from harness.trial.metrics import perplexity
from harness.trial.step import autocast


@torch.no_grad()
def evaluate(
    model: nn.Module, data: PreparedData, spec: TrialSpec, device: torch.device, amp: torch.dtype | None
) -> dict[str, float]:
    """Mean token NLL over the fixed val set (the first eval_tokens of the val split); max attention logit."""
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    max_logit = None
    block = spec.dims.block_size
    for i, (x, y) in enumerate(
        val_batches(data.val, block, spec.train.micro_batch_size, max_tokens=spec.train.eval_tokens)
    ):
        x, y = x.to(device), y.to(device)
        track = i == 0  # the max-logit pass costs a little: one batch is enough for a monitor
        if track:
            enable_max_logit_tracking(model, True)
        with autocast(device, amp):
            logits, _ = model(x)
        nll_sum += torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), reduction="sum"
        ).double()
        count += y.numel()
        if track:
            max_logit = _max_attention_logit(model)
            enable_max_logit_tracking(model, spec.optimizer == "muonclip")
    model.train(was_training)
    if count == 0:
        raise RuntimeError("the validation split has fewer tokens than one block; use a larger corpus")
    mean_nll = float(nll_sum) / count
    out = {schema.VAL_LOSS: mean_nll, schema.VAL_PPL: perplexity(mean_nll)}
    n_bytes = val_bytes(data, count)
    if n_bytes:
        out[schema.VAL_BPB] = bits_per_byte(mean_nll, count, n_bytes)
    if max_logit is not None:
        out[schema.ATTN_MAX_LOGIT] = max_logit
    return out


def bits_per_byte(mean_nll: float, n_tokens: int, n_bytes: int) -> float:
    """Bits per byte of text: the nats of all n_tokens predictions over the n_bytes they encode, in bits.
    Comparable across tokenizers, unlike perplexity (a byte tokenizer's token is one byte; GPT-2's ~4)."""
    return mean_nll * n_tokens / n_bytes / math.log(2)


def val_bytes(data: PreparedData, n_tokens: int) -> int | None:
    """UTF-8 bytes the first n_tokens val tokens encode; None where ids carry no text (an opaque bin: corpus),
    so such a trial logs no bits per byte rather than failing."""
    try:
        return data.val_bytes(n_tokens)
    except UserError:
        return None


def _max_attention_logit(model: nn.Module) -> float | None:
    values = [
        float(m.max_logit.max())
        for m in model.modules()
        if getattr(m, "track_max_logit", False) and getattr(m, "max_logit", None) is not None
    ]
    return max(values) if values else None


class LoadMeter:
    """Tokens routed to each expert of each MoE layer since the last read (for load stats and heatmaps)."""

    def __init__(self, model: nn.Module):
        self.layers = moe_modules(model)
        self.acc = [
            torch.zeros_like(m.last_load, dtype=torch.float64) if getattr(m, "last_load", None) is not None else None
            for m in self.layers
        ]

    def add(self) -> None:
        for i, m in enumerate(self.layers):
            if self.acc[i] is None:
                self.acc[i] = torch.zeros(m.last_load.shape, dtype=torch.float64, device=m.last_load.device)
            self.acc[i] += m.last_load.double()

    def read(self) -> list[torch.Tensor]:
        loads = [all_reduce_(a.clone()).cpu() for a in self.acc if a is not None]
        self.acc = [torch.zeros_like(a) if a is not None else None for a in self.acc]
        return loads
