import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from harness import data as D
from harness.data import (
    ByteTokenizer,
    CharTokenizer,
    DataConfig,
    TokenBatches,
    n_val_tokens,
    prepare,
    val_batches,
)
from harness.errors import UserError

SAMPLE = "def f(x):\n\treturn x ** 2  # é, 日本語, \u00a0 tabs\tand\r\nCRLF \U0001f600\n"


def _folder(tmp_path, n_files=12, seed=0):
    """A small text folder: files of varied words, deterministic."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "self", "lambda", "ÿ", "\n", "    "]
    root = tmp_path / f"corpus{seed}"
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        text = " ".join(rng.choice(words, size=400)) + "\n"
        (root / ("sub" if i % 3 == 0 else "") / f"f{i:02d}.txt").write_text(text, encoding="utf-8")
    (root / ".hidden").write_text("never read")
    (root / "blob.bin").write_bytes(b"\0\1\2binary")
    return root


def _cfg(tmp_path, corpus, **kw):
    return DataConfig(corpus=corpus, cache_dir=tmp_path / "cache", **kw)


def _one_line_user_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.split(":")[0].isidentifier(), msg  # "field: what; fix"
    for w in words:
        assert w in msg, msg
    return msg


# --- prepare, cache, hashes --------------------------------------------------------------------------------


def test_prepare_same_hash_and_loads_from_cache(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, f"text:{_folder(tmp_path)}")
    calls = []
    first = prepare(cfg, progress=lambda d, c, t: calls.append((d, c, t)))
    assert not first.from_cache and first.n_train_tokens > 0 and first.n_val_tokens > 0
    assert len(first.data_hash) == 64 and (tmp_path / "cache" / first.data_hash / "meta.json").is_file()
    # every progress task ends with completed == total
    for desc in {d for d, _, _ in calls}:
        last = [c for c in calls if c[0] == desc][-1]
        assert last[1] == last[2], last

    def boom(*a, **k):
        raise AssertionError("re-tokenized a cached corpus")

    monkeypatch.setattr(D, "_tokenize_split", boom)
    second = prepare(cfg)
    assert second.from_cache and second.data_hash == first.data_hash
    assert isinstance(second.train, np.memmap) and second.train.dtype == np.uint16
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.val, first.val)
    info = second.info()
    assert info["n_train_tokens"] == second.n_train_tokens and info["tokenizer"] == "byte:utf-8"
    assert info["n_train_docs"] + info["n_val_docs"] == 12  # hidden and binary files skipped


def test_hash_changes_with_any_input(tmp_path):
    root = _folder(tmp_path)
    base = prepare(_cfg(tmp_path, f"text:{root}")).data_hash
    other = {
        prepare(_cfg(tmp_path, f"text:{root}", tokenizer="char")).data_hash,
        prepare(_cfg(tmp_path, f"text:{_folder(tmp_path, seed=1)}")).data_hash,
        prepare(_cfg(tmp_path, f"text:{root}", max_chars=3000)).data_hash,
        prepare(_cfg(tmp_path, f"text:{root}", val_fraction=0.3)).data_hash,
        prepare(_cfg(tmp_path, f"text:{root}", vocab_size=300)).data_hash,
    }
    assert base not in other and len(other) == 5
    (root / "f01.txt").write_text("changed\n")  # same path, new content
    assert prepare(_cfg(tmp_path, f"text:{root}")).data_hash not in other | {base}


def test_killed_prepare_leaves_no_cache(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, f"text:{_folder(tmp_path)}")
    real = D._tokenize_split

    def dies_on_val(tok, docs, limit, dtype, out, progress, what):
        if what.endswith("val"):
            raise KeyboardInterrupt
        return real(tok, docs, limit, dtype, out, progress, what)

    monkeypatch.setattr(D, "_tokenize_split", dies_on_val)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert not [p for p in (tmp_path / "cache").iterdir() if len(p.name) == 64 or p.name.startswith(".tmp")]
    monkeypatch.setattr(D, "_tokenize_split", real)
    assert not prepare(cfg).from_cache and prepare(cfg).from_cache


def test_concurrent_prepare_keeps_the_first_cache(tmp_path):
    cfg = _cfg(tmp_path, f"text:{_folder(tmp_path)}")
    first = prepare(cfg)
    corpus = D.load_corpus(cfg)
    D._write_cache(cfg, corpus, first.data_hash, D._noop)  # a second writer finishing later: no error
    assert prepare(cfg).from_cache and not list((tmp_path / "cache").glob(".tmp-*"))
    (first.path / "val.bin").write_bytes(b"\0")  # a damaged cache is detected and rebuilt
    rebuilt = prepare(cfg)
    assert not rebuilt.from_cache and rebuilt.n_val_tokens == first.n_val_tokens


def test_pieces_cut_after_newlines_and_lose_nothing():
    text = ("x" * 7 + "\n") * 5 + "y" * 25
    pieces = list(D._pieces(text, size=10))
    assert "".join(pieces) == text and all(len(p) <= 10 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:5])


def test_max_chars_caps_each_split(tmp_path):
    d = prepare(_cfg(tmp_path, f"text:{_folder(tmp_path)}", max_chars=2000, val_fraction=0.25))
    assert (d.meta["n_train_chars"], d.meta["n_val_chars"]) == (1500, 500)


# --- tokenizers -----------------------------------------------------------------------------------


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
    d = prepare(_cfg(tmp_path, f"text:{path}", tokenizer="char"))
    assert d.tokenizer.chars == "ab" and d.vocab_size == 3
    assert (np.asarray(d.val) == d.tokenizer.unk_id).sum() == 50
    # loaded from the cache, the same tokenizer comes back
    again = prepare(_cfg(tmp_path, f"text:{path}", tokenizer="char"))
    assert again.from_cache and again.tokenizer.chars == "ab"


def test_bpe_trains_caches_and_round_trips(tmp_path):
    root = _folder(tmp_path)
    d = prepare(_cfg(tmp_path, f"text:{root}", tokenizer="bpe", vocab_size=300))
    assert d.vocab_size == 300 and d.tokenizer.identity.startswith("bpe:bytelevel")
    assert int(max(d.train.max(), d.val.max())) < 300
    assert d.n_train_tokens < d.meta["n_train_chars"]  # merges compress
    for text in (SAMPLE, (root / "f01.txt").read_text()):
        assert d.tokenizer.decode(d.tokenizer.encode(text)) == text
    assert len(list((tmp_path / "cache" / "tokenizers").glob("bpe-300-*.json"))) == 1
    cached = prepare(_cfg(tmp_path, f"text:{root}", tokenizer="bpe", vocab_size=300))
    assert cached.from_cache and cached.tokenizer.encode(SAMPLE) == d.tokenizer.encode(SAMPLE)
    # deterministic: a fresh cache dir trains the same tokenizer and gives the same tokens
    fresh = prepare(DataConfig(f"text:{root}", "bpe", vocab_size=300, cache_dir=tmp_path / "c2"))
    assert not fresh.from_cache and fresh.data_hash == d.data_hash
    np.testing.assert_array_equal(fresh.train, d.train)


def test_gpt2_offline_error_and_wrapper(tmp_path, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'\n(no network)")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError) as e:
        prepare(_cfg(tmp_path, f"text:{_folder(tmp_path)}", tokenizer="gpt2"))
    _one_line_user_error(e, "tokenizer:", "TIKTOKEN_CACHE_DIR")

    # with an encoding available the wrapper encodes/decodes through tiktoken (a byte-level stand-in here)
    fake = tiktoken.Encoding("fake", pat_str=r"\s+|\S+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    tok = D.GPT2Tokenizer()
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE and tok.identity == "tiktoken:gpt2"


# --- corpora --------------------------------------------------------------------------------------


def test_stdlib_split_by_file_is_disjoint_and_prepares(tmp_path):
    root, files = D._stdlib_files(include_tests=False)
    assert len(files) > 100 and [n for n, _ in files] == sorted(n for n, _ in files)
    assert not any(part in {"test", "tests", "site-packages"} for n, _ in files for part in n.split("/"))
    corpus = D.load_corpus(_cfg(tmp_path, "python-stdlib"))
    train = {d.name for d in corpus.train_docs}
    val = {d.name for d in corpus.val_docs}
    assert train and val and not train & val and train | val == {n for n, _ in files}
    d = prepare(_cfg(tmp_path, "python-stdlib", max_chars=100_000))
    assert d.n_train_tokens >= 90_000 and d.n_val_tokens >= 10_000  # byte tokens >= characters
    assert d.meta["notes"]["python"] and d.corpus_name == "python-stdlib"


def test_text_single_file_splits_by_chars(tmp_path):
    path = tmp_path / "t.txt"
    text = "".join(chr(97 + i % 26) for i in range(1000)) + "é"
    path.write_text(text, encoding="utf-8")
    d = prepare(_cfg(tmp_path, f"text:{path}"))
    assert d.tokenizer.decode(d.train) == text[:900] and d.tokenizer.decode(d.val) == text[900:]


def test_tinyshakespeare_offline_then_from_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("KIMI_BENCH_DATA", raising=False)
    monkeypatch.delenv("KIMI_BENCH_OFFLINE", raising=False)

    def no_network(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cfg = _cfg(tmp_path, "tinyshakespeare", tokenizer="char")
    with pytest.raises(UserError) as e:
        prepare(cfg)
    _one_line_user_error(e, "corpus:", "text:PATH", str(tmp_path / "cache" / "corpora" / "tinyshakespeare"))

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 40
    dest = tmp_path / "cache" / "corpora" / "tinyshakespeare" / "input.txt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    d = prepare(cfg)
    n = len(text)
    assert d.tokenizer.decode(d.train) == text[: int(n * 0.9)]  # nanoGPT's shakespeare_char split
    assert d.tokenizer.decode(d.val) == text[int(n * 0.9):]


def test_tinystories_offline_error_and_official_split(tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_BENCH_OFFLINE", "1")
    monkeypatch.setenv("KIMI_BENCH_DATA", str(tmp_path / "data"))
    with pytest.raises(UserError) as e:
        prepare(_cfg(tmp_path, "tinystories"))
    _one_line_user_error(e, "corpus:", "TinyStories", "KIMI_BENCH_DATA")
    folder = tmp_path / "data" / "tinystories"
    folder.mkdir(parents=True)
    (folder / "TinyStoriesV2-GPT4-train.txt").write_text("Once upon a time.\n<|endoftext|>\n" * 30)
    (folder / "TinyStoriesV2-GPT4-valid.txt").write_text("The end.\n" * 10)
    d = prepare(_cfg(tmp_path, "tinystories"))
    assert d.tokenizer.decode(d.val) == "The end.\n" * 10 and d.meta["split_rule"] == "official-files"


def test_download_writes_file_atomically(tmp_path, monkeypatch):
    body = b"hello shakespeare\n" * 100

    class Response:
        headers = {"Content-Length": str(len(body))}

        def __init__(self):
            self.left = body

        def read(self, n):
            chunk, self.left = self.left[:n], self.left[n:]
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.delenv("KIMI_BENCH_DATA", raising=False)
    monkeypatch.delenv("KIMI_BENCH_OFFLINE", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response())
    d = prepare(_cfg(tmp_path, "tinyshakespeare"))
    assert d.n_train_tokens + d.n_val_tokens == len(body)
    folder = tmp_path / "cache" / "corpora" / "tinyshakespeare"
    assert [p.name for p in folder.iterdir()] == ["input.txt"]


def test_bin_dir_nanogpt_style(tmp_path):
    root = tmp_path / "shakespeare_char"
    root.mkdir()
    train = np.arange(5000, dtype=np.uint16) % 65
    val = np.arange(700, dtype=np.uint16) % 65
    train.tofile(root / "train.bin")
    val.tofile(root / "val.bin")
    (root / "meta.pkl").write_bytes(b"not unpickled")
    with pytest.raises(UserError) as e:
        prepare(_cfg(tmp_path, f"bin:{root}"))
    _one_line_user_error(e, "vocab_size:", "meta.json", "pickle")

    d = prepare(_cfg(tmp_path, f"bin:{root}", vocab_size=65))
    assert d.vocab_size == 65 and isinstance(d.train, np.memmap)
    np.testing.assert_array_equal(d.train, train)
    np.testing.assert_array_equal(d.val, val)
    assert d.tokenizer.kind == "opaque"

    (root / "meta.json").write_text(json.dumps({"vocab_size": 65}))
    d2 = prepare(_cfg(tmp_path, f"bin:{root}", max_chars=1000))
    assert (d2.n_train_tokens, d2.n_val_tokens) == (900, 100) and d2.vocab_size == 65
    assert d2.data_hash != prepare(_cfg(tmp_path, f"bin:{root}")).data_hash


# --- errors ---------------------------------------------------------------------------------------


def test_user_errors_are_one_line_with_suggestions(tmp_path):
    with pytest.raises(UserError) as e:
        DataConfig(corpus="python-stdlb")
    _one_line_user_error(e, "corpus:", "'python-stdlib'")
    with pytest.raises(UserError) as e:
        DataConfig(tokenizer="bpee")
    _one_line_user_error(e, "tokenizer:", "'bpe'")
    with pytest.raises(UserError) as e:
        prepare(_cfg(tmp_path, f"text:{tmp_path / 'missing.txt'}"))
    _one_line_user_error(e, "corpus:", "missing.txt")
    with pytest.raises(UserError) as e:
        DataConfig(val_fraction=1.5)
    _one_line_user_error(e, "val_fraction:")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError) as e:
        prepare(DataConfig(corpus=f"text:{_folder(tmp_path)}", cache_dir=tmp_path / "afile" / "cache"))
    _one_line_user_error(e, "cache_dir:", "KIMI_BENCH_CACHE")
    with pytest.raises(UserError) as e:
        prepare(_cfg(tmp_path, f"text:{_folder(tmp_path)}", tokenizer="char", vocab_size=5))
    _one_line_user_error(e, "vocab_size:")


def test_default_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KIMI_BENCH_CACHE", str(tmp_path / "kc"))
    assert DataConfig().cache_dir == tmp_path / "kc"
    monkeypatch.delenv("KIMI_BENCH_CACHE")
    assert DataConfig().cache_dir == D.Path(".kimi-cache")


# --- batches --------------------------------------------------------------------------------------


TOKENS = (np.arange(10_000) * 7 % 60_000).astype(np.uint16)


def test_batches_deterministic_shifted_and_seeded():
    b = TokenBatches(TOKENS, block_size=16, micro_batch_size=4, seed=1)
    x, y = b.get(3)
    assert x.dtype == torch.long and x.shape == y.shape == (4, 16)
    x2, y2 = TokenBatches(TOKENS, 16, 4, seed=1).get(3)  # a fresh object: no state needed to resume
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    for row, start in enumerate(b.offsets(3)[:4]):  # rows are the windows at the step's offsets
        assert torch.equal(x[row], torch.from_numpy(TOKENS[start:start + 16].astype(np.int64)))
        assert torch.equal(y[row], torch.from_numpy(TOKENS[start + 1:start + 17].astype(np.int64)))
    assert not torch.equal(x, TokenBatches(TOKENS, 16, 4, seed=2).get(3)[0])
    assert not torch.equal(x, b.get(4)[0])


def test_grad_accum_equals_ranks():
    one = TokenBatches(TOKENS, 8, 3, grad_accum=2, seed=5, world_size=1)
    two = TokenBatches(TOKENS, 8, 3, grad_accum=1, seed=5, world_size=2)
    for step in (0, 7):
        for m in range(2):
            assert torch.equal(one.get(step, micro=m)[0], two.get(step, micro=0, rank=m)[0])
    # 2 ranks x 2 micro-steps: rank r, micro m takes global rows (m * 2 + r) * B
    four = TokenBatches(TOKENS, 8, 3, grad_accum=2, seed=5, world_size=2)
    rows = np.concatenate([four.offsets(7)[(m * 2 + r) * 3:][:3] for m in range(2) for r in range(2)])
    np.testing.assert_array_equal(np.sort(rows), np.sort(four.offsets(7)))


def test_batches_errors():
    with pytest.raises(UserError):
        TokenBatches(TOKENS[:10], block_size=16, micro_batch_size=2)
    with pytest.raises(ValueError):
        TokenBatches(TOKENS, 16, 2, grad_accum=2).get(0, micro=2)


def test_val_batches_cover_split_in_order():
    val = np.arange(1000, dtype=np.uint16)
    xs, ys = zip(*val_batches(val, block_size=10, batch_size=16), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert [len(t) for t in xs] == [16] * 6 + [3]  # 99 blocks: (1000 - 1) // 10
    assert n_val_tokens(val, 10) == x.numel() == 990
    assert torch.equal(x.flatten(), torch.arange(990)) and torch.equal(y.flatten(), torch.arange(1, 991))
    capped = list(val_batches(val, 10, 4, max_tokens=95))
    assert n_val_tokens(val, 10, max_tokens=95) == 90 == sum(b[0].numel() for b in capped)
    assert torch.equal(torch.cat([b[0] for b in capped]).flatten(), torch.arange(90))
    shards = [list(val_batches(val, 10, 16, rank=r, world_size=2)) for r in range(2)]
    assert sum(len(s) for s in shards) == 7 and torch.equal(shards[1][0][0], xs[1])
    with pytest.raises(UserError):
        list(val_batches(val[:5], 10, 4))
