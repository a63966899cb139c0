"""Mixture of Experts as in DeepSeek-V3 / Kimi K2: fine-grained routed SwiGLU experts + shared expert(s).

Router (`gate`), per token x with E routed experts and top-k:
    sigmoid: s = sigmoid(x W^T); chosen = topk(s + bias); g = s[chosen] / sum(s[chosen]) * route_scale
    softmax: s = softmax(x W^T); chosen = topk(s);        g = s[chosen] * route_scale   (bias unused)
The bias is a buffer used for selection only, moved by `update_bias()` (auxiliary-loss-free balancing,
DeepSeek-V3 sec. 2.1.2): b_i += gamma * sign(mean load - load_i) over the load accumulated since the last
update. An optional sequence-wise balance loss (eq. 17-20) is exposed as `aux_loss`.

Dispatch is sparse: token-slots are sorted by expert and only the routed (token, expert) pairs are
computed, either with one `torch.nn.functional.grouped_mm` per projection or with a loop over the experts
that received tokens; outputs are weighted and summed back per token with index_add. No capacity limit,
so no token is ever dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from arch.common import SwiGLU, compute_dtype

SCORE_FUNCS = ("sigmoid", "softmax")
DISPATCHES = ("auto", "grouped_mm", "loop")


@dataclass
class MoEConfig:
    dim: int
    n_routed_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    n_shared_experts: int = 1  # shared SwiGLU of width n_shared_experts * moe_inter_dim; 0 = none
    shared_inter_dim: int | None = None  # explicit shared width (nanoKimi: 768 beside 512-wide experts)
    score_func: str = "sigmoid"
    route_scale: float = 1.0
    bias_update_speed: float = 1e-3  # gamma of the aux-loss-free bias update
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (DeepSeek-V3 uses 1e-4)
    dispatch: str = "auto"

    def __post_init__(self):
        for name in ("dim", "n_routed_experts", "n_activated_experts", "moe_inter_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MoEConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.n_activated_experts > self.n_routed_experts:
            raise ValueError(
                f"MoEConfig.n_activated_experts ({self.n_activated_experts}) must be <= "
                f"n_routed_experts ({self.n_routed_experts})"
            )
        if self.n_shared_experts < 0:
            raise ValueError(f"MoEConfig.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.shared_inter_dim is not None and (self.shared_inter_dim <= 0 or self.n_shared_experts == 0):
            raise ValueError("MoEConfig.shared_inter_dim: must be > 0, with n_shared_experts >= 1")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"MoEConfig.score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"MoEConfig.dispatch must be one of {DISPATCHES}, got {self.dispatch!r}")

    @property
    def shared_width(self) -> int:
        return self.shared_inter_dim or self.n_shared_experts * self.moe_inter_dim


class Gate(nn.Module):
    """Router: `weight` [E, dim] (trained), buffer `bias` [E] (selection only, moved by update_bias)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.topk, self.score_func, self.route_scale = (
            config.n_activated_experts,
            config.score_func,
            config.route_scale,
        )
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.dim))
        self.register_buffer("bias", torch.zeros(config.n_routed_experts))

    def _apply(self, fn, recurse=True):
        # Bias steps are ~1e-3: keep the buffer at least fp32 even if the model is cast to bf16.
        super()._apply(fn, recurse)
        self.bias = self.bias.to(compute_dtype(self.bias.dtype))
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, dim] -> gate weights [N, k] (x's dtype), expert indices [N, k], scores [N, E] (>= fp32)."""
        dt = compute_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):  # route in >= fp32 under bf16 autocast too
            logits = F.linear(x.to(dt), self.weight.to(dt))
        if self.score_func == "softmax":
            scores = logits.softmax(dim=-1)
            indices = scores.topk(self.topk, dim=-1).indices
            weights = scores.gather(-1, indices)
        else:
            scores = logits.sigmoid()
            indices = (scores + self.bias.to(dt)).topk(self.topk, dim=-1).indices
            weights = scores.gather(-1, indices)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).to(x.dtype), indices, scores


