"""Generation benchmark: prefill and cached decode tokens/s, time to first token, KV-cache bytes per token.

The callables here are what the controlled speed runs (`harness.measure.speed_runs`) and `kimi-bench bench-infer` time,
with the one timer (`harness.measure.bench.timing.time_interleaved`: torch.utils.benchmark, CUDA-synchronised, warm-up,
interleaved rounds, median / IQR / n). Decode runs with the KV cache (the latent cache for MLA): one timed call
decodes `new_tokens` steps after a prompt of `prompt_len` tokens, at batch size B, and tokens/s counts the tokens
of all B sequences. Prefill and time to first token are measured at batch 1 (one request).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from harness import schema
from harness.measure.bench.timing import Timing, time_interleaved
from harness.trial.step import autocast


@dataclass(frozen=True)
class InferenceShape:
    """How one generation is measured: a prompt of prompt_len tokens, then new_tokens cached decode steps."""

    prompt_len: int
    new_tokens: int

    @classmethod
    def for_block(cls, block_size: int, new_tokens: int, prompt_len: int | None = None) -> InferenceShape:
        """The longest prompt that leaves room for the decode steps in one block (new_tokens <= block/2)."""
        new_tokens = max(1, min(new_tokens, block_size // 2))
        prompt_len = min(prompt_len or block_size - new_tokens, block_size - new_tokens)
        return cls(max(1, prompt_len), new_tokens)


def serving_copy(model: nn.Module, autocast_dtype: torch.dtype | None) -> tuple[nn.Module, torch.dtype | None]:
    """On CUDA with low precision, serve a low-precision copy of the weights, as deployments do: a cache is
    allocated in the weights' dtype, so autocast over fp32 weights would keep (and read) an fp32 cache.
    Returns (model to serve, autocast dtype still to apply)."""
    device = next(model.parameters()).device
    if autocast_dtype is not None and device.type == "cuda":
        return copy.deepcopy(model).to(autocast_dtype).eval(), None
    return model, autocast_dtype


def prefill_fn(model: nn.Module, prompt: torch.Tensor, max_len: int, amp: torch.dtype | None) -> Callable[[], object]:
    """One prefill of `prompt` into a fresh cache: its duration is the time to the first token's logits."""
    device = prompt.device

    def run() -> None:
        with torch.no_grad(), autocast(device, amp):
            cache = model.make_cache(prompt.shape[0], max_len)
            model(prompt, cache=cache)

    return run


def decode_fn(
    model: nn.Module, prompt: torch.Tensor, shape: InferenceShape, amp: torch.dtype | None
) -> Callable[[], object]:
    """`shape.new_tokens` cached decode steps after the (once prefilled) prompt. Each call rewinds the cache to
    the prompt's end, so every call decodes the same positions (the entries past it are overwritten)."""
    device, batch = prompt.device, prompt.shape[0]
    step_tokens = prompt[:, -1:].contiguous()
    with torch.no_grad(), autocast(device, amp):
        cache = model.make_cache(batch, shape.prompt_len + shape.new_tokens)
        model(prompt, cache=cache)

    def run() -> None:
        with torch.no_grad(), autocast(device, amp):
            cache.pos = shape.prompt_len
            for _ in range(shape.new_tokens):
                model(step_tokens, cache=cache)

    return run


def kv_bytes_per_token(model: nn.Module) -> float:
    """Bytes a cache of this model really holds per token (read off a one-token cache, in the served dtype)."""
    cache = model.make_cache(1, 1)
    return float(sum(layer.num_bytes() for layer in cache.layers))


def random_prompt(vocab_size: int, batch: int, length: int, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen).to(device)


