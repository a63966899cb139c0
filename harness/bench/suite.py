"""Benchmark suite (issue 7): train-step tokens/s and MFU, MoE layer, MLA decode, Muon step, attention kernels.

    kimi-bench bench --device cuda --presets paper,gpt2-124m          (once the lead registers bench_command)
    python -m harness.bench.suite --device cuda --presets paper --out $OUT/paper.md    (same, no CLI needed)
    python -m harness.bench.suite --device cpu --presets tiny --no-compile --repeats 2 (the code path, on CPU)

Sections (each a function returning dicts, so tests and notebooks can call them alone):
  train      one optimizer step (bf16 autocast on CUDA, fp32 master weights: the trainer's recipe), eager and
             torch.compile'd; tokens/s, MFU = flops_per_token (arch/counting.py, active FLOPs) x tokens/s over
             the datasheet peak (harness.metrics.PEAK_BF16_FLOPS), phase split (fwd+bwd | clip | opt | rest),
             peak memory, host syncs per step.
  moe        the MoE layer fwd+bwd per dispatch against a dense SwiGLU with the MoE's active parameters and
             against running all experts on every token (reuses harness/bench/moe_layer.py).
  decode     cached decode at batch 1/32/128 in bf16 (tokens/s, KV bytes per token measured on the cache).
  optim      optimizer.step() alone: AdamW vs Muon, Muon split into its Newton-Schulz and AdamW groups
             (reuses harness/bench/optim_step.py).
  attention  SDPA fwd+bwd per backend for the MHA and MLA head shapes, and MLA with v padded to the qk dim.
Rows marked "proposed" time a change recommended for arch/ (see PROPOSED below), next to the current code.

Timing: CUDA events recorded around each call on the stream (no host sync inside the timed loop), after
warm-up calls (the first call, which holds compilation, is timed apart); medians of `repeats` calls, with
p10/p90 as the spread. On CPU the same loop reads time.perf_counter (CPU work is synchronous).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table
from torch import nn

from arch.common import SwiGLU, init_normal_
from arch.counting import count_params, flops_per_token, kv_cache_bytes_per_token
from arch.mla import MLA
from arch.moe import MoE, MoEConfig, grouped_mm_supported, moe_modules
from arch.muon import Muon, adjust_lr, zeropower_via_newtonschulz5
from harness.bench.moe_layer import AllExpertsMoE, fwd_bwd, fwd_only, n_params
from harness.bench.optim_step import fill_grads, ns_gflop, split_muon
from harness.errors import UserError
from harness.metrics import device_peak_flops
from harness.registry import PRESETS, VARIANTS, ModelDims, build_model, check_choice, resolve_optimizer

REPO = Path(__file__).resolve().parents[2]
RECORD_DIR = REPO / "reports" / "benchmarks"
SECTIONS = ("train", "moe", "decode", "optim", "attention")
DEFAULT_VOCAB = 50304  # GPT-2's vocabulary padded to a multiple of 64, for presets without a vocabulary
# Micro-batch (sequences of block_size tokens) per preset: nanoGPT's 12 x 1024 on a 40 GB A100, a little more on
# an 80 GB H100; tiny/small stay CPU-sized.
DEFAULT_MICRO_BATCH = {"tiny": 4, "small": 16, "paper": 16, "gpt2-124m": 16}
TARGET_DECODE_BATCH = 32


# ============================================================================ timing


class DeviceClock:
    """Timestamps on the device's timeline: CUDA events on the current stream, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a, b) -> float:
        """Milliseconds between two marks (call sync() first on CUDA)."""
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


@dataclasses.dataclass
class Stats:
    """Summary of per-call times in ms."""

    median: float
    p10: float
    p90: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        s = sorted(samples)
        q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
        return cls(median=statistics.median(s), p10=q[0], p90=q[-1], n=len(s))


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Stats:
    """Median ms of fn() over `repeats` calls after `warmup` calls; no host sync between timed calls."""
    clock = DeviceClock(device)
    for _ in range(warmup):
        fn()
    clock.sync()
    marks = []
    for _ in range(repeats):
        start = clock.mark()
        fn()
        marks.append((start, clock.mark()))
    clock.sync()
    return Stats.of([clock.ms(a, b) for a, b in marks])


def time_round_robin(fns: Sequence[Callable[[], Any]], device: torch.device, warmup: int,
                     repeats: int) -> list[Stats]:
    """time_calls for several fns, visiting each once per round so slow phases hit all alike."""
    clock = DeviceClock(device)
    for _ in range(warmup):
        for fn in fns:
            fn()
    clock.sync()
    marks: list[list] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = clock.mark()
            fn()
            marks[i].append((start, clock.mark()))
    clock.sync()
    return [Stats.of([clock.ms(a, b) for a, b in m]) for m in marks]


def count_host_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Synchronizing CUDA calls (.item(), .tolist(), bincount, nonzero, ...) made by one fn() call, as
    torch's sync debug mode reports them; None on CPU, where there is nothing to wait for."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def measure_matmul_peak(device: torch.device, repeats: int = 10) -> float:
    """Achieved FLOP/s of one large matmul (bf16 8192^3 on CUDA, fp32 512^3 on CPU) on random data: the
    ceiling a model's matmuls can reach here, beside the datasheet peak that MFU is quoted against."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    stats = time_calls(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2 * n**3 / (stats.median / 1e3)


def _autocast(device: torch.device):
    """The trainer's recipe: bf16 autocast on CUDA over fp32 weights, plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_status(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError):
        return "oom"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {first[:160]}"


# ============================================================================ PROPOSED
# Changes recommended for arch/ (which this module must not edit), implemented here so a GPU session can time
# them beside the current code. Each is checked against the current code on CPU in
# tests/harness/test_bench_suite.py.


def folded_absorbed_attention(self: MLA, q_nope, q_rope, c_all, kr_all, pos: int) -> torch.Tensor:
    """MLA._absorbed_attention with the heads folded into the query rows.

    The current code multiplies [B, H, T, c] by the cache broadcast as [B, 1, c, L]; torch.matmul expands
    and copies the cache H times for that (one [B, H, L, c] temporary per layer per step). Here the queries
    are reshaped to [B, H*T, c], so one bmm reads the latent cache once. Same math, same result."""
    B, H, T, _ = q_nope.shape
    L = c_all.size(1)
    w = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
    w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]
    q_lat = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)
    scores = (q_lat.reshape(B, H * T, self.rank) @ c_all.transpose(1, 2)
              + q_rope.reshape(B, H * T, self.rope_dim) @ kr_all.transpose(1, 2))
    scores = scores.view(B, H, T, L) * self.softmax_scale
    if T > 1:
        allowed = torch.ones(T, L, dtype=torch.bool, device=scores.device).tril(diagonal=pos)
        scores = scores.masked_fill(~allowed, float("-inf"))
    attn = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q_nope.dtype)
    o_lat = (attn.reshape(B, H * T, L) @ c_all).view(B, H, T, self.rank)
    return torch.einsum("bhtc,hdc->bhtd", o_lat, w_uv)


