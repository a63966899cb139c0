"""Take a trained model out of kimi-bench: safetensors weights + config, or a Hugging Face `transformers` folder.

- `safetensors`: `model.safetensors` (our parameter names) + `kimi_bench_config.json` (variant, dims, data
  fields): loss-free for every variant, readable by any framework.
- `hf`: a folder `transformers.AutoModelForCausalLM.from_pretrained` loads. `gpt` becomes `GPT2LMHeadModel`
  (exact GELU, LayerNorm eps 1e-5, Conv1D weights transposed; bias=False models get zero biases, which is the
  same function); `kimi` becomes `DeepseekV3ForCausalLM` (MLA + MoE with the sigmoid router's selection bias
  as `e_score_correction_bias`, one expert group, rotate-half RoPE via `rope_interleave=False`). The ablations
  (`gpt-mla`, `gpt-moe`) mix a GPT-2 backbone with DeepSeek blocks: no `transformers` class computes them,
  so `hf` refuses them in one line. The weights are copied into a real `transformers` model with
  `load_state_dict(strict=True)` and written by its own `save_pretrained`, so the folder is what the library
  itself would write; tests compare logits against kimi-bench's on the same input.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import UserError, suggest
from harness.measure.trained import TrainedModel, load_trained
from harness.schema import TAG_MODEL_PATH

FORMATS = ("safetensors", "hf")
CONFIG_FILE = "kimi_bench_config.json"
WEIGHTS_FILE = "model.safetensors"


def checkpoint_of_run(run_id: str, tracking_uri: str | None) -> Path:
    """The model.pt a finished trial run wrote (its `kb.model_path` tag)."""
    from harness.stores.tracking import Tracker, resolve_tracking_uri

    tracker = Tracker(resolve_tracking_uri(tracking_uri))
    try:
        run = tracker.client.get_run(run_id)
    except Exception:
        raise UserError(
            f"--run: no MLflow run {run_id!r} in this store; copy a run id from `mlflow ui` or `kimi-bench status`"
        ) from None
    path = run.data.tags.get(TAG_MODEL_PATH)
    if not path:
        raise UserError(f"--run: run {run_id} has no saved model (not a finished trial); pass --checkpoint")
    if not Path(path).is_file():
        raise UserError(f"--run: the model of run {run_id} is gone from {path}; pass --checkpoint PATH")
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# GPT -> transformers GPT2LMHeadModel


GPT2_EOT = 50256  # GPT-2's <|endoftext|> id


def _gpt2_config(model) -> Any:
    from transformers import GPT2Config

    c = model.config
    if c.attn != "mha" or c.mlp != "dense":
        raise UserError(
            f"--format hf: a GPT with {c.attn} attention and a {c.mlp} MLP has no transformers class; "
            "use --format safetensors"
        )
    return GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=c.tie_embeddings,
        # GPT2Config's defaults name GPT-2's <|endoftext|> (50256), an id only a GPT-2-sized vocabulary has
        bos_token_id=GPT2_EOT if c.vocab_size > GPT2_EOT else None,
        eos_token_id=GPT2_EOT if c.vocab_size > GPT2_EOT else None,
    )


def _gpt2_state_dict(model) -> dict[str, torch.Tensor]:
    """nanoGPT names are GPT-2's; Linear weights become Conv1D ([in, out]); absent biases become zeros."""
    c = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    widths = {
        "ln_1": c.n_embd,
        "ln_2": c.n_embd,
        "attn.c_attn": 3 * c.n_embd,
        "attn.c_proj": c.n_embd,
        "mlp.c_fc": 4 * c.n_embd,
        "mlp.c_proj": c.n_embd,
    }
    for key, value in sd.items():
        out[key] = value.t().contiguous() if key.endswith(conv1d) else value.clone()
    for i in range(c.n_layer):
        for name, width in widths.items():
            out.setdefault(f"transformer.h.{i}.{name}.bias", torch.zeros(width))
    out.setdefault("transformer.ln_f.bias", torch.zeros(c.n_embd))
    if c.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


# ---------------------------------------------------------------------------------------------------------
# Kimi -> transformers DeepseekV3ForCausalLM