def inference_fns(
    model: nn.Module, prompts: dict[int, torch.Tensor], shape: InferenceShape, amp: torch.dtype | None, prefix: str = ""
) -> dict[str, Callable[[], object]]:
    """The timed callables of one model: `{prefix}prefill` (batch 1) and `{prefix}decode_b{B}` per batch size.
    `prompts` maps each batch size B to a [B, prompt_len] prompt on the model's device."""
    one_request = next(iter(prompts.values()))[:1]
    fns: dict[str, Callable[[], object]] = {
        f"{prefix}prefill": prefill_fn(model, one_request, shape.prompt_len + shape.new_tokens, amp)
    }
    for b, prompt in prompts.items():
        fns[f"{prefix}decode_b{b}"] = decode_fn(model, prompt, shape, amp)
    return fns


def throughput(tokens: float, t: Timing) -> tuple[float, float]:
    """(tokens/s at the median time, its IQR mapped through the same formula: tokens/q1 - tokens/q3; a rate is
    monotone in the time, so these are the rate's own quartiles). A `Timing` made without its quartiles takes
    them as median -/+ IQR/2 (exact for quartiles symmetric about the median; inf when q1 would be <= 0)."""
    if t.q1_s is not None and t.q3_s is not None:
        q1, q3 = t.q1_s, t.q3_s
    else:
        q1, q3 = t.median_s - t.iqr_s / 2, t.median_s + t.iqr_s / 2
    rate = tokens / t.median_s
    spread = (tokens / q1 - tokens / q3) if q1 > 0 else float("inf")
    return rate, spread


def timed_metrics(name: str, t: Timing, tokens: float | None = None) -> dict[str, float]:
    """`name` (seconds, or tokens/s when `tokens` is given) with its `_iqr` (same unit) and `_n` siblings."""
    if tokens is None:
        return {name: t.median_s, f"{name}_iqr": t.iqr_s, f"{name}_n": float(t.n)}
    rate, spread = throughput(tokens, t)
    return {name: rate, f"{name}_iqr": spread, f"{name}_n": float(t.n)}


def inference_metrics(
    timings: dict[str, Timing], shape: InferenceShape, batch_sizes, prefix: str, key_prefix: str
) -> dict[str, float]:
    """Metrics `{key_prefix}prefill_tokens_per_s`, `ttft_s`, `decode_tokens_per_s_b{B}` from the timings of
    `inference_fns(..., prefix)`."""
    prefill = timings[f"{prefix}prefill"]
    out = {
        **timed_metrics(f"{key_prefix}prefill_tokens_per_s", prefill, shape.prompt_len),
        **timed_metrics(f"{key_prefix}ttft_s", prefill),
    }
    for b in batch_sizes:
        out.update(
            timed_metrics(
                f"{key_prefix}decode_tokens_per_s_b{b}", timings[f"{prefix}decode_b{b}"], b * shape.new_tokens
            )
        )
    return out


def benchmark_inference(
    model: nn.Module,
    vocab_size: int,
    block_size: int,
    batch_sizes=(1, 8),
    new_tokens: int = 32,
    prompt_len: int | None = None,
    repeats: int = 3,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    min_run_time: float = 0.1,
) -> dict[str, float]:
    """Inference speed of one model (`kimi-bench bench-infer`): `repeats` interleaved rounds after warm-up.

    Keys: infer/prefill_tokens_per_s, infer/ttft_s (batch 1), infer/decode_tokens_per_s (batch 1),
    infer/decode_tokens_per_s_b{N} for the other batch sizes, each with `_iqr` and `_n` siblings;
    infer/kv_bytes_per_token (measured on a real cache, in the dtype served).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    served, amp = serving_copy(model, autocast_dtype)
    shape = InferenceShape.for_block(block_size, new_tokens, prompt_len)
    try:
        prompts = {b: random_prompt(vocab_size, b, shape.prompt_len, device, seed + b) for b in batch_sizes}
        timings = time_interleaved(
            inference_fns(served, prompts, shape, amp), rounds=repeats, min_run_time=min_run_time
        )
        metrics = inference_metrics(timings, shape, batch_sizes, "", schema.INFER_PREFIX)
        out = {k.replace("decode_tokens_per_s_b1", "decode_tokens_per_s"): v for k, v in metrics.items()}
        out[schema.INFER_KV_BYTES] = kv_bytes_per_token(served)
    finally:
        model.train(was_training)
    return out
