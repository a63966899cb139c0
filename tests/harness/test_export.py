"""Exports load where they claim to and compute the same function (float32, 1e-5)."""

import dataclasses
import json

import pytest
import torch

from harness.errors import UserError
from harness.export import export, load_trained
from harness.spec.registry import build_model, resolve_dims

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra ('.[hf]')")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 256


def _save(tmp_path, variant: str, **overrides) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    dims = resolve_dims("tiny", VOCAB, overrides)
    model = build_model(variant, dims)
    with torch.no_grad():  # a trained-looking router: a non-zero selection bias changes which experts run
        for name, buf in model.named_buffers():
            if name.endswith("gate.bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    path = tmp_path / "model.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "variant": variant,
            "dims": dataclasses.asdict(dims),
            "data": {"corpus": "python-stdlib", "tokenizer": "byte"},
        },
        path,
    )
    return model.eval(), path


def _ours(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out[0] if isinstance(out, tuple) else out


def _idx():
    return torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))


CASES = [
    ("gpt", {}),
    ("gpt", {"bias": False, "tie_embeddings": False}),
    ("kimi", {}),  # dense first layer, then MoE with a shared expert
    ("kimi", {"q_lora_rank": 24, "n_dense_layers": 0, "shared_inter_dim": 96}),  # shared width off HF's grid
    ("kimi", {"n_shared_experts": 0, "route_scale": 2.5}),
]


@pytest.mark.parametrize(("variant", "overrides"), CASES, ids=[f"{v}-{i}" for i, (v, _) in enumerate(CASES)])
def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path, variant, overrides):
    model, path = _save(tmp_path, variant, **overrides)
    lines = export(path, "hf", tmp_path / "hf")
    assert "tokenizer" in lines[-1]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    idx = _idx()
    with torch.no_grad():
        theirs = hf(idx).logits
    ours = _ours(model, idx)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert ours.abs().max() > 0.1  # a real function, not two zero tensors
    # special ids inside the vocabulary (GPT2Config's default 50256 is not an id of a 256-token model)
    for token_id in (hf.config.bos_token_id, hf.config.eos_token_id):
        assert token_id is None or 0 <= token_id < hf.config.vocab_size, token_id


