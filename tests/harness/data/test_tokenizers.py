"""harness/data/tokenizers.py: round trips, char vocab from train only, BPE cached and deterministic, gpt2."""

import numpy as np
import pytest
import torch

from harness.data import ByteTokenizer, CharTokenizer, DataConfig, GPT2Tokenizer, prepare
from harness.errors import UserError
from tests.harness.data.common import SAMPLE, folder, make_cfg, one_line_user_error


def test_byte_and_char_round_trip(tmp_path):
    byte = ByteTokenizer()
    ids = byte.encode(SAMPLE)
    assert max(ids) < 256 and byte.decode(ids) == SAMPLE
    assert byte.decode(torch.tensor(ids)) == SAMPLE
    assert byte.decode([104, 105, 300]) == "hi\ufffd"  # a padded model's extra id

    char = CharTokenizer.fit([SAMPLE])
    assert char.decode(char.encode(SAMPLE)) == SAMPLE
    assert char.vocab_size == len(set(SAMPLE)) + 1 and char.chars == "".join(sorted(set(SAMPLE)))
    assert char.encode("Z") == [char.unk_id] and char.decode([char.unk_id]) == "\ufffd"


def test_char_vocab_from_train_split_only(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("ab" * 450 + "aZ" * 50)  # "Z" only in the last 10%: val
    d = prepare(make_cfg(tmp_path, f"text:{path}", tokenizer="char"))
    assert d.tokenizer.chars == "ab" and d.vocab_size == 3
    assert (np.asarray(d.val) == d.tokenizer.unk_id).sum() == 50
    # loaded from the cache, the same tokenizer comes back
    again = prepare(make_cfg(tmp_path, f"text:{path}", tokenizer="char"))
    assert again.from_cache and again.tokenizer.chars == "ab"


def test_bpe_trains_caches_and_round_trips(tmp_path):
    root = folder(tmp_path)
    d = prepare(make_cfg(tmp_path, f"text:{root}", tokenizer="bpe", vocab_size=300))
    assert d.vocab_size == 300 and d.tokenizer.identity.startswith("bpe:bytelevel")
    assert int(max(d.train.max(), d.val.max())) < 300
    assert d.n_train_tokens < d.meta["n_train_chars"]  # merges compress
    for text in (SAMPLE, (root / "f01.txt").read_text()):
        assert d.tokenizer.decode(d.tokenizer.encode(text)) == text
    assert len(list((tmp_path / "cache" / "tokenizers").glob("bpe-300-*.json"))) == 1
    cached = prepare(make_cfg(tmp_path, f"text:{root}", tokenizer="bpe", vocab_size=300))
    assert cached.from_cache and cached.tokenizer.encode(SAMPLE) == d.tokenizer.encode(SAMPLE)
    # deterministic: a fresh cache dir trains the same tokenizer and gives the same tokens
    fresh = prepare(DataConfig(corpus=f"text:{root}", tokenizer="bpe", vocab_size=300, cache_dir=tmp_path / "c2"))
    assert not fresh.from_cache and fresh.data_hash == d.data_hash
    np.testing.assert_array_equal(fresh.train, d.train)


def test_gpt2_offline_error_and_wrapper(tmp_path, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'\n(no network)")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError) as e:
        prepare(make_cfg(tmp_path, f"text:{folder(tmp_path)}", tokenizer="gpt2"))
    one_line_user_error(e, "tokenizer:", "TIKTOKEN_CACHE_DIR")

    # with an encoding available the wrapper encodes/decodes through tiktoken (a byte-level stand-in here)
    fake = tiktoken.Encoding(
        "fake", pat_str=r"\s+|\S+", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={}
    )
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    tok = GPT2Tokenizer()
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE and tok.identity == "tiktoken:gpt2"
