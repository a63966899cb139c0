"""Small corpora and assertions shared by the harness/data tests."""

from __future__ import annotations

import numpy as np

from harness.data import DataConfig

SAMPLE = "def f(x):\n\treturn x ** 2  # é, 日本語, \u00a0 tabs\tand\r\nCRLF \U0001f600\n"


def folder(tmp_path, n_files=12, seed=0):
    """A small text folder: files of varied words, deterministic; one hidden and one binary file."""
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


def make_cfg(tmp_path, corpus, **kw):
    return DataConfig(corpus=corpus, cache_dir=tmp_path / "cache", **kw)


def one_line_user_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.split(":")[0].isidentifier(), msg  # "field: what; fix"
    for w in words:
        assert w in msg, msg
    return msg