@contextlib.contextmanager
def proposed_mla_decode():
    """Swap MLA._absorbed_attention for folded_absorbed_attention inside the block."""
    original = MLA._absorbed_attention
    MLA._absorbed_attention = folded_absorbed_attention
    try:
        yield
    finally:
        MLA._absorbed_attention = original


@torch.no_grad()
def proposed_optimizer_step(opt: Muon) -> None:
    """A whole optimizer step on the proposed path: the AdamW groups as Muon does them, then the batched
    Muon update. The tests compare it with `opt.step()` on a copy of the model."""
    for group in opt.param_groups:
        if not group["use_muon"]:
            opt._adamw_group_step(group)
    batched_muon_step(opt)


@torch.no_grad()
def batched_muon_step(opt: Muon) -> None:
    """The Muon groups' step of `opt` (single process), batched: foreach momentum updates, one Newton-Schulz
    per group and matrix shape over the stacked matrices (a [k, m, n] batch instead of k launches of every
    kernel), foreach weight decay and update. Same state (`momentum_buffer`) and math as Muon._muon_step;
    the AdamW groups are left to Muon._adamw_group_step."""
    for group in opt.param_groups:
        if not group["use_muon"]:
            continue
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        bufs = []
        for p in params:
            state = opt.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in params]
        mu, split = group["momentum"], group["split"]
        torch._foreach_lerp_(bufs, grads, 1 - mu)
        updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        ns_dtype = getattr(torch, group["ns_dtype"]) if group["ns_dtype"] else None
        buckets: dict[tuple[int, int], list[int]] = {}
        mats = [u.reshape(-1, u.size(-2) // split, u.size(-1)) for u in updates]  # [k_i, m, n] each
        for i, m in enumerate(mats):
            buckets.setdefault((m.size(-2), m.size(-1)), []).append(i)
        lr, wd = group["lr"], group["weight_decay"]
        torch._foreach_mul_(params, 1 - lr * wd)
        for shape, idx in buckets.items():
            stacked = torch.cat([mats[i] for i in idx])
            o = zeropower_via_newtonschulz5(stacked, steps=group["ns_steps"], eps=group["ns_eps"], dtype=ns_dtype)
            o = o.to(params[idx[0]].dtype).split([mats[i].size(0) for i in idx])
            alpha = -adjust_lr(lr, group["adjust_lr_fn"], torch.Size(shape))
            torch._foreach_add_([params[i] for i in idx], [oi.view(params[i].shape) for oi, i in zip(o, idx,
                                                                                                  strict=True)],
                                alpha=alpha)


def sdpa_v_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """SDPA with v zero-padded to q's head dim and the output cut back: the same result, and eligible for
    the flash kernel, which needs equal q/k/v head dims (MLA trains with d_qk = nope + rope != d_v)."""
    dv = v.size(-1)
    if dv == q.size(-1):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.size(-1) - dv)), **kwargs)[..., :dv]


# ============================================================================ measurements


def preset_dims(preset: str, vocab_size: int | None = None) -> ModelDims:
    """A preset's dims; vocabulary: the argument, else the preset's, else DEFAULT_VOCAB."""
    base = PRESETS[check_choice("preset", preset, PRESETS)]
    return dataclasses.replace(base, vocab_size=vocab_size or base.vocab_size or DEFAULT_VOCAB)


def _micro_batch(preset: str, micro_batch: int | None) -> int:
    return micro_batch or DEFAULT_MICRO_BATCH.get(preset, 8)


def bench_train_step(variant: str, preset: str, device: str | torch.device, *, compile_model: bool = False,
                     optimizer: str = "adamw", micro_batch: int | None = None, warmup: int = 5,
                     repeats: int = 30, vocab_size: int | None = None, peak_flops: float | None = None,
                     matmul_peak: float | None = None, seed: int = 0, n_batches: int = 4) -> dict[str, Any]:
    """One training step as harness/trial.py takes it (forward + aux loss, backward, clip 1.0, step,
    zero_grad, MoE bias update), timed per phase with device marks. Batches: n_batches random token
    blocks, used in turn. MFU counts active FLOPs (arch.counting.flops_per_token at the block size)."""
    device = torch.device(device)
    dims = preset_dims(preset, vocab_size)
    B, T = _micro_batch(preset, micro_batch), dims.block_size
    row: dict[str, Any] = {"preset": preset, "variant": variant, "optimizer": optimizer,
                           "compile": bool(compile_model), "batch": B, "seq": T, "status": "ok"}
    _free(device)  # the previous configuration's cached blocks
    try:
        torch.manual_seed(seed)
        model = build_model(variant, dims).to(device)
        model.train()
        opt = resolve_optimizer(optimizer).build(model)
        if compile_model:
            torch._dynamo.reset()  # one compiled model at a time: no cache entries pile up across configs
        train_model = torch.compile(model) if compile_model else model
        moes = moe_modules(model)
        params = list(model.parameters())
        gen = torch.Generator().manual_seed(seed)
        batches = [(torch.randint(0, dims.vocab_size, (B, T), generator=gen).to(device),
                    torch.randint(0, dims.vocab_size, (B, T), generator=gen).to(device)) for _ in range(n_batches)]
        clock = DeviceClock(device)
        fpt = flops_per_token(model, T)
        counts = count_params(model)
        row.update(params_total=counts.total, params_active=counts.active, flops_per_token=fpt)

        def step(i: int, marks: list | None = None) -> None:
            mark = marks.append if marks is not None else (lambda _: None)
            x, y = batches[i % n_batches]
            mark(clock.mark())
            with _autocast(device):
                _, loss = train_model(x, y)
                total = loss + model.aux_loss
            total.backward()
            mark(clock.mark())
            nn.utils.clip_grad_norm_(params, 1.0)
            mark(clock.mark())
            opt.step()
            mark(clock.mark())
            opt.zero_grad(set_to_none=True)
            for m in moes:
                m.update_bias()
            mark(clock.mark())

        t0 = time.perf_counter()
        step(0)  # compilation happens here when compile_model
        clock.sync()
        row["first_step_s"] = time.perf_counter() - t0
        for i in range(warmup):
            step(i + 1)
        clock.sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        all_marks = []
        for i in range(repeats):
            marks: list = []
            step(i, marks)
            all_marks.append(marks)
        clock.sync()
        phase = {name: Stats.of([clock.ms(m[a], m[b]) for m in all_marks])
                 for name, (a, b) in {"step": (0, 4), "fwd_bwd": (0, 1), "clip": (1, 2), "opt": (2, 3),
                                      "rest": (3, 4)}.items()}
        st = phase["step"]
        tokens_per_s = B * T / (st.median / 1e3)
        row.update(step_ms=st.median, step_p10_ms=st.p10, step_p90_ms=st.p90, repeats=st.n,
                   fwd_bwd_ms=phase["fwd_bwd"].median, clip_ms=phase["clip"].median, opt_ms=phase["opt"].median,
                   rest_ms=phase["rest"].median, tokens_per_s=tokens_per_s, model_tflops=fpt * tokens_per_s / 1e12)
        row["mfu"] = fpt * tokens_per_s / peak_flops if peak_flops else None
        fb_tokens_per_s = B * T / (phase["fwd_bwd"].median / 1e3)
        row["mfu_fwd_bwd"] = fpt * fb_tokens_per_s / peak_flops if peak_flops else None
        row["of_matmul_peak"] = fpt * tokens_per_s / matmul_peak if matmul_peak else None
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        row["host_syncs"] = count_host_syncs(lambda: step(0), device)
        row["moe_dispatch"] = moes[0].last_dispatch if moes else None
    except Exception as e:  # one failed configuration (OOM, compile error) must not end the suite
        row["status"] = _error_status(e)
    return row


