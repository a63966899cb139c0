"""harness/data/corpora.py: the stdlib and site corpora, text files and folders, downloads, bin: folders."""

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from harness.data import corpora as C
from harness.data import load_corpus, prepare
from harness.errors import UserError
from tests.harness.data.common import make_cfg, one_line_user_error


def test_stdlib_split_by_file_is_disjoint_and_prepares(tmp_path):
    root, files = C._stdlib_files(include_tests=False)
    assert len(files) > 100 and [n for n, _ in files] == sorted(n for n, _ in files)
    assert not any(part in {"test", "tests", "site-packages"} for n, _ in files for part in n.split("/"))
    corpus = load_corpus(make_cfg(tmp_path, "python-stdlib"))
    train = {d.name for d in corpus.train_docs}
    val = {d.name for d in corpus.val_docs}
    assert train and val and not train & val and train | val == {n for n, _ in files}
    d = prepare(make_cfg(tmp_path, "python-stdlib", max_chars=100_000))
    assert d.n_train_tokens >= 90_000 and d.n_val_tokens >= 10_000  # byte tokens >= characters
    assert d.meta["notes"]["python"] and d.corpus_name == "python-stdlib"


def test_text_single_file_splits_by_chars(tmp_path):
    path = tmp_path / "t.txt"
    text = "".join(chr(97 + i % 26) for i in range(1000)) + "é"
    path.write_text(text, encoding="utf-8")
    d = prepare(make_cfg(tmp_path, f"text:{path}"))
    assert d.tokenizer.decode(d.train) == text[:900] and d.tokenizer.decode(d.val) == text[900:]


def test_tinyshakespeare_offline_then_from_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("KIMI_BENCH_DATA", raising=False)
    monkeypatch.delenv("KIMI_BENCH_OFFLINE", raising=False)

    def no_network(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cfg = make_cfg(tmp_path, "tinyshakespeare", tokenizer="char")
    with pytest.raises(UserError) as e:
        prepare(cfg)
    one_line_user_error(e, "corpus:", "text:PATH", str(tmp_path / "cache" / "corpora" / "tinyshakespeare"))

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 40
    dest = tmp_path / "cache" / "corpora" / "tinyshakespeare" / "input.txt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    d = prepare(cfg)
    n = len(text)
    assert d.tokenizer.decode(d.train) == text[: int(n * 0.9)]  # nanoGPT's shakespeare_char split
    assert d.tokenizer.decode(d.val) == text[int(n * 0.9) :]


def test_tinystories_offline_error_and_official_split(tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_BENCH_OFFLINE", "1")
    monkeypatch.setenv("KIMI_BENCH_DATA", str(tmp_path / "data"))
    with pytest.raises(UserError) as e:
        prepare(make_cfg(tmp_path, "tinystories"))
    one_line_user_error(e, "corpus:", "TinyStories", "KIMI_BENCH_DATA")
    folder = tmp_path / "data" / "tinystories"
    folder.mkdir(parents=True)
    (folder / "TinyStoriesV2-GPT4-train.txt").write_text("Once upon a time.\n<|endoftext|>\n" * 30)
    (folder / "TinyStoriesV2-GPT4-valid.txt").write_text("The end.\n" * 10)
    d = prepare(make_cfg(tmp_path, "tinystories"))
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
    d = prepare(make_cfg(tmp_path, "tinyshakespeare"))
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
        prepare(make_cfg(tmp_path, f"bin:{root}"))
    one_line_user_error(e, "vocab_size:", "meta.json", "pickle")

    d = prepare(make_cfg(tmp_path, f"bin:{root}", vocab_size=65))
    assert d.vocab_size == 65 and isinstance(d.train, np.memmap)
    np.testing.assert_array_equal(d.train, train)
    np.testing.assert_array_equal(d.val, val)
    assert d.tokenizer.kind == "opaque"

    (root / "meta.json").write_text(json.dumps({"vocab_size": 65}))
    d2 = prepare(make_cfg(tmp_path, f"bin:{root}", max_chars=1000))
    assert (d2.n_train_tokens, d2.n_val_tokens) == (900, 100) and d2.vocab_size == 65
    assert d2.data_hash != prepare(make_cfg(tmp_path, f"bin:{root}")).data_hash


def test_python_site_is_stdlib_plus_site_packages(tmp_path, monkeypatch):
    """A fake interpreter: its stdlib, its purelib (== platlib) and one more site-packages on sys.path."""
    import sys
    import sysconfig

    def write(root, *names):
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(f"# {name}\nx = {len(name)}\n")

    std, site, extra = tmp_path / "lib", tmp_path / "venv" / "site-packages", tmp_path / "main" / "site-packages"
    write(std, "os.py", "json/__init__.py", "test/test_os.py", "site-packages/inside.py")
    write(site, "pkg/__init__.py", "pkg/mod.py", "pkg/__pycache__/mod.py", ".hidden/x.py", "top.py")
    write(extra, "other/a.py", "top.py")  # top.py also in the first folder: the first one's file is used
    (site / "pkg" / "data.txt").write_text("not python")
    monkeypatch.setattr(
        sysconfig, "get_paths", lambda: {"stdlib": str(std), "purelib": str(site), "platlib": str(site)}
    )
    monkeypatch.setattr(sys, "path", [str(std), str(site), str(extra)])
    files = C._site_files()
    assert [n for n, _ in files] == [
        "site/other/a.py",
        "site/pkg/__init__.py",
        "site/pkg/mod.py",
        "site/top.py",
        "stdlib/json/__init__.py",
        "stdlib/os.py",
    ]
    assert dict(files)["site/top.py"] == (site / "top.py").resolve()
    corpus = load_corpus(make_cfg(tmp_path, "python-site", val_fraction=0.3))
    train, val = {d.name for d in corpus.train_docs}, {d.name for d in corpus.val_docs}
    assert train and val and not train & val and train | val == {n for n, _ in files}
    assert corpus.notes["n_site_files"] == 4 and corpus.split_rule.startswith("by-file")
    d = prepare(make_cfg(tmp_path, "python-site"))
    assert d.n_train_tokens + d.n_val_tokens == sum(p.stat().st_size for _, p in files)
    (extra / "other" / "a.py").write_text("changed = 1\n")  # any installed file changes the corpus
    assert load_corpus(make_cfg(tmp_path, "python-site")).content_hash != corpus.content_hash
