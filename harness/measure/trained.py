"""Trained checkpoints outside a matrix: load one (ours or nanoGPT's), sample text from it, benchmark it.
Weights only: `torch.load(weights_only=True)`, so no pickled code ever runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from harness import schema
from harness.errors import UserError

# Data of a checkpoint that does not say what it was trained on (a nanoGPT ckpt.pt): GPT-2's tokenizer.
FALLBACK_DATA = {"corpus": "python-stdlib", "tokenizer": "gpt2"}


@dataclass
class TrainedModel:
    """A model rebuilt from a checkpoint, with what is needed to describe it."""

    model: Any  # torch.nn.Module (torch is imported only when a checkpoint is loaded)
    variant: str
    dims: Any  # harness.spec.registry.ModelDims
    data: dict[str, Any] | None  # the trial's data fields (tokenizer), None for foreign checkpoints


def load_trained(path: Path) -> TrainedModel:
    """Our `model.pt` (weights only: no pickled code runs) or a nanoGPT `ckpt.pt`, rebuilt on the CPU."""
    import torch

    from harness.spec.registry import ModelDims, build_model

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"--checkpoint: no file at {path}; pass runs/<experiment>/<trial>/model.pt or a nanoGPT ckpt.pt"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"--checkpoint: {path} is not a loadable weights-only checkpoint ({type(e).__name__})"
        ) from None
    if isinstance(payload, dict) and "model_args" in payload:  # nanoGPT's ckpt.pt
        from arch.gpt import load_nanogpt_checkpoint

        model = load_nanogpt_checkpoint(path)
        return TrainedModel(model, "gpt", None, None)
    if not isinstance(payload, dict) or "variant" not in payload:
        raise UserError(f"--checkpoint: {path} is neither a kimi-bench model.pt nor a nanoGPT ckpt.pt")
    dims = ModelDims(**payload["dims"])
    model = build_model(payload["variant"], dims)
    model.load_state_dict(payload["model"])
    return TrainedModel(model, payload["variant"], dims, payload.get("data"))


def load_checkpoint(path: Path, device: str):
    """-> (model on `device`, the DataConfig fields it was trained with or None)."""
    trained = load_trained(path)
    return trained.model.to(device), trained.data


def sample_text(
    checkpoint: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    tokenizer: str | None,
    cache_dir: str | None,
    device: str,
    console: Console,
) -> str:
    """Continue `prompt` with the checkpoint's model and tokenizer (KV cache), seeded."""
    import torch

    from arch.common import generate as generate_tokens
    from harness.data.bar import prepare_data

    model, data_fields = load_checkpoint(checkpoint, device)
    fields: dict[str, Any] = dict(data_fields or FALLBACK_DATA)
    if tokenizer:
        fields["tokenizer"] = tokenizer
    data = prepare_data(fields, cache_dir, console)
    idx = torch.tensor([data.tokenizer.encode(prompt) or [0]], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate_tokens(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return data.tokenizer.decode(out[0].tolist())


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise UserError(f"--batch-sizes: {text!r} is not a comma-separated list of integers; e.g. 1,8") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-sizes: every size must be >= 1, got {text!r}")
    return sizes


def benchmark_table(checkpoint: Path, batch_sizes: str, new_tokens: int, device: str, repeats: int) -> Table:
    """Prefill / decode tokens/s, time to first token, KV and checkpoint bytes of one checkpoint."""
    import torch

    from harness.measure.inference import benchmark_inference

    sizes = parse_batch_sizes(batch_sizes)
    model, _ = load_checkpoint(checkpoint, device)
    amp = torch.bfloat16 if device.startswith("cuda") else None
    result = benchmark_inference(
        model, model.config.vocab_size, model.config.block_size, sizes, new_tokens, repeats=repeats, autocast_dtype=amp
    )
    result[schema.CKPT_BYTES] = checkpoint.stat().st_size
    table = Table(title=f"inference: {checkpoint}", header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:,.4g}")
    return table
