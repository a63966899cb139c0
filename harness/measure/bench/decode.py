"""Section `decode`: cached decode (MLA's latent cache vs MHA's k/v cache) at several batch sizes.

The model is cast to bf16 on CUDA, so the cache is bf16 as a server would hold it (fp32 on CPU). KV bytes per
token are read off the allocated cache and set beside arch.counting's figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from arch.counting import kv_cache_bytes_per_token
from harness.errors import UserError
from harness.measure.bench.kit import TimingSettings, error_status, free_memory, ms, preset_dims, top_kernels
from harness.measure.bench.timing import time_interleaved
from harness.spec.registry import build_model


def bench_decode(
    variant: str,
    preset: str,
    device: str | torch.device,
    *,
    batch_sizes: Sequence[int] = (1, 32, 128),
    prompt_len: int | None = None,
    new_tokens: int | None = None,
    timing: TimingSettings = TimingSettings(),
    vocab_size: int | None = None,
    profile_batch: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Prefill prompt_len tokens, then time new_tokens single-token steps (one timed call = all of them; the
    cache position is rewound between calls, so every call decodes the same positions). Prefill and decode
    are timed in interleaved rounds. `profile_batch`: that batch's decode top kernels go into its row."""
    device = torch.device(device)
    dims = preset_dims(preset, vocab_size)
    P = prompt_len or dims.block_size // 2
    N = new_tokens or min(32, dims.block_size // 4)
    if dims.block_size < P + N:
        raise UserError(f"decode: prompt_len + new_tokens = {P + N} exceeds block_size {dims.block_size}; shorten them")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    model = build_model(variant, dims).to(device=device, dtype=dtype).eval()
    kv_counted = kv_cache_bytes_per_token(model, torch.empty(0, dtype=dtype).element_size())
    rows = []
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in batch_sizes:
            row: dict[str, Any] = {
                "preset": preset,
                "variant": variant,
                "batch": b,
                "prompt": P,
                "new_tokens": N,
                "dtype": str(dtype).replace("torch.", ""),
                "status": "ok",
                "kv_bytes_per_token_counted": kv_counted,
            }
            cache = None
            try:
                cache = model.make_cache(b, P + N)
                prompt = torch.randint(0, dims.vocab_size, (b, P), generator=gen).to(device)
                token = torch.randint(0, dims.vocab_size, (b, 1), generator=gen).to(device)

                def prefill(cache=cache, prompt=prompt):
                    cache.pos = 0
                    model(prompt, cache=cache)

                def decode(cache=cache, token=token):
                    cache.pos = P
                    for _ in range(N):
                        model(token, cache=cache)

                t = time_interleaved(
                    {"prefill": prefill, "decode": decode},
                    rounds=timing.rounds,
                    min_run_time=timing.min_run_time,
                    warmup=max(1, timing.warmup // 2),
                )
                st = t["decode"]
                cache_bytes = sum(layer.num_bytes() for layer in cache.layers)
                row.update(
                    prefill_tokens_per_s=b * P / t["prefill"].median_s,
                    step_ms=ms(st.median_s) / N,
                    step_iqr_ms=ms(st.iqr_s) / N,
                    noisy=st.noisy,
                    tokens_per_s=b * N / st.median_s,
                    kv_bytes_per_token=cache_bytes / (b * (P + N)),
                    cache_mib=cache_bytes / 2**20,
                )
                if b == profile_batch:
                    row["top_kernels"] = top_kernels(decode, device)
            except Exception as e:
                row["status"] = error_status(e)
            rows.append(row)
            cache = None
            free_memory(device)
    return rows
