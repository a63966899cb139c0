"""vocab_size_for (the vocabulary without preparing, offline) and PreparedData.val_bytes (bits per byte)."""

import math
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from harness.data import DataConfig, GPT2Tokenizer, prepare, vocab_size_for
from harness.errors import UserError
from tests.harness.data.common import folder, make_cfg

REPO = Path(__file__).resolve().parents[3]
TEXT = "Ünïcode wörds, plain words; € and 日本 at the end.\n" * 60  # every val character is in train too


@pytest.fixture
def offline(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("vocab_size_for reached for the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.delenv("KIMI_BENCH_DATA", raising=False)


def _fields(tmp_path, **kw):
    return {"cache_dir": tmp_path / "cache", **kw}


def test_vocab_from_the_definition(tmp_path, offline):
    assert vocab_size_for(_fields(tmp_path, corpus="tinystories", tokenizer="gpt2")) == (50257, True)
    assert vocab_size_for(_fields(tmp_path, corpus="python-stdlib")) == (256, True)
    assert vocab_size_for(_fields(tmp_path, tokenizer="byte", vocab_size=320)) == (320, True)  # padded
    assert vocab_size_for(_fields(tmp_path, corpus="tinystories", tokenizer="bpe", vocab_size=8000)) == (8000, True)
    assert not (tmp_path / "cache").exists()  # nothing was looked at
    with pytest.raises(UserError, match="^vocab_size: 100 is smaller than the 256"):
        vocab_size_for(_fields(tmp_path, vocab_size=100))


def test_vocab_estimated_when_the_corpus_is_not_here(tmp_path, offline):
    assert vocab_size_for(_fields(tmp_path, corpus="tinystories", tokenizer="bpe")) == (4096, False)
    assert vocab_size_for(_fields(tmp_path, corpus="tinyshakespeare", tokenizer="char")) == (257, False)


def test_char_and_bpe_vocab_exact_from_the_corpus_or_the_cache(tmp_path, offline):
    root = folder(tmp_path)
    char = _fields(tmp_path, corpus=f"text:{root}", tokenizer="char", max_chars=3000)
    before = vocab_size_for(char)  # from the corpus on disk, nothing prepared yet
    prepared = prepare(DataConfig(**char))
    assert before == (prepared.vocab_size, True) and vocab_size_for(char) == before
    bpe = _fields(tmp_path, corpus=f"text:{root}", tokenizer="bpe")
    assert vocab_size_for(bpe) == (4096, False)  # not prepared: the default target, maybe not reached
    small = prepare(DataConfig(**bpe))
    assert small.vocab_size < 4096 and vocab_size_for(bpe) == (small.vocab_size, True)  # the cache knows


def test_vocab_of_a_bin_folder(tmp_path, offline):
    (tmp_path / "b").mkdir()
    for split in ("train", "val"):
        np.zeros(100, dtype=np.uint16).tofile(tmp_path / "b" / f"{split}.bin")
    (tmp_path / "b" / "meta.json").write_text('{"vocab_size": 65}')
    assert vocab_size_for(_fields(tmp_path, corpus=f"bin:{tmp_path / 'b'}")) == (65, True)


def test_every_shipped_matrix_offline(tmp_path, offline, monkeypatch):
    from harness.spec.matrix import load_matrix

    monkeypatch.setenv("KIMI_BENCH_CACHE", str(tmp_path / "cache"))
    for path in sorted((REPO / "experiments").glob("*.toml")):
        vocab, exact = vocab_size_for(load_matrix(path).data_fields())
        assert vocab >= 2, path


# --- val_bytes ----------------------------------------------------------------------------------------------


def _single_file(tmp_path, text=TEXT):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    return path, text[int(len(text) * 0.9) :]  # a single file splits by characters: the last 10% is val


def test_val_bytes_byte_tokenizer_is_the_token_count(tmp_path):
    path, val_text = _single_file(tmp_path)
    d = prepare(make_cfg(tmp_path, f"text:{path}"))
    assert d.val_bytes(len(d.val)) == len(val_text.encode("utf-8")) == len(d.val)
    assert d.val_bytes(37) == 37 and d.val_bytes(0) == 0


def test_val_bytes_char_tokenizer_by_hand(tmp_path):
    path, val_text = _single_file(tmp_path)
    d = prepare(make_cfg(tmp_path, f"text:{path}", tokenizer="char"))
    assert len(d.val) == len(val_text)  # one token per character
    for n in (0, 1, 50, len(val_text)):
        assert d.val_bytes(n) == len(val_text[:n].encode("utf-8")), n
    assert d.val_bytes(len(val_text)) > len(val_text)  # € and 日本 are several bytes each
    # a character never seen in train is <unk>: it counts the 3 bytes of the U+FFFD it decodes to
    path2, val2 = _single_file(tmp_path / "u", "abc" * 300 + "ab\u00e9" * 34)
    d2 = prepare(make_cfg(tmp_path / "u", f"text:{path2}", tokenizer="char"))
    n_unk = val2.count("\u00e9")
    assert n_unk > 0 and d2.val_bytes(len(d2.val)) == len(val2.encode()) - 2 * n_unk + 3 * n_unk


def test_val_bytes_bpe_by_hand(tmp_path):
    path, val_text = _single_file(tmp_path)
    d = prepare(make_cfg(tmp_path, f"text:{path}", tokenizer="bpe", vocab_size=300))
    assert d.n_val_tokens < len(val_text.encode())  # merges: fewer tokens than bytes
    assert d.val_bytes(len(d.val)) == len(val_text.encode("utf-8"))
    ids = [int(i) for i in d.val]
    checked = 0
    for n in range(1, len(ids)):  # every prefix that ends on a character boundary
        prefix = d.tokenizer.decode(ids[:n])
        if "\ufffd" not in prefix and val_text.startswith(prefix):
            assert d.val_bytes(n) == len(prefix.encode("utf-8")), n
            checked += 1
    assert checked > len(ids) // 2
    bpb = 1.0 * d.n_val_tokens / d.val_bytes(d.n_val_tokens) / math.log(2)  # the formula's units: bits/byte
    assert 0 < bpb < 1 / math.log(2)


def test_gpt2_special_tokens_count_zero_bytes(monkeypatch):
    import tiktoken

    fake = tiktoken.Encoding(
        "fake",
        pat_str=r"\s+|\S+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256},
    )
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    sizes = GPT2Tokenizer().token_bytes()
    assert len(sizes) == 257 and sizes[256] == 0 and (sizes[:256] == 1).all()
