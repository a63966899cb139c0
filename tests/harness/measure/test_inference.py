"""`benchmark_inference` (kimi-bench bench-infer): the one timer's medians with spread, a real cache's bytes."""

import dataclasses

import pytest
import torch

from arch.counting import kv_cache_bytes_per_token
from harness.measure.inference import InferenceShape, benchmark_inference
from harness.spec.registry import build_model, resolve_dims


def test_inference_shape_leaves_room_for_the_decode_steps():
    assert InferenceShape.for_block(64, 32) == InferenceShape(prompt_len=32, new_tokens=32)
    assert InferenceShape.for_block(64, 100) == InferenceShape(prompt_len=32, new_tokens=32)  # <= block / 2
    assert InferenceShape.for_block(64, 8, prompt_len=10) == InferenceShape(prompt_len=10, new_tokens=8)


@pytest.mark.parametrize("variant", ["gpt", "kimi"])
def test_benchmark_inference_keys_spread_and_cache_bytes(variant):
    dims = dataclasses.replace(resolve_dims("tiny", 256), block_size=32)
    model = build_model(variant, dims)
    out = benchmark_inference(model, 256, 32, batch_sizes=(1, 2), new_tokens=4, repeats=1, min_run_time=0.005)
    for key in (
        "infer/prefill_tokens_per_s",
        "infer/ttft_s",
        "infer/decode_tokens_per_s",
        "infer/decode_tokens_per_s_b2",
    ):
        assert out[key] > 0 and out[f"{key}_iqr"] >= 0 and out[f"{key}_n"] >= 1, key
    assert out["infer/prefill_tokens_per_s"] == pytest.approx(28 / out["infer/ttft_s"])  # prompt 32 - 4
    assert out["infer/kv_bytes_per_token"] == kv_cache_bytes_per_token(model, 4)
    assert model.training  # its mode is restored
    assert not torch.is_inference_mode_enabled()
