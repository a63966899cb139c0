"""Muon (MomentUm Orthogonalized by Newton-Schulz) with an auxiliary AdamW, and MuonClip's QK-Clip.

One optimizer, two kinds of param groups (flag `use_muon`), as in Keller Jordan's `MuonWithAuxAdam`
(github.com/KellerJordan/Muon), so one LR scheduler and one state_dict cover every parameter:

- Muon groups (hidden >= 2-D matrices; 3-D stacked expert weights [E, m, n] are E separate matrices):
      buf = mu * buf + (1 - mu) * g                 (buf.lerp_(g, 1 - mu), as torch.optim.Muon)
      u   = (1 - mu) * g + mu * buf  if nesterov else buf
      O   = NewtonSchulz5(u)                       (~ U V^T of u's SVD, singular values ~0.5..1.5)
      p  *= 1 - lr * wd                            (decoupled weight decay, unscaled lr)
      p  -= adjust(lr, rows, cols) * O
  adjust "original" (Keller Jordan): lr * max(1, rows/cols)**0.5, lr ~0.02.
  adjust "match_rms_adamw" (Moonlight, arXiv 2502.16982): lr * 0.2 * sqrt(max(rows, cols)), which gives
  the update the RMS of a typical AdamW update (0.2), so AdamW's lr and weight decay carry over.
  With the NS run in bf16 and `batched_ns=False` this is torch.optim.Muon's step op for op (bit-identical
  on 2-D weights).
- AdamW groups (embeddings, head, router, gains, biases): torch's own functional AdamW, so the update
  is torch.optim.AdamW's exactly (same state keys: step, exp_avg, exp_avg_sq).

Batched Newton-Schulz (the single-process default): the Muon groups' matrices are bucketed by shape (and NS
dtype/steps/eps), and each bucket is orthogonalized by one batched NS call on the stacked [k, m, n] matrices
instead of one call (about 16 kernel launches) per matrix. The first H200 record
(reports/benchmarks/2026-12-04-nvidia-h200.md) measured kimi @ paper's Muon groups at 8.3 ms batched against
32.7 ms per matrix. Same math per matrix (tests/arch/test_muon.py: equal to the per-matrix path within 1e-6 in
fp32); it holds a bucket's updates at once. `batched_ns=False` runs one NS call per parameter, holding one
update at a time: torch.optim.Muon's order of operations, and the reference the batched path is tested against.

Distributed (torch.distributed initialized, world size > 1): the momentum update runs on every rank
(cheap, elementwise, and it keeps every rank's state_dict complete, so a rank-0 checkpoint holds all
momentum buffers), the Newton-Schulz orthogonalization (the expensive part) is split across ranks, and
the orthogonalized updates are all-gathered so every rank applies every update. Keller Jordan's
reference all-gathers the updated parameters instead, which leaves each momentum buffer on one rank.
Gradients must already be identical across ranks (DDP's all-reduce does that).

QK-Clip (Kimi K2 report, Algorithm 1): after the optimizer step, for every attention head h whose max
pre-softmax logit S_h over the batch exceeded tau, rescale its query/key weights by gamma_h = tau / S_h
(the attention module's `qk_clip_(gamma)` knows which rows; see docs/design.md, "The model protocol"). `Muon(...,
qk_clip_model=model)` does this inside `step()`; `qk_clip_(model, tau)` is the standalone function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.adamw import adamw as _functional_adamw

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: maximal slope at zero, 5 steps suffice
ADJUST_LR_FNS = ("original", "match_rms_adamw")


# ----------------------------------------------------------------------------- Newton-Schulz


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators (fast, and NS is stable in it); fp32 on CPU, where bf16 matmuls are slow."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def zeropower_via_newtonschulz5(
    G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Approximate the orthogonal factor U V^T of G = U S V^T with 5 quintic Newton-Schulz steps.

    G is [m, n] or a batch [E, m, n] (each matrix orthogonalized on its own). Returns a tensor of G's
    shape in `dtype` (default: bf16 on CUDA, fp32 on CPU). The singular values come out roughly in
    0.5..1.5 rather than exactly 1: the coefficients trade exactness for speed (Keller Jordan's blog).
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"Newton-Schulz expects a 2-D or 3-D tensor, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G.to(dtype or default_ns_dtype(G.device))
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide side: X X^T is then the smaller Gram matrix
        X = X.mT
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1].
    if X.ndim == 2:
        X = X / X.norm().clamp(min=eps)
        for _ in range(steps):
            A = X @ X.mT
            B = torch.addmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
            X = torch.addmm(X, B, X, beta=a)  # a*X + B@X
    else:
        X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
    return X.mT if transposed else X


def adjust_lr(lr: float, adjust_lr_fn: str, shape: torch.Size) -> float:
    """Per-matrix learning rate; rows, cols = the last two dims (a 3-D tensor is a stack of matrices)."""
    rows, cols = shape[-2], shape[-1]
    if adjust_lr_fn == "original":
        return lr * max(1.0, rows / cols) ** 0.5
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn: unknown {adjust_lr_fn!r}; use one of {', '.join(ADJUST_LR_FNS)}")


def _dist_world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is unavailable or not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_single(output: torch.Tensor, local: torch.Tensor) -> None:
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single; older torch has only the former.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local)


# ----------------------------------------------------------------------------- the optimizer


class Muon(torch.optim.Optimizer):
    """Muon for groups with `use_muon=True`, AdamW for groups with `use_muon=False`.

    params: an iterable of tensors (one Muon group) or of group dicts. Missing group keys are filled
    from the constructor's Muon defaults (lr, weight_decay, momentum, nesterov, ns_steps, ns_eps,
    adjust_lr_fn, ns_dtype, split) or AdamW defaults (adamw_lr -> lr, adamw_betas -> betas, adamw_eps -> eps,
    adamw_weight_decay -> weight_decay, fused). `ns_dtype` is None (auto: bf16 on CUDA, fp32 on CPU)
    or a dtype name ("bfloat16", "float32", "float64"); `fused` None means fused AdamW on CUDA.
    `split` (group key only, default 1): a 2-D weight that fuses k matrices along its rows (nanoGPT's
    c_attn stacks W_q, W_k, W_v) is orthogonalized as k separate [rows/k, cols] matrices.
    qk_clip_model: if given, `step()` ends with `qk_clip_(qk_clip_model, qk_clip_tau)` (MuonClip) and
    stores its stats in `self.last_qk_clip`.
    batched_ns: one Newton-Schulz call per bucket of same-shape matrices (single process; see the module
    docstring); False runs one call per parameter (torch.optim.Muon's order, one update alive at a time).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_eps: float = 1e-7,
        adjust_lr_fn: str = "original",
        ns_dtype: str | None = None,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        fused: bool | None = None,
        qk_clip_model: nn.Module | None = None,
        qk_clip_tau: float = 100.0,
        batched_ns: bool = True,
    ):
        self._muon_defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_eps=ns_eps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
            split=1,
        )
        self._adamw_defaults = dict(
            lr=adamw_lr,
            betas=tuple(adamw_betas),
            eps=adamw_eps,
            weight_decay=adamw_weight_decay,
            fused=fused,
            foreach=None,
            amsgrad=False,
            maximize=False,
        )
        self.qk_clip_model = qk_clip_model
        self.qk_clip_tau = qk_clip_tau
        self.batched_ns = batched_ns
        self.last_qk_clip: dict[str, float] | None = None
        super().__init__(params, defaults={"use_muon": True})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        group.setdefault("use_muon", True)
        defaults = self._muon_defaults if group["use_muon"] else self._adamw_defaults
        for key, value in defaults.items():
            group.setdefault(key, value)
        params = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        group["params"] = params  # a generator would be exhausted by the checks below
        if group["use_muon"]:
            for p in params:
                if p.ndim not in (2, 3):
                    raise ValueError(
                        f"Muon group: parameter of shape {tuple(p.shape)} is not 2-D or 3-D; "
                        "put it in a use_muon=False (AdamW) group"
                    )
                if group["split"] != 1 and (p.ndim != 2 or p.size(0) % group["split"]):
                    raise ValueError(
                        f"Muon group: split={group['split']} needs 2-D parameters whose rows "
                        f"divide evenly, got shape {tuple(p.shape)}"
                    )
            if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
                raise ValueError(
                    f"adjust_lr_fn: unknown {group['adjust_lr_fn']!r}; use one of {', '.join(ADJUST_LR_FNS)}"
                )
            if group["ns_dtype"] is not None and not isinstance(getattr(torch, group["ns_dtype"], None), torch.dtype):
                raise ValueError(f"ns_dtype: {group['ns_dtype']!r} is not a torch dtype name")
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_group_step(group)
        self._muon_step([g for g in self.param_groups if g["use_muon"]])
        if self.qk_clip_model is not None:
            self.last_qk_clip = qk_clip_(self.qk_clip_model, self.qk_clip_tau)
        return loss

    # -- Muon -------------------------------------------------------------------------------------

    def _update_momentum(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """buf = mu * buf + (1 - mu) * grad, in place (torch.optim.Muon's EMA form)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        state["momentum_buffer"].lerp_(p.grad, 1 - group["momentum"])

    def _to_orthogonalize(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Nesterov: (1 - mu) * grad + mu * buf (a new tensor); else the buffer itself."""
        buf = self.state[p]["momentum_buffer"]
        return p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    @staticmethod
    def _orthogonalize(u: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        dtype = getattr(torch, group["ns_dtype"]) if group["ns_dtype"] else None
        split = group["split"]
        x = u if split == 1 else u.reshape(split, u.size(0) // split, u.size(1))
        o = zeropower_via_newtonschulz5(x, steps=group["ns_steps"], eps=group["ns_eps"], dtype=dtype)
        return o.reshape(u.shape)

    @staticmethod
    def _apply(p: torch.Tensor, update: torch.Tensor, group: dict[str, Any]) -> None:
        lr, split = group["lr"], group["split"]
        shape = p.shape if split == 1 else (p.size(0) // split, p.size(1))  # the matrices NS saw
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(update, alpha=-adjust_lr(lr, group["adjust_lr_fn"], shape))

    def _muon_step(self, groups: list[dict[str, Any]]) -> None:
        jobs = [(p, g) for g in groups for p in g["params"] if p.grad is not None]
        rank, world = _dist_world()
        if world == 1 and self.batched_ns:
            self._muon_step_batched(jobs)
            return
        if world == 1:  # one parameter at a time: no more than one temporary update alive
            for p, g in jobs:
                self._update_momentum(p, g)
                self._apply(p, self._orthogonalize(self._to_orthogonalize(p, g), g), g)
            return
        # Every rank updates every momentum buffer (cheap, and its state_dict stays complete); each
        # rank orthogonalizes its share of every bucket of same-shape parameters, then one all-gather
        # per bucket gives every rank every update. Bucket order is the same on every rank.
        buckets: dict[tuple, list] = {}
        for p, g in jobs:
            self._update_momentum(p, g)
            ns_dtype = getattr(torch, g["ns_dtype"]) if g["ns_dtype"] else default_ns_dtype(p.device)
            buckets.setdefault((tuple(p.shape), ns_dtype, p.device), []).append((p, g))
        for (shape, ns_dtype, device), bucket in buckets.items():
            per_rank = math.ceil(len(bucket) / world)  # rank r orthogonalizes bucket[r*k : (r+1)*k]
            local = torch.zeros((per_rank, *shape), dtype=ns_dtype, device=device)
            for k in range(per_rank):
                i = rank * per_rank + k
                if i < len(bucket):
                    p, g = bucket[i]
                    local[k] = self._orthogonalize(self._to_orthogonalize(p, g), g)
            gathered = torch.empty((world * per_rank, *shape), dtype=ns_dtype, device=device)
            _all_gather_single(gathered, local)
            for i, (p, g) in enumerate(bucket):
                self._apply(p, gathered[i], g)

    @staticmethod
    def _ns_key(p: torch.Tensor, group: dict[str, Any]) -> tuple:
        """What one batched NS call must share: matrix shape, NS dtype, steps, eps, device."""
        rows, cols = p.shape[-2], p.shape[-1]
        if group["split"] != 1:
            rows //= group["split"]
        dtype = getattr(torch, group["ns_dtype"]) if group["ns_dtype"] else default_ns_dtype(p.device)
        return (rows, cols), dtype, group["ns_steps"], group["ns_eps"], p.device

    def _muon_step_batched(self, jobs: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        """Single process (the default path): momentum per parameter, then one NS call per bucket of same-shape
        matrices (a 2-D weight is one matrix, a split weight `split` matrices, a 3-D weight E matrices)."""
        buckets: dict[tuple, list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]]] = {}
        for p, g in jobs:
            self._update_momentum(p, g)
            key = self._ns_key(p, g)
            u = self._to_orthogonalize(p, g)
            buckets.setdefault(key, []).append((p, g, u.reshape(-1, *key[0])))
        for ((_, _), dtype, steps, eps, _), bucket in buckets.items():
            stacked = torch.cat([mats for _, _, mats in bucket])
            ortho = zeropower_via_newtonschulz5(stacked, steps=steps, eps=eps, dtype=dtype)
            for (p, g, _), o in zip(bucket, ortho.split([mats.size(0) for _, _, mats in bucket]), strict=True):
                self._apply(p, o.reshape(p.shape), g)

    # -- AdamW ------------------------------------------------------------------------------------

    def _adamw_group_step(self, group: dict[str, Any]) -> None:
        """torch.optim.AdamW's step for one group, through torch's functional adamw."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        fused = group["fused"]
        if fused is None:  # auto: fused kernels where they exist (CUDA floating point)
            fused = all(p.is_cuda and p.is_floating_point() for p in params)
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                # Same layout as torch.optim.AdamW: `step` is a CPU scalar unless fused.
                state["step"] = (
                    torch.zeros((), dtype=torch.float32, device=p.device)
                    if fused
                    else torch.tensor(0.0, dtype=_scalar_dtype())
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif fused and state["step"].device != p.device:  # e.g. loaded from a CPU checkpoint
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        _functional_adamw(
            params,
            [p.grad for p in params],
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=None if fused else group["foreach"],
            fused=True if fused else None,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def _scalar_dtype() -> torch.dtype:
    # torch.optim's _get_scalar_dtype(): the step counter follows a float64 default dtype.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- MuonClip / QK-Clip


def _tracked_attention(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "track_max_logit") and hasattr(m, "qk_clip_")]


def _accumulate_max_logit(module: nn.Module, args, output) -> None:
    """Forward hook: running per-head max over the training forwards since the last clip.

    Under gradient accumulation the step's batch spans several forwards; Kimi K2 takes S_max over the
    whole batch, while the module only keeps the last forward's `max_logit`.
    """
    ml = getattr(module, "max_logit", None)
    if not module.training or ml is None or ml is getattr(module, "_qk_clip_seen", None):
        return
    module._qk_clip_seen = ml
    prev = getattr(module, "_qk_clip_running_max", None)
    module._qk_clip_running_max = ml.clone() if prev is None else torch.maximum(prev, ml)


def enable_max_logit_tracking(model: nn.Module, on: bool = True) -> int:
    """Set `track_max_logit` on every attention module (and keep a per-step running max); return count."""
    modules = _tracked_attention(model)
    for m in modules:
        m.track_max_logit = on
        handle = m.__dict__.pop("_qk_clip_hook", None)
        if handle is not None:
            handle.remove()
        for key in ("_qk_clip_running_max", "_qk_clip_seen", "_qk_clip_used"):
            m.__dict__.pop(key, None)
        if on:
            m._qk_clip_hook = m.register_forward_hook(_accumulate_max_logit)
    return len(modules)


def _step_max_logit(m: nn.Module) -> torch.Tensor | None:
    """This step's per-head max logit: the running max if our hook is installed, else `max_logit`.

    Each value is read once, so a second qk_clip_ before the next forward does nothing (rather than
    clipping again with logits measured before the first clip)."""
    if "_qk_clip_hook" in m.__dict__:
        return m.__dict__.pop("_qk_clip_running_max", None)
    ml = getattr(m, "max_logit", None)
    if ml is None or ml is m.__dict__.get("_qk_clip_used"):
        return None
    m._qk_clip_used = ml
    return ml


@torch.no_grad()
def qk_clip_(model: nn.Module, tau: float = 100.0) -> dict[str, float]:
    """Kimi K2 Algorithm 1: per head, gamma = min(1, tau / S_max); rescale q/k weights where S_max > tau.

    Reads each tracking attention module's max logit from the training forward(s) since the last call
    (under torch.distributed, all-reduced with MAX first, in one collective, so every rank clips the
    same heads). Returns {"max_logit": max over all heads before clipping (nan if none tracked),
    "heads_clipped": number of heads rescaled, "modules": number of modules read}.
    """
    modules, logits = [], []
    for m in _tracked_attention(model):
        if not m.track_max_logit:
            continue
        ml = _step_max_logit(m)
        if ml is not None:
            modules.append(m)
            logits.append(ml.detach().float().reshape(-1))
    if not modules:
        return {"max_logit": float("nan"), "heads_clipped": 0, "modules": 0}
    flat = torch.cat([t.to(logits[0].device) for t in logits])
    if _dist_world()[1] > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    heads_clipped = 0
    for m, s_max in zip(modules, flat.split([t.numel() for t in logits]), strict=True):
        over = s_max > tau
        if over.any():
            gamma = (tau / s_max).clamp(max=1.0)  # exactly 1.0 for heads at or under tau
            m.qk_clip_(gamma)
            heads_clipped += int(over.sum())
    return {"max_logit": float(flat.max()), "heads_clipped": heads_clipped, "modules": len(modules)}