def _shared_experts(moe_cfg) -> int:
    """HF sizes the shared expert as n_shared_experts * moe_inter_dim: our width, rounded up to that grid."""
    width = moe_cfg.shared_width if moe_cfg.n_shared_experts > 0 else 0
    return -(-width // moe_cfg.moe_inter_dim)


def _deepseek_v3_config(model) -> Any:
    from transformers import DeepseekV3Config

    c = model.config
    if c.n_dense_layers < c.n_layer and c.score_func != "sigmoid":
        raise UserError(
            f"--format hf: DeepSeek-V3 routes with sigmoid scores; this model uses {c.score_func!r}; "
            "use --format safetensors"
        )
    moe = c.moe_config() if c.n_dense_layers < c.n_layer else None
    return DeepseekV3Config(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.inter_dim,
        moe_intermediate_size=c.moe_inter_dim,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_heads,
        n_shared_experts=_shared_experts(moe) if moe else 0,
        n_routed_experts=c.n_routed_experts,
        routed_scaling_factor=c.route_scale,
        kv_lora_rank=c.kv_lora_rank,
        q_lora_rank=c.q_lora_rank or None,
        qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim,
        qk_nope_head_dim=c.qk_nope_head_dim,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=c.n_activated_experts,
        first_k_dense_replace=c.n_dense_layers,
        norm_topk_prob=True,
        hidden_act="silu",
        max_position_embeddings=c.block_size,
        rms_norm_eps=1e-6,
        tie_word_embeddings=c.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        rope_interleave=False,
        attention_bias=False,
        attention_dropout=0.0,
        num_mtp_layers=0,
    )


def _padded_swiglu(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, width: int):
    """A SwiGLU with `width - hidden` extra hidden units that are zero in and out: the same function."""
    extra = width - w1.size(0)
    if extra == 0:
        return w1, w3, w2
    return (
        torch.cat([w1, w1.new_zeros(extra, w1.size(1))]),
        torch.cat([w3, w3.new_zeros(extra, w3.size(1))]),
        torch.cat([w2, w2.new_zeros(w2.size(0), extra)], dim=1),
    )


def _deepseek_v3_state_dict(model, hf_config) -> dict[str, torch.Tensor]:
    c = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    attn = {
        "wq": "q_proj",
        "wq_a": "q_a_proj",
        "q_norm": "q_a_layernorm",
        "wq_b": "q_b_proj",
        "wkv_a": "kv_a_proj_with_mqa",
        "kv_norm": "kv_a_layernorm",
        "wkv_b": "kv_b_proj",
        "wo": "o_proj",
    }
    for i in range(c.n_layer):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[ours + "attn_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "ffn_norm.weight"]
        for a, b in attn.items():
            if ours + f"attn.{a}.weight" in sd:
                out[hf + f"self_attn.{b}.weight"] = sd[ours + f"attn.{a}.weight"]
        if i < c.n_dense_layers:
            for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[hf + f"mlp.{b}.weight"] = sd[ours + f"ffn.{a}.weight"]
            continue
        out[hf + "mlp.gate.weight"] = sd[ours + "ffn.gate.weight"].float()
        out[hf + "mlp.gate.e_score_correction_bias"] = sd[ours + "ffn.gate.bias"].float()
        w1, w3, w2 = (sd[ours + f"ffn.experts.{w}"] for w in ("w1", "w3", "w2"))
        out[hf + "mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)  # [E, 2I, H]: gate rows, then up
        out[hf + "mlp.experts.down_proj"] = w2  # [E, H, I]
        shared_width = hf_config.n_shared_experts * hf_config.moe_intermediate_size
        if ours + "ffn.shared.w1.weight" in sd:
            w1, w3, w2 = _padded_swiglu(
                *(sd[ours + f"ffn.shared.{w}.weight"] for w in ("w1", "w3", "w2")), shared_width
            )
        else:
            w1, w3, w2 = (torch.zeros(0, c.dim), torch.zeros(0, c.dim), torch.zeros(c.dim, 0))
        for w, b in ((w1, "gate_proj"), (w3, "up_proj"), (w2, "down_proj")):
            out[hf + f"mlp.shared_experts.{b}.weight"] = w
    return out


HF_EXPORTERS: dict[str, tuple[Callable, Callable]] = {
    "gpt": (_gpt2_config, lambda model, _cfg: _gpt2_state_dict(model)),
    "kimi": (_deepseek_v3_config, _deepseek_v3_state_dict),
}


def to_transformers(trained: TrainedModel) -> nn.Module:
    """The same network as a `transformers` model (float32, eval mode), weights copied strictly."""
    try:
        import transformers
    except ImportError:
        raise UserError("--format hf: needs the transformers package; pip install -e '.[hf]'") from None
    if trained.variant not in HF_EXPORTERS:
        raise UserError(
            f"--format hf: variant {trained.variant!r} has no transformers class "
            f"({', '.join(HF_EXPORTERS)} have); use --format safetensors"
        )
    make_config, make_state = HF_EXPORTERS[trained.variant]
    model = trained.model.float().eval()
    config = make_config(model)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = make_state(model, config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # a mapping bug, never a user error: fail loudly with the names
        raise RuntimeError(f"export mapping mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


# ---------------------------------------------------------------------------------------------------------


def _kimi_bench_config(trained: TrainedModel) -> dict[str, Any]:
    dims = dataclasses.asdict(trained.dims) if trained.dims is not None else None
    return {"variant": trained.variant, "dims": dims, "data": trained.data, "format": "kimi-bench"}


def _byte_tokenizer_object():
    """UTF-8 bytes as ids 0..255 in `tokenizers` terms: ByteLevel maps byte b to one alphabet character, the
    vocabulary maps that character back to b, and no merges leave one token per byte."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()  # byte -> the character ByteLevel writes for it
    tok = HFTokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()  # invalid UTF-8 -> U+FFFD, as ByteTokenizer.decode
    return tok


def _char_tokenizer_object(chars: str):
    """One id per character of the train text, in kimi-bench's order, and the last id `<unk>` for any other
    character (decoded as U+FFFD, as CharTokenizer does)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    unk = "<unk>"  # a vocabulary entry only: no merges, so the text "<unk>" stays five characters
    vocab = {c: i for i, c in enumerate(chars)} | {unk: len(chars)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))  # no merges: one token per character
    tok.decoder = decoders.Sequence([decoders.Replace(unk, "\ufffd"), decoders.Fuse()])  # join, no spaces
    return tok


def _gpt2_tokenizer_object(enc):
    """tiktoken's GPT-2 BPE converted by transformers (same ids; <|endoftext|> as GPT-2's special token)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = str(Path(tmp) / "gpt2.tiktoken")
        # tiktoken's file format, one "base64(token) rank" line each (tiktoken's own writer needs blobfile)
        Path(vocab_file).write_text(
            "".join(
                f"{base64.b64encode(token).decode()} {rank}\n"
                for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
            )
        )
        return TikTokenConverter(
            vocab_file=vocab_file, pattern=enc._pat_str, extra_special_tokens=enc._special_tokens
        ).converted()


def hf_tokenizer(tokenizer):
    """kimi-bench's tokenizer as a transformers PreTrainedTokenizerFast with the same ids both ways."""
    from transformers import PreTrainedTokenizerFast

    if tokenizer.kind == "byte":
        tok = _byte_tokenizer_object()
    elif tokenizer.kind == "char":
        tok = _char_tokenizer_object(tokenizer.chars)
    elif tokenizer.kind == "bpe":
        tok = tokenizer.tok
    elif tokenizer.kind == "gpt2":
        tok = _gpt2_tokenizer_object(tokenizer.enc)
    else:
        raise UserError(
            f"--format hf: the {tokenizer.kind} tokenizer has no text form (a bin: corpus without "
            "a tokenizer in its meta.json); the model is exported without one"
        )
    special = {"eos_token": "<|endoftext|>"} if tokenizer.kind == "gpt2" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special)


def _write_hf_tokenizer(tokenizer, out: Path) -> None:
    hf_tokenizer(tokenizer).save_pretrained(out)


def _trained_tokenizer(data: dict, cache_dir: str | None):
    """The tokenizer the trial trained with: byte needs nothing; char and bpe come from the data cache (the
    train text they were built from), gpt2 from tiktoken."""
    from harness.data.tokenizers import ByteTokenizer

    if data.get("tokenizer") == "byte":
        return ByteTokenizer()
    from harness.data.bar import prepare_data

    return prepare_data(dict(data), cache_dir, None).tokenizer


def _save_tokenizer(trained: TrainedModel, out: Path, cache_dir: str | None) -> str:
    """Save the trial's tokenizer next to an hf export (AutoTokenizer loads it); returns what was done."""
    data = trained.data or {}
    name = str(data.get("tokenizer", ""))
    if not name:
        return f"no tokenizer saved: the checkpoint does not name one (ids are its own; see {CONFIG_FILE})"
    try:
        _write_hf_tokenizer(_trained_tokenizer(data, cache_dir), out)
    except (UserError, OSError, ValueError, ImportError) as e:
        return f"tokenizer not saved ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return f"tokenizer saved ({name}; load with transformers.AutoTokenizer.from_pretrained)"


def export(source: Path, fmt: str, out: Path, cache_dir: str | None = None) -> list[str]:
    """Write `source` (a model.pt / ckpt.pt) to `out` in `fmt`; returns lines describing what was written."""
    if fmt not in FORMATS:
        raise UserError(f"--format: unknown format {fmt!r}; {suggest(fmt, FORMATS)}")
    trained = load_trained(source)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot create {out} ({e.strerror}); choose another --out") from None
    lines = []
    if fmt == "safetensors":
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in trained.model.state_dict().items()}
        if getattr(trained.model.config, "tie_embeddings", False):  # safetensors refuses shared storage
            state = {k: v.clone() for k, v in state.items()}
        save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "variant": trained.variant})
        lines.append(f"{out / WEIGHTS_FILE}: {len(state)} tensors")
    else:
        hf = to_transformers(trained)
        hf.save_pretrained(out)
        lines.append(f"{out}: {type(hf).__name__} (load with transformers.AutoModelForCausalLM.from_pretrained)")
        lines.append(_save_tokenizer(trained, out, cache_dir))
    (out / CONFIG_FILE).write_text(json.dumps(_kimi_bench_config(trained), indent=2, sort_keys=True, default=str))
    return lines
