"""Generation benchmark on a trained model: prefill and cached decode tokens/s, time to first token.

Timing: warm-up first, then medians over repeats; CUDA is synchronized around every timed region. Decode is
measured with the KV cache (latent cache for MLA) at each batch size: tokens/s counts all sequences' tokens.
"""

from __future__ import annotations

import copy
import statistics
import time
from contextlib import nullcontext

import torch
from torch import nn

from harness.metrics import synchronize


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over repeats (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def benchmark_inference(model: nn.Module, vocab_size: int, block_size: int, batch_sizes=(1, 8),
                        new_tokens: int = 32, prompt_len: int | None = None, repeats: int = 3,
                        seed: int = 0, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Prefill tokens/s (batch 1), decode tokens/s per batch size, TTFT and KV bytes per token.

    Keys: infer/prefill_tokens_per_s, infer/ttft_s, infer/decode_tokens_per_s (batch 1),
    infer/decode_tokens_per_s_b{N} for the other batch sizes, infer/kv_bytes_per_token (measured on a real
    cache, in the dtype served).
    """
    device = next(model.parameters()).device
    if autocast_dtype is not None and device.type == "cuda":
        # serve a low-precision copy, as deployments do: a cache is allocated in the weights' dtype, so autocast
        # over fp32 weights would keep (and read) an fp32 cache
        model, autocast_dtype = copy.deepcopy(model).to(autocast_dtype), None
    was_training = model.training
    model.eval()
    new_tokens = max(1, min(new_tokens, block_size // 2))
    prompt_len = prompt_len or max(1, block_size - new_tokens)
    prompt_len = min(prompt_len, block_size - new_tokens)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    out: dict[str, float] = {}
    try:
        with amp:
            for b in batch_sizes:
                prompt = torch.randint(0, vocab_size, (b, prompt_len), generator=gen).to(device)
                step_tokens = torch.randint(0, vocab_size, (b, 1), generator=gen).to(device)

                def prefill(prompt=prompt, b=b):
                    cache = model.make_cache(b, prompt_len + new_tokens)
                    model(prompt, cache=cache)
                    return cache

                def decode(prompt=prompt, step_tokens=step_tokens, b=b):
                    cache = model.make_cache(b, prompt_len + new_tokens)
                    model(prompt, cache=cache)
                    synchronize(device)
                    t0 = time.perf_counter()
                    for _ in range(new_tokens):
                        model(step_tokens, cache=cache)
                    synchronize(device)
                    return time.perf_counter() - t0

                if b == batch_sizes[0]:
                    t_prefill = _timed(prefill, device, repeats)
                    out["infer/ttft_s"] = t_prefill
                    out["infer/prefill_tokens_per_s"] = b * prompt_len / t_prefill
                decode()  # warm-up
                t_decode = statistics.median(decode() for _ in range(repeats))
                key = "infer/decode_tokens_per_s" if b == 1 else f"infer/decode_tokens_per_s_b{b}"
                out[key] = b * new_tokens / t_decode
        cache = model.make_cache(1, 1)  # the bytes a cache of this model really holds per token
        out["infer/kv_bytes_per_token"] = float(sum(layer.num_bytes() for layer in cache.layers))
    finally:
        model.train(was_training)
    return out