def test_hf_export_greedy_generation_matches_ours(tmp_path):
    from arch.common import generate

    model, path = _save(tmp_path, "kimi")
    export(path, "hf", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = _idx()[:1, :8]
    ours = generate(model, prompt, 12, temperature=0.0)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("variant", ["gpt", "gpt-mla", "gpt-moe", "kimi"])
def test_safetensors_export_round_trips_every_variant(tmp_path, variant):
    model, path = _save(tmp_path, variant)
    export(path, "safetensors", tmp_path / "st")
    config = json.loads((tmp_path / "st" / "kimi_bench_config.json").read_text())
    assert config["variant"] == variant
    rebuilt = build_model(variant, resolve_dims("tiny", VOCAB, None).__class__(**config["dims"]))
    rebuilt.load_state_dict(safetensors_torch.load_file(tmp_path / "st" / "model.safetensors"))
    idx = _idx()
    torch.testing.assert_close(_ours(rebuilt.eval(), idx), _ours(model, idx), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["gpt-mla", "gpt-moe"])
def test_hf_export_refuses_ablations_in_one_line(tmp_path, variant):
    _, path = _save(tmp_path, variant)
    with pytest.raises(UserError, match="has no transformers class") as e:
        export(path, "hf", tmp_path / "hf")
    assert "\n" not in str(e.value) and "safetensors" in str(e.value)


def test_bad_inputs_are_one_line(tmp_path):
    _, path = _save(tmp_path, "gpt")
    with pytest.raises(UserError, match=r"--format: unknown format 'hff'; did you mean 'hf'"):
        export(path, "hff", tmp_path / "x")
    with pytest.raises(UserError, match="--checkpoint: no file"):
        export(tmp_path / "missing.pt", "hf", tmp_path / "x")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable weights-only checkpoint"):
        load_trained(tmp_path / "junk.pt")


def test_bpe_tokenizer_saved_for_transformers_encodes_alike(tmp_path):
    from harness.data import BPETokenizer
    from harness.export import _write_hf_tokenizer

    texts = ["def add(a, b):\n    return a + b\n", "class Foo:\n    pass\n", "import os, sys  # tools\n"] * 20
    ours = BPETokenizer.train(texts, vocab_size=300)
    _write_hf_tokenizer(ours, tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    sample = "def sub(a, b):\n    return a - b  # üñí\n"
    assert theirs(sample)["input_ids"] == ours.encode(sample)
    assert theirs.decode(ours.encode(sample)) == sample


@pytest.mark.slow
def test_export_command_from_a_run_id_and_from_a_checkpoint(tmp_path):
    """`kimi-bench export --run ID` finds the model through the run's kb.model_path tag."""
    import mlflow
    from typer.testing import CliRunner

    from cli import app
    from harness.schema import TAG_MODEL_PATH

    model, path = _save(tmp_path, "gpt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("e"), tags={TAG_MODEL_PATH: str(path)})
    runner = CliRunner()
    res = runner.invoke(
        app, ["export", "--run", run.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "a"), "--format", "hf"]
    )
    assert res.exit_code == 0, res.output
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    idx = _idx()
    torch.testing.assert_close(hf(idx).logits.detach(), _ours(model, idx), rtol=1e-5, atol=1e-5)
    res = runner.invoke(
        app, ["export", "--checkpoint", str(path), "--out", str(tmp_path / "b"), "--format", "safetensors"]
    )
    assert res.exit_code == 0 and (tmp_path / "b" / "model.safetensors").is_file()
    res = runner.invoke(app, ["export", "--out", str(tmp_path / "c")])
    assert isinstance(res.exception, UserError) and "give exactly one" in str(res.exception)  # the CLI: one line


# ---------------------------------------------------------------------------------------------------------
# tokenizers: every kimi-bench tokenizer goes out in a form AutoTokenizer loads, with the same ids both ways

TEXT = "def sub(a, b):\n\treturn a - b  # üñí 日本語 <unk> \U0001f600\r\n"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # tiktoken gpt2's


def _fake_gpt2(monkeypatch):
    """tiktoken's gpt2 files are not on this offline machine: an Encoding with GPT-2's pattern, all bytes and
    a few merges, and <|endoftext|> after them, stands in (the conversion code is the same)."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"de", b"def", b" a", b" b", b"re", b"ret", b"ur", b"urn"):
        ranks.setdefault(merge, len(ranks))
    fake = tiktoken.Encoding(
        "gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)}
    )
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)


def _tokenizer(kind: str, tmp_path, monkeypatch):
    from harness.data import BPETokenizer, ByteTokenizer, CharTokenizer, GPT2Tokenizer

    train = ["def add(a, b):\n    return a + b\n", "class Foo:\n    pass  # é\n", "import os, sys  # tools\n"] * 20
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.fit(train)
    if kind == "bpe":
        return BPETokenizer.train(train, vocab_size=300)
    _fake_gpt2(monkeypatch)
    return GPT2Tokenizer()


@pytest.mark.parametrize("kind", ["byte", "char", "bpe", "gpt2"])
def test_saved_tokenizer_loads_in_autotokenizer_with_our_ids(tmp_path, monkeypatch, kind):
    from harness.export import _write_hf_tokenizer

    ours = _tokenizer(kind, tmp_path, monkeypatch)
    _write_hf_tokenizer(ours, tmp_path / "tok")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(theirs) == ours.vocab_size if kind != "gpt2" else len(theirs) == ours.enc.n_vocab
    ids = ours.encode(TEXT)
    assert theirs(TEXT)["input_ids"] == ids
    assert theirs.decode(ids) == ours.decode(ids)
    every_id = list(range(len(theirs)))  # each token alone and all in a row decode alike (U+FFFD included)
    assert theirs.decode(every_id) == ours.decode(every_id)
    if kind == "char":  # a character never seen in training: <unk>, shown as U+FFFD by both
        assert theirs("Z€")["input_ids"] == ours.encode("Z€") == [ours.unk_id] * 2
        assert theirs.decode(ours.encode("Z€")) == "\ufffd\ufffd"


def _trained_like(tmp_path, variant: str, tokenizer: str):
    """A random model of the vocabulary a real data preparation gives `tokenizer`, saved as a trial does."""
    from tests.harness.data.common import folder

    data = {"corpus": f"text:{folder(tmp_path)}", "tokenizer": tokenizer}
    if tokenizer == "bpe":
        data["vocab_size"] = 300
    from harness.data.bar import prepare_data

    prepared = prepare_data(dict(data), str(tmp_path / "cache"), None)
    torch.manual_seed(0)
    dims = resolve_dims("tiny", prepared.vocab_size, None)
    model = build_model(variant, dims)
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "variant": variant, "dims": dataclasses.asdict(dims), "data": data}, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "tokenizer"), [("gpt", "byte"), ("gpt", "char"), ("gpt", "bpe"), ("kimi", "char")])
def test_hf_export_generates_what_kimi_bench_generate_does(tmp_path, variant, tokenizer):
    """The first thing a user writes: AutoTokenizer + AutoModelForCausalLM.generate on the exported folder,
    greedy, gives the tokens and the text of `kimi-bench generate --temperature 0` on the checkpoint."""
    from rich.console import Console

    from harness.measure.trained import sample_text

    path = _trained_like(tmp_path, variant, tokenizer)
    cache = str(tmp_path / "cache")
    lines = export(path, "hf", tmp_path / "hf", cache_dir=cache)
    assert lines[-1].startswith(f"tokenizer saved ({tokenizer}"), lines
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = "def alpha(beta):\n    return"
    inputs = tok(prompt, return_tensors="pt")
    assert inputs["input_ids"].shape[1] > 0  # the reported bug: an empty GPT2Tokenizer gave zero tokens
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=0)
    theirs = tok.decode(out[0])
    ours = sample_text(path, prompt, 16, 0.0, None, 0, None, cache, "cpu", Console(quiet=True))
    assert out.shape[1] == inputs["input_ids"].shape[1] + 16
    assert theirs == ours