def bench_moe_layer(preset: str, device: str | torch.device, *, micro_batch: int | None = None, warmup: int = 5,
                    repeats: int = 30, seed: int = 0) -> list[dict[str, Any]]:
    """The preset's MoE layer on one micro-batch of tokens (micro_batch x block_size), fwd and fwd+bwd:
    each dispatch this device/dtype supports, a dense SwiGLU of the MoE's active width (k*inter + shared
    width: equal active parameters, router aside) and all experts on every token (nanoKimi). bf16 autocast
    over fp32 weights on CUDA (the trainer's recipe), fp32 on CPU; all MoE rows share one set of weights."""
    device = torch.device(device)
    d = preset_dims(preset)
    B, T = _micro_batch(preset, micro_batch), d.block_size
    torch.manual_seed(seed)
    cfg = dict(dim=d.dim, n_routed_experts=d.n_routed_experts, n_activated_experts=d.n_activated_experts,
               moe_inter_dim=d.moe_inter_dim, n_shared_experts=d.n_shared_experts,
               shared_inter_dim=d.shared_inter_dim, score_func=d.score_func, route_scale=d.route_scale)
    x = torch.randn(B, T, d.dim, device=device, requires_grad=True)  # backward includes the input gradient
    with _autocast(device):
        dispatches = ["loop"] + (["grouped_mm"] if grouped_mm_supported(x, d.dim, d.moe_inter_dim) else [])
    base = MoE(MoEConfig(**cfg, dispatch="loop")).to(device)
    modules: list[tuple[str, nn.Module, int]] = []
    routed_active = 3 * d.n_activated_experts * d.moe_inter_dim * d.dim
    active = n_params(base.gate) + (n_params(base.shared) if base.shared is not None else 0) + routed_active
    for dispatch in dispatches:
        moe = MoE(MoEConfig(**cfg, dispatch=dispatch)).to(device)
        moe.load_state_dict(base.state_dict())
        modules.append((f"moe/{dispatch}", moe, active))
    hidden = d.n_activated_experts * d.moe_inter_dim + base.config.shared_width * (base.shared is not None)
    dense = init_normal_(SwiGLU(d.dim, hidden)).to(device)
    modules.append((f"dense-active (hidden {hidden})", dense, n_params(dense)))
    modules.append(("all-experts (nanoKimi)", AllExpertsMoE(base), n_params(base)))

    def under_amp(fn):
        def run():
            with _autocast(device):
                fn()
        return run

    rows = []
    try:
        fb = time_round_robin([under_amp(fwd_bwd(m, x)) for _, m, _ in modules], device, warmup, repeats)
        fo = time_round_robin([under_amp(fwd_only(m, x)) for _, m, _ in modules], device, warmup, repeats)
    except Exception as e:
        return [{"preset": preset, "layer": "moe", "status": _error_status(e)}]
    dense_ms = next(s.median for (name, _, _), s in zip(modules, fb, strict=True) if name.startswith("dense"))
    all_ms = fb[-1].median
    tokens = B * T
    for (name, module, act), f, fbs in zip(modules, fo, fb, strict=True):
        rows.append({"preset": preset, "layer": name, "tokens": tokens, "params": n_params(module),
                     "active_params": act, "fwd_ms": f.median, "fwd_bwd_ms": fbs.median, "fwd_bwd_p10_ms": fbs.p10,
                     "fwd_bwd_p90_ms": fbs.p90, "tokens_per_s": tokens / (fbs.median / 1e3),
                     "vs_dense": fbs.median / dense_ms, "vs_all_experts": fbs.median / all_ms, "status": "ok",
                     "dtype": "bf16 autocast" if device.type == "cuda" else "fp32"})
    return rows


