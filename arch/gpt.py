"""GPT-2 as karpathy/nanoGPT's model.py defines it, plus a KV cache and two ablation switches.

Same module tree, parameter names, init and forward as nanoGPT, so a nanoGPT `ckpt.pt` and Hugging Face
GPT-2 weights load directly. What is added:
  - a KV cache (`make_cache`, `forward(idx, cache=...)`) following the model protocol in docs/design.md;
  - logits for all positions always (nanoGPT returns only the last one at inference);
  - max-logit tracking and per-head QK-Clip on the attention, for MuonClip;
  - `attn="mla"` swaps the attention for arch.mla.MLA, `mlp="moe"` swaps the MLP for arch.moe.MoE
    (the gpt-mla / gpt-moe ablations); everything else (learned positions, LayerNorm, tying) stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F

from arch.common import Cache, KVCache, _init_all_weights, logits_and_loss

if TYPE_CHECKING:
    from arch.mla import MLAConfig
    from arch.moe import MoEConfig


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nn.LayerNorm has no bias=False in older torch); eps 1e-5."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2
    tie_embeddings: bool = True  # lm_head.weight is transformer.wte.weight
    attn: str = "mha"  # "mha" (nanoGPT) | "mla" (arch.mla.MLA, configured by `mla`, its dim = n_embd)
    mla: MLAConfig | None = None
    mlp: str = "dense"  # "dense" (nanoGPT GELU MLP) | "moe" (arch.moe.MoE, configured by `moe`)
    moe: MoEConfig | None = None

    def __post_init__(self):
        if self.attn not in ("mha", "mla"):
            raise ValueError(f"attn: must be 'mha' or 'mla', got {self.attn!r}")
        if self.mlp not in ("dense", "moe"):
            raise ValueError(f"mlp: must be 'dense' or 'moe', got {self.mlp!r}")
        if self.attn == "mha" and self.n_embd % self.n_head:
            raise ValueError(f"n_embd: {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.attn == "mla" and self.mla is None:
            raise ValueError("mla: attn='mla' needs an MLAConfig; pass mla=MLAConfig(...)")
        if self.mlp == "moe" and self.moe is None:
            raise ValueError("moe: mlp='moe' needs a MoEConfig; pass moe=MoEConfig(...)")
        for name, sub in (("mla", self.mla), ("moe", self.moe)):
            if sub is not None and sub.dim != self.n_embd:
                raise ValueError(f"{name}.dim: {sub.dim} must equal n_embd {self.n_embd}")
        if self.mla is not None and self.mla.max_seq_len < self.block_size:
            raise ValueError(f"mla.max_seq_len: {self.mla.max_seq_len} is below block_size {self.block_size}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, nanoGPT's: one fused c_attn for q, k, v, then c_proj."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.track_max_logit = False
        self.max_logit: torch.Tensor | None = None

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> KVCache:
        return KVCache(batch_size, self.n_head, max_len, self.head_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, layer_cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        if layer_cache is None:
            if self.track_max_logit:
                self.max_logit = _causal_max_logit(q, k, 1.0 / math.sqrt(self.head_dim))
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            k, v = layer_cache.update(k, v, pos)  # keys/values of positions 0..pos+T-1
            if pos == 0:  # prefill into an empty cache: plain causal attention (flash-eligible)
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
            else:
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=_offset_causal_mask(T, pos, x.device), dropout_p=dropout_p
                )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))

    @torch.no_grad()
    def qk_clip_(self, gamma: torch.Tensor) -> None:
        """Kimi K2 QK-Clip for MHA: head h's rows of W_q and W_k (and bias entries) times sqrt(gamma_h),
        so head h's logits q.k scale by gamma_h exactly and no other head changes."""
        if gamma.shape != (self.n_head,):
            raise ValueError(f"qk_clip_: gamma must have shape [{self.n_head}], got {tuple(gamma.shape)}")
        scale = gamma.to(self.c_attn.weight).sqrt().repeat_interleave(self.head_dim)  # [n_embd]
        C = self.n_embd
        self.c_attn.weight[: 2 * C].mul_(scale.repeat(2)[:, None])  # q rows then k rows
        if self.c_attn.bias is not None:
            self.c_attn.bias[: 2 * C].mul_(scale.repeat(2))


