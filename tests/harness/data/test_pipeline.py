"""harness/data/pipeline.py and cache.py: prepare once, hashes that change with any input, atomic caches."""

import numpy as np
import pytest

from harness.data import load_corpus, prepare
from harness.data import pipeline as P
from harness.data.config import noop_progress
from tests.harness.data.common import folder, make_cfg


def test_prepare_same_hash_and_loads_from_cache(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, f"text:{folder(tmp_path)}")
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

    monkeypatch.setattr(P, "_tokenize_split", boom)
    second = prepare(cfg)
    assert second.from_cache and second.data_hash == first.data_hash
    assert isinstance(second.train, np.memmap) and second.train.dtype == np.uint16
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.val, first.val)
    info = second.info()
    assert info["n_train_tokens"] == second.n_train_tokens and info["tokenizer"] == "byte:utf-8"
    assert info["n_train_docs"] + info["n_val_docs"] == 12  # hidden and binary files skipped


def test_hash_changes_with_any_input(tmp_path):
    root = folder(tmp_path)
    base = prepare(make_cfg(tmp_path, f"text:{root}")).data_hash
    other = {
        prepare(make_cfg(tmp_path, f"text:{root}", tokenizer="char")).data_hash,
        prepare(make_cfg(tmp_path, f"text:{folder(tmp_path, seed=1)}")).data_hash,
        prepare(make_cfg(tmp_path, f"text:{root}", max_chars=3000)).data_hash,
        prepare(make_cfg(tmp_path, f"text:{root}", val_fraction=0.3)).data_hash,
        prepare(make_cfg(tmp_path, f"text:{root}", vocab_size=300)).data_hash,
    }
    assert base not in other and len(other) == 5
    (root / "f01.txt").write_text("changed\n")  # same path, new content
    assert prepare(make_cfg(tmp_path, f"text:{root}")).data_hash not in other | {base}


def test_killed_prepare_leaves_no_cache(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, f"text:{folder(tmp_path)}")
    real = P._tokenize_split

    def dies_on_val(tok, docs, limit, dtype, out, progress, what):
        if what.endswith("val"):
            raise KeyboardInterrupt
        return real(tok, docs, limit, dtype, out, progress, what)

    monkeypatch.setattr(P, "_tokenize_split", dies_on_val)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert not [p for p in (tmp_path / "cache").iterdir() if len(p.name) == 64 or p.name.startswith(".tmp")]
    monkeypatch.setattr(P, "_tokenize_split", real)
    assert not prepare(cfg).from_cache and prepare(cfg).from_cache


def test_concurrent_prepare_keeps_the_first_cache(tmp_path):
    cfg = make_cfg(tmp_path, f"text:{folder(tmp_path)}")
    first = prepare(cfg)
    corpus = load_corpus(cfg)
    P._write_cache(cfg, corpus, first.data_hash, noop_progress)  # a second writer finishing later: no error
    assert prepare(cfg).from_cache and not list((tmp_path / "cache").glob(".tmp-*"))
    (first.path / "val.bin").write_bytes(b"\0")  # a damaged cache is detected and rebuilt
    rebuilt = prepare(cfg)
    assert not rebuilt.from_cache and rebuilt.n_val_tokens == first.n_val_tokens


def test_pieces_cut_after_newlines_and_lose_nothing():
    text = ("x" * 7 + "\n") * 5 + "y" * 25
    pieces = list(P._pieces(text, size=10))
    assert "".join(pieces) == text and all(len(p) <= 10 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:5])


def test_max_chars_caps_each_split(tmp_path):
    d = prepare(make_cfg(tmp_path, f"text:{folder(tmp_path)}", max_chars=2000, val_fraction=0.25))
    assert (d.meta["n_train_chars"], d.meta["n_val_chars"]) == (1500, 500)