def bench_decode(variant: str, preset: str, device: str | torch.device, *, batch_sizes: Sequence[int] = (1, 32, 128),
                 prompt_len: int | None = None, new_tokens: int | None = None, warmup: int = 2, repeats: int = 10,
                 vocab_size: int | None = None, proposed: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    """Cached decode: prefill prompt_len tokens, then time new_tokens single-token steps (one timed call =
    all new_tokens steps; the cache position is rewound between calls, so every call decodes the same
    positions). The model is cast to bf16 on CUDA, so the cache is bf16 as a server would hold it (fp32 on
    CPU). KV bytes per token are read off the allocated cache and checked against arch.counting."""
    device = torch.device(device)
    dims = preset_dims(preset, vocab_size)
    P = prompt_len or dims.block_size // 2
    N = new_tokens or min(32, dims.block_size // 4)
    if dims.block_size < P + N:
        raise UserError(f"decode: prompt_len + new_tokens = {P + N} exceeds block_size {dims.block_size}; "
                        "shorten them")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    model = build_model(variant, dims).to(device=device, dtype=dtype).eval()
    kv_counted = kv_cache_bytes_per_token(model, torch.empty(0, dtype=dtype).element_size())
    impl = "proposed: folded absorb" if proposed else "current"
    rows = []
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad(), (proposed_mla_decode() if proposed else contextlib.nullcontext()):
        for b in batch_sizes:
            row: dict[str, Any] = {"preset": preset, "variant": variant, "impl": impl, "batch": b, "prompt": P,
                                   "new_tokens": N, "dtype": str(dtype).replace("torch.", ""), "status": "ok",
                                   "kv_bytes_per_token_counted": kv_counted}
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

                pre = time_calls(prefill, device, warmup=1, repeats=max(1, repeats // 2))
                st = time_calls(decode, device, warmup, repeats)
                cache_bytes = sum(layer.num_bytes() for layer in cache.layers)
                row.update(prefill_tokens_per_s=b * P / (pre.median / 1e3), step_ms=st.median / N,
                           step_p10_ms=st.p10 / N, step_p90_ms=st.p90 / N, tokens_per_s=b * N / (st.median / 1e3),
                           kv_bytes_per_token=cache_bytes / (b * (P + N)), cache_mib=cache_bytes / 2**20)
            except Exception as e:
                row["status"] = _error_status(e)
            rows.append(row)
            cache = None
            _free(device)
    return rows


def bench_optimizer_step(variant: str, preset: str, device: str | torch.device, *, warmup: int = 3,
                         repeats: int = 20, vocab_size: int | None = None, proposed: bool = True,
                         seed: int = 0) -> list[dict[str, Any]]:
    """optimizer.step() alone on the preset's model with fixed random gradients (optim_step.fill_grads):
    AdamW (fused on CUDA), Muon, and Muon's two halves as separate optimizers over the same groups
    (optim_step.split_muon), plus the proposed batched Muon step. Newton-Schulz: bf16 on CUDA, fp32 on CPU."""
    device = torch.device(device)
    dims = preset_dims(preset, vocab_size)
    torch.manual_seed(seed)
    model = build_model(variant, dims).to(device)
    fill_grads(model, seed)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for name in ("adamw", "muon"):
        row: dict[str, Any] = {"preset": preset, "variant": variant, "optimizer": name, "params": total,
                               "status": "ok"}
        try:
            opt = resolve_optimizer(name).build(model)
            row["step_ms"] = time_calls(opt.step, device, warmup, repeats).median
            if name == "muon":
                muon_part, adamw_part = split_muon(opt)
                row["muon_params"] = sum(p.numel() for g in muon_part.param_groups for p in g["params"])
                row["ns_gflop"] = ns_gflop(opt)
                row["muon_groups_ms"] = time_calls(muon_part.step, device, warmup, repeats).median
                row["adamw_groups_ms"] = time_calls(adamw_part.step, device, warmup, repeats).median
                row["ns_tflops"] = row["ns_gflop"] / row["muon_groups_ms"]  # GFLOP/ms = TFLOP/s
                if proposed:
                    row["batched_muon_groups_ms"] = time_calls(lambda part=muon_part: batched_muon_step(part),
                                                               device, warmup, repeats).median
        except Exception as e:
            row["status"] = _error_status(e)
        rows.append(row)
        model.load_state_dict(initial)  # the next optimizer starts from the same weights
    return rows


def _sdpa_backends(device: torch.device) -> list[tuple[str, Any]]:
    from torch.nn.attention import SDPBackend

    names = (["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"] if device.type == "cuda"
             else ["FLASH_ATTENTION", "MATH"])
    return [("default", None)] + [(n.lower(), getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def bench_attention(preset: str, device: str | torch.device, *, micro_batch: int | None = None, warmup: int = 3,
                    repeats: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """Causal SDPA fwd+bwd at the preset's training shape, per backend: MHA (head = dim/heads), MLA as
    trained (d_qk = nope + rope, d_v = v_head) and MLA with v padded to d_qk (sdpa_v_padded). bf16 on CUDA.
    TFLOP/s counts the causal half of 3 x 2*B*H*T^2*(d_qk + d_v) (forward + backward, model FLOPs)."""
    from torch.nn.attention import sdpa_kernel

    device = torch.device(device)
    d = preset_dims(preset)
    B, T, H = _micro_batch(preset, micro_batch), d.block_size, d.n_heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [("mha", d.dim // H, d.dim // H, False),
              ("mla", d.qk_nope_head_dim + d.qk_rope_head_dim, d.v_head_dim, False),
              ("mla v-padded (proposed)", d.qk_nope_head_dim + d.qk_rope_head_dim, d.v_head_dim, True)]
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for kind, dqk, dv, padded in shapes:
        q, k = (torch.randn(B, H, T, dqk, device=device, dtype=dtype, generator=gen).requires_grad_()
                for _ in range(2))
        v = torch.randn(B, H, T, dv, device=device, dtype=dtype, generator=gen).requires_grad_()
        grad = torch.randn(B, H, T, dv, device=device, dtype=dtype, generator=gen)
        attend = sdpa_v_padded if padded else F.scaled_dot_product_attention
        flops = 3 * 2 * B * H * T * T * (dqk + dv) / 2

        for backend_name, backend in _sdpa_backends(device):
            row = {"preset": preset, "kind": kind, "d_qk": dqk, "d_v": dv, "backend": backend_name,
                   "batch": B, "seq": T, "heads": H, "status": "ok"}
            ctx = (lambda b=backend: sdpa_kernel([b])) if backend is not None else contextlib.nullcontext

            def run(ctx=ctx, q=q, k=k, v=v, grad=grad, attend=attend):
                q.grad = k.grad = v.grad = None
                with ctx():
                    attend(q, k, v, is_causal=True).backward(grad)

            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    st = time_calls(run, device, warmup, repeats)
                row.update(fwd_bwd_ms=st.median, tflops=flops / (st.median / 1e3) / 1e12)
            except RuntimeError as e:
                reasons = [str(w.message).split(" (Triggered")[0] for w in caught
                           if "because" not in str(w.message)]
                row["status"] = "not eligible" + (f": {reasons[0][:200]}" if reasons else f": {str(e)[:80]}")
            rows.append(row)
        del q, k, v, grad
    _free(device)
    return rows


# ============================================================================ targets


@dataclasses.dataclass(frozen=True)
class Target:
    key: str
    text: str
    op: str  # ">=" or "<="
    threshold: float
    fmt: str = "{:.1%}"


TARGETS = (
    Target("mfu_gpt2", "dense GPT-2 124M (gpt @ gpt2-124m) train-step MFU, AdamW, best compile mode", ">=", 0.45),
    Target("mfu_kimi", "kimi @ paper train-step MFU, active FLOPs, AdamW, best compile mode", ">=", 0.30),
    Target("moe_vs_dense", "MoE layer fwd+bwd (best sparse dispatch) / dense SwiGLU of equal active params", "<=",
           1.5, "{:.2f}x"),
    Target("muon_share", "Muon optimizer step / train step (fastest fwd+bwd of the variant)", "<=", 0.05),
    Target("mla_decode", f"MLA decode tokens/s / MHA decode tokens/s (gpt-mla vs gpt) at batch {TARGET_DECODE_BATCH}",
           ">=", 1.0, "{:.2f}x"),
    Target("mla_kv", "MLA KV bytes/token / MHA KV bytes/token (gpt-mla vs gpt)", "<=", 0.25, "{:.3f}"),
)


def _ok(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _verdict(t: Target, scope: str, value: float | None, note: str = "") -> dict[str, Any]:
    met = None if value is None else (value >= t.threshold if t.op == ">=" else value <= t.threshold)
    return {"key": t.key, "target": t.text, "scope": scope, "measured": value,
            "measured_text": "not measured" if value is None else t.fmt.format(value),
            "threshold_text": f"{t.op} {t.fmt.format(t.threshold)}", "met": met, "note": note}


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per target and scope; a target whose rows were not measured reads "not measured"."""
    by = {t.key: t for t in TARGETS}
    train, out = _ok(results.get("train", [])), []
    for key, preset, variant in (("mfu_gpt2", "gpt2-124m", "gpt"), ("mfu_kimi", "paper", "kimi")):
        rows = [r for r in train if (r["preset"], r["variant"], r["optimizer"]) == (preset, variant, "adamw")]
        rows = [r for r in rows if r.get("mfu") is not None]
        best = max(rows, key=lambda r: r["mfu"], default=None)
        note = "" if best else "needs a CUDA run with a known peak (or --peak-tflops)"
        if best:
            note = f"{'compiled' if best['compile'] else 'eager'}; fwd+bwd alone {best['mfu_fwd_bwd']:.1%}"
        out.append(_verdict(by[key], f"{variant} @ {preset}", best["mfu"] if best else None, note))

    moe = _ok(results.get("moe", []))
    for preset in dict.fromkeys(r["preset"] for r in moe):
        rows = [r for r in moe if r["preset"] == preset]
        sparse = [r for r in rows if r["layer"].startswith("moe/")]
        best = min(sparse, key=lambda r: r["fwd_bwd_ms"])
        alle = next(r for r in rows if r["layer"].startswith("all-experts"))
        out.append(_verdict(by["moe_vs_dense"], f"MoE layer @ {preset}", best["vs_dense"],
                            f"{best['layer']}; sparse is {alle['fwd_bwd_ms'] / best['fwd_bwd_ms']:.2f}x faster "
                            "than all-experts"))
    if not moe:
        out.append(_verdict(by["moe_vs_dense"], "MoE layer", None))

    muon_rows = [r for r in train if r["optimizer"] == "muon"]
    for r in muon_rows:
        same = [x for x in train if (x["preset"], x["variant"]) == (r["preset"], r["variant"])]
        fastest = min(x["fwd_bwd_ms"] for x in same)
        share = r["opt_ms"] / (fastest + r["clip_ms"] + r["opt_ms"] + r["rest_ms"])
        note = f"eager Muon row: {r['opt_ms'] / r['step_ms']:.1%} of its own step"
        batched = [o for o in results.get("optim", []) if o.get("batched_muon_groups_ms") is not None
                   and (o["preset"], o["variant"]) == (r["preset"], r["variant"])]
        if batched:
            o = batched[0]
            est = o["batched_muon_groups_ms"] + o["adamw_groups_ms"]
            note += f"; proposed batched NS: ~{est / (fastest + r['clip_ms'] + est + r['rest_ms']):.1%}"
        out.append(_verdict(by["muon_share"], f"{r['variant']} @ {r['preset']}", share, note))
    if not muon_rows:
        out.append(_verdict(by["muon_share"], "Muon", None))

    decode = _ok(results.get("decode", []))
    pairs = 0
    for preset in dict.fromkeys(r["preset"] for r in decode):
        def pick(variant, impl="current", preset=preset):
            return {r["batch"]: r for r in decode if (r["preset"], r["variant"], r["impl"]) == (preset, variant, impl)}

        mha, mla = pick("gpt"), pick("gpt-mla")
        common = sorted(set(mha) & set(mla))
        if not common:
            continue
        pairs += 1
        b = TARGET_DECODE_BATCH if TARGET_DECODE_BATCH in common else common[-1]
        note = "" if b == TARGET_DECODE_BATCH else f"at batch {b}: batch {TARGET_DECODE_BATCH} not measured"
        folded = pick("gpt-mla", "proposed: folded absorb").get(b)
        if folded:
            ratio = folded["tokens_per_s"] / mha[b]["tokens_per_s"]
            note = (note + "; " if note else "") + f"proposed folded absorb: {ratio:.2f}x"
        out.append(_verdict(by["mla_decode"], f"gpt-mla vs gpt @ {preset}, batch {b}",
                            mla[b]["tokens_per_s"] / mha[b]["tokens_per_s"], note))
        out.append(_verdict(by["mla_kv"], f"gpt-mla vs gpt @ {preset}",
                            mla[b]["kv_bytes_per_token"] / mha[b]["kv_bytes_per_token"],
                            f"{mla[b]['kv_bytes_per_token']:,.0f} vs {mha[b]['kv_bytes_per_token']:,.0f} B/token"))
    if not pairs:
        out += [_verdict(by["mla_decode"], "gpt-mla vs gpt", None), _verdict(by["mla_kv"], "gpt-mla vs gpt", None)]
    return out


# ============================================================================ environment and output


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: device, driver, CUDA, torch, date, code version."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cuda_runtime": torch.version.cuda or "none",
        "grouped_mm": "F.grouped_mm" if hasattr(F, "grouped_mm") else "missing (MoE falls back to loop)",
    }
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    if commit:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        env["git_commit"] = commit + (" (+ uncommitted changes)" if dirty else "")
    else:  # a copy of the tree without .git (the device machine): the caller can name the commit
        env["git_commit"] = os.environ.get("KIMI_BENCH_GIT_COMMIT", "unknown (no git; set KIMI_BENCH_GIT_COMMIT)")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device"] = torch.cuda.get_device_name(device)
        env["device_detail"] = (f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                                f"{p.total_memory / 2**30:.0f} GiB")
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = smi.splitlines()[0] if smi else f"unknown (no nvidia-smi); CUDA runtime {torch.version.cuda}"
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
        env["device_detail"] = f"{torch.get_num_threads()} torch threads"
        env["driver"] = "n/a (cpu)"
    return env


def device_slug(env: dict[str, Any]) -> str:
    name = "cpu" if env["device"].startswith("cpu") else env["device"]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_record_path(env: dict[str, Any], directory: Path = RECORD_DIR) -> Path:
    """reports/benchmarks/<date>-<device-slug>.md, with -2, -3, ... when that name is taken."""
    stem = f"{env['date'][:10]}-{device_slug(env)}"
    path, n = directory / f"{stem}.md", 2
    while path.exists():
        path, n = directory / f"{stem}-{n}.md", n + 1
    return path


def _f(value: Any, spec: str = "{:,.2f}") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return spec.format(value)


def _pct(value: float | None) -> str:
    return _f(value, "{:.1%}")


# Columns per section: (header, row -> cell text). One definition feeds the console and the markdown.
COLUMNS: dict[str, list[tuple[str, Callable[[dict], str]]]] = {
    "train": [
        ("preset", lambda r: r["preset"]), ("variant", lambda r: r["variant"]), ("optim", lambda r: r["optimizer"]),
        ("compile", lambda r: "yes" if r["compile"] else "no"), ("B x T", lambda r: f"{r['batch']}x{r['seq']}"),
        ("step ms (p10-p90)", lambda r: f"{_f(r.get('step_ms'))} ({_f(r.get('step_p10_ms'), '{:.1f}')}-"
                                        f"{_f(r.get('step_p90_ms'), '{:.1f}')})"),
        ("fwd+bwd ms", lambda r: _f(r.get("fwd_bwd_ms"))), ("opt ms", lambda r: _f(r.get("opt_ms"))),
        ("tokens/s", lambda r: _f(r.get("tokens_per_s"), "{:,.0f}")),
        ("TFLOP/s", lambda r: _f(r.get("model_tflops"), "{:.3g}")), ("MFU", lambda r: _pct(r.get("mfu"))),
        ("MFU fwd+bwd", lambda r: _pct(r.get("mfu_fwd_bwd"))),
        ("of matmul peak", lambda r: _pct(r.get("of_matmul_peak"))),
        ("mem GiB", lambda r: _f(r.get("peak_mem_gib"), "{:.1f}")),
        ("syncs/step", lambda r: _f(r.get("host_syncs"), "{}")),
        ("MoE dispatch", lambda r: r.get("moe_dispatch") or ""),
        ("1st step s", lambda r: _f(r.get("first_step_s"), "{:.1f}")), ("status", lambda r: r["status"]),
    ],
    "moe": [
        ("preset", lambda r: r["preset"]), ("layer", lambda r: r["layer"]),
        ("tokens", lambda r: _f(r.get("tokens"), "{:,}")), ("params", lambda r: _f(r.get("params"), "{:,}")),
        ("active/token", lambda r: _f(r.get("active_params"), "{:,}")),
        ("fwd ms", lambda r: _f(r.get("fwd_ms"))),
        ("fwd+bwd ms (p10-p90)", lambda r: f"{_f(r.get('fwd_bwd_ms'))} ({_f(r.get('fwd_bwd_p10_ms'))}-"
                                           f"{_f(r.get('fwd_bwd_p90_ms'))})"),
        ("tokens/s", lambda r: _f(r.get("tokens_per_s"), "{:,.0f}")),
        ("vs dense", lambda r: _f(r.get("vs_dense"), "{:.2f}x")),
        ("vs all-experts", lambda r: _f(r.get("vs_all_experts"), "{:.2f}x")), ("dtype", lambda r: r.get("dtype", "")),
        ("status", lambda r: r["status"]),
    ],
    "decode": [
        ("preset", lambda r: r["preset"]), ("variant", lambda r: r["variant"]), ("impl", lambda r: r["impl"]),
        ("batch", lambda r: str(r["batch"])), ("prompt+new", lambda r: f"{r['prompt']}+{r['new_tokens']}"),
        ("ms/step (p10-p90)", lambda r: f"{_f(r.get('step_ms'), '{:.3f}')} ({_f(r.get('step_p10_ms'), '{:.3f}')}-"
                                        f"{_f(r.get('step_p90_ms'), '{:.3f}')})"),
        ("tokens/s", lambda r: _f(r.get("tokens_per_s"), "{:,.0f}")),
        ("prefill tokens/s", lambda r: _f(r.get("prefill_tokens_per_s"), "{:,.0f}")),
        ("KV B/token", lambda r: _f(r.get("kv_bytes_per_token"), "{:,.0f}")),
        ("KV B/token (counting)", lambda r: _f(r.get("kv_bytes_per_token_counted"), "{:,}")),
        ("cache MiB", lambda r: _f(r.get("cache_mib"), "{:.3g}")), ("dtype", lambda r: r["dtype"]),
        ("status", lambda r: r["status"]),
    ],
    "optim": [
        ("preset", lambda r: r["preset"]), ("variant", lambda r: r["variant"]), ("optimizer", lambda r: r["optimizer"]),
        ("params", lambda r: _f(r.get("params"), "{:,}")), ("step ms", lambda r: _f(r.get("step_ms"))),
        ("Muon groups ms", lambda r: _f(r.get("muon_groups_ms"))),
        ("AdamW groups ms", lambda r: _f(r.get("adamw_groups_ms"))),
        ("batched Muon groups ms (proposed)", lambda r: _f(r.get("batched_muon_groups_ms"))),
        ("NS GFLOP", lambda r: _f(r.get("ns_gflop"), "{:,.1f}")),
        ("NS TFLOP/s", lambda r: _f(r.get("ns_tflops"), "{:.3g}")),
        ("status", lambda r: r["status"]),
    ],
    "attention": [
        ("preset", lambda r: r["preset"]), ("kind", lambda r: r["kind"]),
        ("d_qk/d_v", lambda r: f"{r['d_qk']}/{r['d_v']}"),
        ("B x H x T", lambda r: f"{r['batch']}x{r['heads']}x{r['seq']}"),
        ("backend", lambda r: r["backend"]), ("fwd+bwd ms", lambda r: _f(r.get("fwd_bwd_ms"), "{:.3f}")),
        ("TFLOP/s", lambda r: _f(r.get("tflops"), "{:.3g}")), ("status", lambda r: r["status"]),
    ],
    "targets": [
        ("target", lambda r: r["target"]), ("scope", lambda r: r["scope"]), ("measured", lambda r: r["measured_text"]),
        ("threshold", lambda r: r["threshold_text"]),
        ("met", lambda r: {True: "yes", False: "NO", None: "n/a"}[r["met"]]), ("note", lambda r: r["note"]),
    ],
}

TITLES = {
    "targets": "Targets",
    "train": "Train step: tokens/s and MFU",
    "moe": "MoE layer: sparse dispatch vs dense of equal active params and vs all-experts",
    "decode": "MLA decode vs MHA decode (KV cache)",
    "optim": "Muon step vs AdamW step (optimizer.step() alone)",
    "attention": "Attention kernels (SDPA backends, fwd+bwd)",
}

NOTES = {
    "train": "One step = forward (bf16 autocast on CUDA) + MoE aux loss, backward, grad clip 1.0, optimizer "
             "step, zero_grad, MoE bias update (harness/trial.py's step without data loading). MFU = "
             "flops_per_token (arch/counting.py: 6 x active matmul params + attention at full T^2, nanoGPT's "
             "convention) x tokens/s / datasheet dense bf16 peak. 'MFU fwd+bwd' leaves out clip/optimizer. "
             "'of matmul peak': the same FLOP/s over the measured large-matmul rate. Muon rows run eager only "
             "(the optimizer step is never compiled). syncs/step: synchronizing CUDA calls in one step "
             "(torch sync debug mode).",
    "moe": "Same router and expert weights for every MoE row. dense-active: one SwiGLU of width "
           "top_k x inter + shared width, i.e. the MoE's active parameters without the router. all-experts: "
           "every expert on every token times a mostly-zero gate (nanoKimi's dispatch).",
    "decode": "Tokens/s counts all sequences' tokens: batch x new tokens / time of the new-token steps. KV "
              "B/token: bytes of the allocated cache / (batch x positions), all layers; 'counting' is "
              "arch.counting.kv_cache_bytes_per_token in the same dtype.",
    "optim": "Fixed random gradients; only optimizer.step() is timed. Muon/AdamW groups: the Muon optimizer's "
             "two kinds of groups stepped by two separate optimizers. NS GFLOP: exact Newton-Schulz matmul "
             "FLOPs per step.",
    "attention": "Random q, k, v (bf16 on CUDA, fp32 on CPU) at the training shape (micro-batch x heads x "
                 "block). 'not eligible': the backend refused the shape (reason from torch's warning).",
}


def _table_rows(section: str, rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = COLUMNS[section]
    return [h for h, _ in cols], [[fn(r) for _, fn in cols] for r in rows]


def print_section(console: Console, section: str, rows: list[dict]) -> None:
    headers, cells = _table_rows(section, rows)
    table = Table(title=TITLES[section], header_style="bold")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 or h in ("status", "note", "target") else "right")
    for row in cells:
        table.add_row(*row)
    console.print(table)


def _md_table(headers: list[str], cells: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    env, settings = results["env"], results["settings"]
    out = [f"# Benchmarks: {env['device']}, {env['date']}", "",
           "Written by `harness/bench/suite.py`; see reports/benchmarks/README.md for how to run it and what "
           "each target means.", "", "## Environment", ""]
    env_rows = [[k, str(v)] for k, v in env.items()]
    env_rows += [["datasheet peak (MFU denominator)", _f(settings.get("peak_flops"), "{:.4g} FLOP/s")
                  if settings.get("peak_flops") else "n/a (no datasheet entry for this device; --peak-tflops)"],
                 ["measured matmul peak", _f(settings.get("matmul_peak"), "{:.4g} FLOP/s")]]
    out += [_md_table(["what", "value"], env_rows), "", "## Command", "", "```bash", results["command"], "```", "",
            "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("peak_flops", "matmul_peak")),
            ""]
    for section in ("targets", *SECTIONS):
        out += [f"## {TITLES[section]}", ""]
        rows = results.get(section)
        if section != "targets" and section not in settings["sections"].split(","):
            out += ["Not run (section not selected).", ""]
            continue
        if not rows:
            out += ["No rows yet (the run stopped before this section finished)." if section != "targets" else
                    "No targets evaluated.", ""]
            continue
        out += [_md_table(*_table_rows(section, rows)), ""]
        if section in NOTES:
            out += [NOTES[section], ""]
    out += ["## Method", "",
            "CUDA events recorded on the stream around every timed call (no host sync inside the timed loop), "
            "after warm-up calls; the first call (compilation, cuDNN/cuBLAS autotuning) is timed apart as "
            "'1st step s'. Each number is the median of the timed calls; p10-p90 give the spread. On CPU the "
            "same loop reads time.perf_counter. TF32 is allowed for fp32 matmuls on CUDA (the trainer's "
            "setting); the models run bf16 autocast over fp32 weights except decode, which casts the model to "
            "bf16. Token ids are random (uniform over the vocabulary), so MoE routing is that of random inputs.",
            ""]
    return "\n".join(out)


def write_record(results: dict[str, Any], path: Path) -> None:
    """The markdown record and, beside it, the raw rows as JSON (<stem>.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(results))
    path.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))


# ============================================================================ the suite


def _check_list(field: str, values: Sequence[str], choices) -> list[str]:
    values = [v.strip() for v in values if v.strip()]
    if not values:
        raise UserError(f"{field}: empty; give at least one of {', '.join(choices)}")
    return [check_choice(field, v, choices) for v in values]


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device: {device!r} is not a torch device; use cuda or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: cuda is not available here; use --device cpu --presets tiny for the code path")
    if dev.type not in ("cuda", "cpu"):
        raise UserError(f"--device: {dev.type} is not supported; use cuda or cpu")
    return dev


def _default_command() -> str:
    argv = sys.argv[:]
    head = ["python", "-m", "harness.bench.suite"] if argv and argv[0].endswith("suite.py") else [Path(argv[0]).name]
    return shlex.join(head + argv[1:])


def run_suite(device: str | torch.device, presets: Sequence[str], variants: Sequence[str],
              compile_modes: Sequence[bool] = (False, True), out_md: Path | None = None, *,
              sections: Sequence[str] = SECTIONS, optimizers: Sequence[str] = ("adamw", "muon"),
              repeats: int = 30, warmup: int = 5, micro_batch: int | None = None,
              decode_batches: Sequence[int] = (1, 32, 128), prompt_len: int | None = None,
              new_tokens: int | None = None, vocab_size: int | None = None, peak_tflops: float | None = None,
              proposed: bool = True, command: str | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run the selected sections for every preset (and variant where it applies); print each section's table
    as it completes and rewrite the markdown record (+ JSON) after each, so a run cut short keeps what it
    measured. out_md None: reports/benchmarks/<date>-<device-slug>.md. Returns the results dict."""
    dev = _resolve_device(device)
    presets = _check_list("--presets", presets, PRESETS)
    variants = _check_list("--variants", variants, VARIANTS)
    sections = _check_list("--sections", sections, SECTIONS)
    optimizers = _check_list("--optimizers", optimizers, ("adamw", "muon", "muonclip"))
    compile_modes = list(dict.fromkeys(bool(c) for c in compile_modes))
    if not compile_modes:
        raise UserError("--compile/--eager: no train-step mode left; keep --eager or --compile")
    if repeats < 1 or warmup < 0:
        raise UserError("--repeats/--warmup: need repeats >= 1 and warmup >= 0")
    console = console or (Console() if sys.stdout.isatty() else Console(width=200))
    if dev.type == "cuda":  # the trainer's settings (harness/trial.py)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = environment(dev)
    peak = device_peak_flops(dev, peak_tflops)
    matmul_peak = measure_matmul_peak(dev)
    settings = {"device": str(dev), "presets": ",".join(presets), "variants": ",".join(variants),
                "compile_modes": ",".join("compiled" if c else "eager" for c in compile_modes),
                "sections": ",".join(sections), "optimizers": ",".join(optimizers), "repeats": repeats,
                "warmup": warmup, "micro_batch": micro_batch or "preset default",
                "decode_batches": ",".join(map(str, decode_batches)), "vocab_size": vocab_size or "preset default",
                "proposed_rows": proposed, "peak_flops": peak, "matmul_peak": matmul_peak}
    results: dict[str, Any] = {"env": env, "settings": settings, "command": command or _default_command()}
    path = out_md or default_record_path(env)
    console.print(f"[bold]kimi-bench suite[/] on {env['device']} ({env['device_detail']}), torch {env['torch']}, "
                  f"driver {env['driver']}; record: {path}")
    console.print(f"measured matmul peak {matmul_peak / 1e12:.3g} TFLOP/s; datasheet peak (MFU denominator) "
                  + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "n/a: MFU columns stay empty (--peak-tflops)"))

    def done(section: str, rows: list[dict]) -> None:
        results[section] = rows
        results["targets"] = evaluate_targets(results)
        print_section(console, section, rows)
        write_record(results, path)

    def progress(section: str, row: dict) -> None:
        shown = {k: v for k, v in row.items() if k in ("preset", "variant", "optimizer", "compile", "impl", "batch",
                                                       "layer", "kind", "backend", "step_ms", "tokens_per_s",
                                                       "mfu", "fwd_bwd_ms", "status")}
        console.print(f"  {section}: " + ", ".join(f"{k}={_f(v, '{:.4g}') if isinstance(v, float) else v}"
                                                   for k, v in shown.items()), highlight=False)

    for section in sections:
        rows: list[dict] = []
        for preset in presets:
            if section == "train":
                for variant in variants:
                    for optimizer in optimizers:
                        # the optimizer step is never compiled: other optimizers' rows run eager (if selected)
                        modes = compile_modes if optimizer == "adamw" else [m for m in compile_modes if not m]
                        for compiled in modes:
                            row = bench_train_step(variant, preset, dev, compile_model=compiled, optimizer=optimizer,
                                                   micro_batch=micro_batch, warmup=warmup, repeats=repeats,
                                                   vocab_size=vocab_size, peak_flops=peak, matmul_peak=matmul_peak)
                            rows.append(row)
                            progress(section, row)
            elif section == "moe":
                if not any(v in ("gpt-moe", "kimi") for v in variants):
                    continue
                for row in bench_moe_layer(preset, dev, micro_batch=micro_batch, warmup=warmup, repeats=repeats):
                    rows.append(row)
                    progress(section, row)
            elif section == "decode":
                for variant in variants:
                    has_mla = variant in ("gpt-mla", "kimi")
                    for prop in ([False, True] if proposed and has_mla else [False]):
                        for row in bench_decode(variant, preset, dev, batch_sizes=decode_batches, prompt_len=prompt_len,
                                                new_tokens=new_tokens, warmup=max(1, warmup // 2), repeats=repeats,
                                                vocab_size=vocab_size, proposed=prop):
                            rows.append(row)
                            progress(section, row)
            elif section == "optim":
                for variant in variants:
                    for row in bench_optimizer_step(variant, preset, dev, warmup=warmup, repeats=repeats,
                                                    vocab_size=vocab_size, proposed=proposed):
                        rows.append(row)
                        progress(section, row)
            elif section == "attention":
                for row in bench_attention(preset, dev, micro_batch=micro_batch, warmup=warmup, repeats=repeats):
                    rows.append(row)
                    progress(section, row)
        done(section, rows)
    results["targets"] = evaluate_targets(results)
    print_section(console, "targets", results["targets"])
    write_record(results, path)
    console.print(f"record written: {path} (+ {path.with_suffix('.json').name})")
    return results


def merge_records(json_paths: Sequence[Path], out_md: Path, console: Console | None = None) -> dict[str, Any]:
    """One record from several runs' JSON files (a GPU session splits the suite into commands under 10
    minutes): rows concatenated, targets re-evaluated over all of them (so e.g. the Muon share can use the
    compiled fwd+bwd of another run), environment of the first run, every run's command listed."""
    runs = []
    for path in json_paths:
        try:
            runs.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise UserError(f"--merge: cannot read {path} ({e}); give the .json written beside each record") from None
    devices = {r["env"]["device"] for r in runs}
    if len(devices) > 1:
        raise UserError(f"--merge: records from different devices {sorted(devices)}; merge one device at a time")
    merged: dict[str, Any] = {"env": runs[0]["env"], "command": "\n".join(r["command"] for r in runs)}
    sections = [s for s in SECTIONS if any(s in r["settings"]["sections"].split(",") for r in runs)]
    merged["settings"] = {**runs[0]["settings"], "sections": ",".join(sections),
                          "merged_from": ",".join(Path(p).name for p in json_paths)}
    for section in SECTIONS:
        merged[section] = [row for r in runs for row in r.get(section, [])]
    merged["targets"] = evaluate_targets(merged)
    write_record(merged, out_md)
    console = console or Console(width=200)
    print_section(console, "targets", merged["targets"])
    console.print(f"merged record written: {out_md}")
    return merged


# ============================================================================ CLI


def _csv(field: str, value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _csv_ints(field: str, value: str) -> list[int]:
    try:
        out = [int(v) for v in _csv(field, value)]
    except ValueError:
        out = []
    if not out or any(v < 1 for v in out):
        raise UserError(f"{field}: {value!r} is not a comma-separated list of positive integers; e.g. 1,32,128")
    return out


def bench_command(
    device: Annotated[str, typer.Option(help="cuda (the purpose) or cpu (code path, with --presets tiny)")] = "cuda",
    presets: Annotated[str, typer.Option(help="comma-separated size presets")] = "paper,gpt2-124m",
    variants: Annotated[str, typer.Option(help="comma-separated model variants")] = "gpt,gpt-mla,gpt-moe,kimi",
    compile_: Annotated[bool, typer.Option("--compile/--no-compile", help="time torch.compile'd train steps")] = True,
    eager: Annotated[bool, typer.Option("--eager/--no-eager", help="time eager train steps (Muon rows: eager)")] = True,
    repeats: Annotated[int, typer.Option(help="timed calls per measurement (median)")] = 30,
    warmup: Annotated[int, typer.Option(help="untimed calls before timing")] = 5,
    sections: Annotated[str, typer.Option(help=f"comma-separated, of {','.join(SECTIONS)}")] = ",".join(SECTIONS),
    optimizers: Annotated[str, typer.Option(help="train-step optimizers (non-adamw run eager only)")] = "adamw,muon",
    micro_batch: Annotated[int | None, typer.Option(help="sequences per step (default: per preset)")] = None,
    decode_batches: Annotated[str, typer.Option(help="decode batch sizes")] = "1,32,128",
    prompt_len: Annotated[int | None, typer.Option(help="decode prompt (default block/2)")] = None,
    new_tokens: Annotated[int | None, typer.Option(help="decode steps per timed call (default 32)")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="override the vocabulary (default: preset's or 50304)")] = None,
    peak_tflops: Annotated[float | None, typer.Option(help="MFU denominator (default: datasheet peak)")] = None,
    proposed: Annotated[bool, typer.Option("--proposed/--no-proposed",
                                           help="also time the changes proposed for arch/")] = True,
    out: Annotated[Path | None, typer.Option(help="record (default reports/benchmarks/<date>-<device>.md)")] = None,
    merge: Annotated[str | None, typer.Option(help="comma-separated .json of earlier runs: merge them into --out "
                                                   "instead of measuring")] = None,
) -> None:
    """Benchmark suite: train-step tokens/s and MFU, MoE layer, MLA decode, Muon step, attention; writes a record."""
    if merge:
        if out is None:
            raise UserError("--merge: needs --out, the merged record's path")
        merge_records([Path(p) for p in _csv("--merge", merge)], out)
        return
    modes = [False] * eager + [True] * compile_
    run_suite(device, _csv("--presets", presets), _csv("--variants", variants), modes,
              out, sections=_csv("--sections", sections), optimizers=_csv("--optimizers", optimizers),
              repeats=repeats, warmup=warmup, micro_batch=micro_batch,
              decode_batches=_csv_ints("--decode-batches", decode_batches), prompt_len=prompt_len,
              new_tokens=new_tokens, vocab_size=vocab_size, peak_tflops=peak_tflops, proposed=proposed)


def main() -> None:
    """`python -m harness.bench.suite ...`: bench_command with the CLI's one-line UserError handling."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(bench_command)
    try:
        app()
    except UserError as e:
        print(f"kimi-bench: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