def _offset_causal_mask(T: int, pos: int, device) -> torch.Tensor | None:
    """Boolean [T, pos+T] mask: query i (absolute position pos+i) sees keys 0..pos+i. None when every
    key is visible (one new token). SDPA's is_causal aligns the triangle top-left, wrong when pos > 0."""
    if T == 1:
        return None
    q_pos = torch.arange(pos, pos + T, device=device)[:, None]
    return torch.arange(pos + T, device=device)[None, :] <= q_pos


@torch.no_grad()
def _causal_max_logit(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Per head, max over batch and causal (i, j) of q_i.k_j * scale -> float32 [n_heads].
    One batch element at a time so the extra memory is [H, T, T], not [B, H, T, T]."""
    T = q.size(2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    out = torch.full((q.size(1),), -math.inf, dtype=torch.float32, device=q.device)
    for b in range(q.size(0)):
        s = (q[b].float() @ k[b].float().transpose(-2, -1)) * scale
        out = torch.maximum(out, s.masked_fill(~causal, -math.inf).amax(dim=(1, 2)))
    return out


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        if config.attn == "mla":
            from arch.mla import MLA  # lazy: the pure-GPT path needs only arch.common

            self.attn = MLA(config.mla)
        else:
            self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        if config.mlp == "moe":
            from arch.moe import MoE

            self.mlp = MoE(config.moe)
        else:
            self.mlp = MLP(config)
        # nanoGPT's MLP (and both attentions) apply residual dropout inside; the MoE does not, so the
        # block applies it to the MoE's output (a no-op at dropout 0, the default).
        self.mlp_drop = nn.Dropout(config.dropout) if config.mlp == "moe" else nn.Identity()

    def forward(self, x: torch.Tensor, layer_cache=None, pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer_cache, pos)
        x = x + self.mlp_drop(self.mlp(self.ln_2(x)))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config
        # module registration order is nanoGPT's, so the same seed gives the same construction-time RNG use
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self._init_all_weights()

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def _init_all_weights(self) -> None:
        """nanoGPT: every Linear/Embedding N(0, 0.02), biases 0, then c_proj weights N(0, 0.02/sqrt(2L)).
        Parameters outside nn.Linear/nn.Embedding (stacked MoE experts, a parameter-only router) get
        N(0, 0.02) too; norm gains stay 1."""
        self.apply(self._init_weights)
        linear_or_embedding = {id(m.weight) for m in self.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
        _init_all_weights(self, self.config.n_layer, skip=linear_or_embedding)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """nanoGPT's count: all (unique) parameters, minus the position embedding by default. The token
        embedding stays in because, tied, it is also the output layer. See arch.counting for more."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    # ------------------------------------------------------------------ protocol

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None):
        B, T = idx.size()
        pos = cache.pos if cache is not None else 0
        if pos + T > self.config.block_size:
            raise ValueError(f"idx: positions up to {pos + T} exceed block_size {self.config.block_size}")
        positions = torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)
        tok_emb = self.transformer.wte(idx)  # (B, T, n_embd)
        pos_emb = self.transformer.wpe(positions)  # (T, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache.layers[i] if cache is not None else None, pos)
        logits, loss = logits_and_loss(x, self.transformer.ln_f, self.lm_head, targets)
        if cache is not None:
            cache.pos = pos + T
        return logits, loss

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' auxiliary losses from the last forward (0.0 for a dense MLP)."""
        total = torch.zeros((), device=self.lm_head.weight.device)
        if self.config.mlp == "moe":
            from arch.moe import moe_modules

            for m in moe_modules(self):
                total = total + m.aux_loss.to(total.device)
        return total

    def make_cache(self, batch_size: int, max_len: int) -> Cache:
        if max_len > self.config.block_size:
            raise ValueError(f"max_len: {max_len} exceeds block_size {self.config.block_size}")
        w = self.lm_head.weight
        return Cache(
            pos=0, layers=[b.attn.make_cache(batch_size, max_len, w.device, w.dtype) for b in self.transformer.h]
        )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_hf_state_dict(cls, sd: dict[str, torch.Tensor], config: GPTConfig) -> GPT:
        """Build a GPT from a Hugging Face GPT-2 state dict (GPT2LMHeadModel or GPT2Model keys).

        HF's GPT-2 uses Conv1D modules whose weights are the transpose of nn.Linear's; the causal-mask
        buffers `attn.bias` / `attn.masked_bias` are skipped. Without `lm_head.weight` the head is the
        token embedding (GPT-2 ties them). Like nanoGPT, the MLP uses the exact (erf) GELU while HF's GPT-2
        uses the tanh approximation ("gelu_new"), so logits differ from HF's own by a small amount."""
        if config.attn != "mha" or config.mlp != "dense":
            raise ValueError("config: HF GPT-2 weights need attn='mha' and mlp='dense'")
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        out: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if not k.startswith(("transformer.", "lm_head.")):
                k = "transformer." + k  # GPT2Model keys have no "transformer." prefix
            out[k] = v.t() if k.endswith(transposed) else v
        out.setdefault("lm_head.weight", out.get("transformer.wte.weight"))
        model = cls(config)
        _load_exact(model, out, source="HF GPT-2 state dict")
        return model

    @classmethod
    def from_pretrained(cls, model_type: str, override_args: dict | None = None) -> GPT:
        """GPT-2 weights from the Hugging Face hub (needs the optional `transformers` package)."""
        sizes = {
            "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M params
            "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
            "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
            "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
        }
        if model_type not in sizes:
            raise ValueError(f"model_type: {model_type!r} is not one of {sorted(sizes)}")
        override_args = override_args or {}
        if any(k != "dropout" for k in override_args):
            raise ValueError("override_args: only 'dropout' can be overridden")
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as e:
            raise ImportError("GPT.from_pretrained needs `transformers`: pip install transformers") from e
        config = GPTConfig(vocab_size=50257, block_size=1024, bias=True, **sizes[model_type], **override_args)
        sd = GPT2LMHeadModel.from_pretrained(model_type).state_dict()
        return cls.from_hf_state_dict(sd, config)


def _load_exact(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with one clear error naming missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in set(sd) & set(own) if sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source}: does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {sorted(shapes)[:5]}"
        )
    model.load_state_dict(sd, strict=True)


def load_nanogpt_checkpoint(path, map_location="cpu") -> GPT:
    """Load a nanoGPT `ckpt.pt` ({"model": state_dict, "model_args": {...}, ...}).

    Uses torch.load(weights_only=True): plain tensors and containers only, never arbitrary pickles.
    Keys saved from a torch.compile'd model carry an `_orig_mod.` prefix; it is stripped."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"{path}: not a nanoGPT checkpoint (needs 'model' and 'model_args' entries)")
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(ckpt["model_args"]) - known)
    if unknown:
        raise ValueError(f"{path}: model_args has keys GPTConfig does not know: {unknown}")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    prefix = "_orig_mod."
    sd = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in ckpt["model"].items()}
    # nanoGPT on torch < 2.0 registers its causal mask as a buffer named `attn.bias`: not a weight
    sd = {k: v for k, v in sd.items() if not k.endswith(".attn.bias")}
    if model.config.tie_embeddings and "lm_head.weight" not in sd and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    _load_exact(model, sd, source=str(path))
    return model