class Experts(nn.Module):
    """E SwiGLU experts stacked: w1, w3 [E, inter, dim] (gate, up), w2 [E, dim, inter] (down)."""

    def __init__(self, n_experts: int, dim: int, inter: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter))

    def forward_loop(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [M, dim] sorted by expert with counts[e] rows for expert e -> [M, dim]; skips idle experts."""
        # unbind once: indexing w1[e] per expert would make autograd build and sum E full-size zero grads
        w1, w3, w2 = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            xe = x[start : start + n]
            h = F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e])
            outs.append(F.linear(h, w2[e]))
            start += n
        return torch.cat(outs) if outs else x.new_zeros(0, x.size(-1))

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor, align: int = 1) -> torch.Tensor:
        """Same as forward_loop with one grouped GEMM per projection (offs = cumulative group ends).

        align > 1 pads every expert's group with zero rows to a multiple of `align` (CUDA grouped GEMM
        kernels want 16-byte aligned group offsets, as torchtitan pads them). The padded buffer has the
        static upper bound M + E*(align-1) rows, so no device-to-host sync is needed; zero rows give zero
        outputs and add nothing to the weight gradients."""
        dt = _matmul_dtype(x)
        x = x.to(dt)
        dest = None
        if align > 1:
            padded = (counts + align - 1) // align * align
            start = counts.cumsum(0) - counts  # first sorted slot of each expert
            start_padded = padded.cumsum(0) - padded
            slot_expert = torch.repeat_interleave(
                torch.arange(counts.numel(), device=x.device), counts, output_size=x.size(0)
            )
            dest = torch.arange(x.size(0), device=x.device) - start[slot_expert] + start_padded[slot_expert]
            rows = x.size(0) + counts.numel() * (align - 1)
            x = x.new_zeros(rows, x.size(1)).index_copy(0, dest, x)
            counts = padded
        offs = counts.cumsum(0).to(torch.int32)
        w1, w3, w2 = (w.to(dt).transpose(-2, -1) for w in (self.w1, self.w3, self.w2))
        h = F.silu(F.grouped_mm(x, w1, offs=offs)) * F.grouped_mm(x, w3, offs=offs)
        y = F.grouped_mm(h, w2, offs=offs)
        return y if dest is None else y[dest]


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's when autocast is on (grouped_mm is not autocast)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def grouped_mm_supported(x: torch.Tensor, dim: int, inter: int) -> bool:
    """Whether F.grouped_mm can run this layer (checked on torch 2.13: CPU runs fp32/bf16 forward and
    backward when row strides are multiples of 16 bytes, but not fp64; CUDA kernels want bf16)."""
    if not hasattr(F, "grouped_mm"):
        return False
    dt = _matmul_dtype(x)
    ok = {torch.float32, torch.bfloat16} if x.device.type == "cpu" else {torch.bfloat16}
    size = torch.empty(0, dtype=dt).element_size()
    return dt in ok and (dim * size) % 16 == 0 and (inter * size) % 16 == 0


def load_stats(load: torch.Tensor) -> dict[str, float]:
    """Balance of a per-expert token count vector, on fractions f = load / sum(load):
    load_cv = std(f) / mean(f) (population std; 0 = perfectly balanced),
    max_load = max(f) / mean(f) (1 = balanced, E = everything on one expert),
    dropped = fraction of routed slots dropped (always 0: this MoE has no capacity limit)."""
    f = load.double() / load.double().sum().clamp(min=1)
    mean = f.mean()
    if mean == 0:
        return {"load_cv": 0.0, "max_load": 0.0, "dropped": 0.0}
    return {"load_cv": (f.std(unbiased=False) / mean).item(), "max_load": (f.max() / mean).item(), "dropped": 0.0}


class MoE(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.n_experts, self.topk = config.n_routed_experts, config.n_activated_experts
        self.gate = Gate(config)
        self.experts = Experts(config.n_routed_experts, config.dim, config.moe_inter_dim)
        self.shared = SwiGLU(config.dim, config.shared_width) if config.n_shared_experts > 0 else None
        # int64: exact token counts, and never cast by model.to(bf16); the trainer all-reduces it under DDP.
        self.register_buffer("load_accum", torch.zeros(config.n_routed_experts, dtype=torch.long), persistent=False)
        self.last_load = torch.zeros(config.n_routed_experts)
        self.aux_loss = torch.zeros(())
        self.last_dispatch: str | None = None  # which path the last forward took (for tests and benchmarks)
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=0.02)

    def _dispatch(self, x: torch.Tensor) -> str:
        d = self.config.dispatch
        supported = grouped_mm_supported(x, self.config.dim, self.config.moe_inter_dim)
        if d == "grouped_mm" and not supported:
            raise ValueError(
                f"MoE dispatch 'grouped_mm' is not supported for {x.dtype} on {x.device.type} "
                f"with dim={self.config.dim}, inter={self.config.moe_inter_dim}; use 'auto'"
            )
        if d == "auto":
            return "grouped_mm" if supported else "loop"
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, indices, scores = self.gate(flat)  # [N, k], [N, k], [N, E]

        # sort the N*k token-slots by expert so each expert's tokens are contiguous
        slot_expert = indices.reshape(-1)
        order = torch.argsort(slot_expert, stable=True)
        token_of_slot = order // self.topk
        # scatter_add, not bincount: CUDA bincount reads max/min back to the host (a sync per layer)
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, slot_expert, torch.ones_like(slot_expert)
        )
        xs = flat[token_of_slot]
        self.last_dispatch = self._dispatch(x)
        if self.last_dispatch == "grouped_mm":
            ys = self.experts.forward_grouped(xs, counts, align=1 if x.device.type == "cpu" else 16)
        else:
            ys = self.experts.forward_loop(xs, counts.tolist())
        ys = ys.to(x.dtype) * weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(flat).index_add_(0, token_of_slot, ys)
        if self.shared is not None:
            out = out + self.shared(flat)

        with torch.no_grad():
            self.last_load = counts.float()
            if self.training:  # evals and generation must not move the balancing bias
                self.load_accum += counts
        self.aux_loss = self._aux_loss(scores.view(B, T, -1), indices.view(B, T, -1))
        return out.view(B, T, D)

    def _aux_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss (eq. 17-20), averaged over the B sequences:
        f_i = E / (k T) * #{t : i chosen for t};  P_i = mean_t s_it / sum_j s_jt;  L = alpha * sum_i f_i P_i.
        Gradient flows through P only (f counts discrete choices)."""
        alpha = self.config.aux_loss_alpha
        if alpha == 0.0:
            return torch.zeros((), device=scores.device, dtype=torch.float32)
        B, T, E = scores.shape
        chosen = torch.zeros(B, T, E, device=scores.device, dtype=scores.dtype).scatter_(-1, indices, 1.0)
        f = chosen.sum(dim=1) * (E / (self.topk * T))  # [B, E]
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
        return alpha * (f * p).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self) -> None:
        """b += gamma * sign(mean(load) - load) on the load accumulated since the last call; then reset."""
        load = self.load_accum.to(self.gate.bias.dtype)
        self.gate.bias += self.config.bias_update_speed * torch.sign(load.mean() - load)
        self.load_accum.zero_()

    def load_stats(self) -> dict[str, float]:
        """`load_stats` of the last forward's per-expert token counts."""
        return load_stats(self.last_load)


def moe_modules(model: nn.Module) -> list[MoE]:
    """Every MoE layer in model, in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]
