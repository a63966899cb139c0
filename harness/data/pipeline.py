"""prepare(): corpus -> tokenizer -> token arrays in the cache, memmapped; and what can be known without it.

max_chars caps the text per split: train keeps its first int(max_chars * (1 - val_fraction)) characters,
val its first max_chars - that (for bin: the same rule in tokens). Documents are concatenated without
separator tokens; every document is tokenized on its own (huge ones in ~1 MB pieces cut after a newline).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from harness.data.cache import FORMAT_VERSION, atomic_write, dtype_for, json_bytes, load_cached, publish, sha256_json
from harness.data.config import DataConfig, Progress, noop_progress
from harness.data.corpora import Corpus, Doc, load_corpus, no_downloads
from harness.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    OpaqueTokenizer,
    Tokenizer,
    tokenizer_from_spec,
    tokenizer_identity,
)
from harness.errors import UserError

PIECE_CHARS = 1 << 20  # documents longer than this are encoded in pieces (memory, progress, parallelism)


@dataclass
class PreparedData:
    train: np.ndarray  # 1-D memmaps of token ids
    val: np.ndarray
    vocab_size: int  # the id space a model must cover (>= tokenizer.vocab_size)
    data_hash: str
    tokenizer: Tokenizer
    corpus_name: str
    n_train_tokens: int
    n_val_tokens: int
    path: Path  # the cache folder (for bin: the corpus folder)
    meta: dict = field(default_factory=dict)
    from_cache: bool = False

    def info(self) -> dict:
        files = [self.path / "train.bin", self.path / "val.bin"]
        return {
            **self.meta,
            "corpus": self.corpus_name,
            "data_hash": self.data_hash,
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer.identity,
            "n_train_tokens": self.n_train_tokens,
            "n_val_tokens": self.n_val_tokens,
            "dtype": str(self.train.dtype),
            "path": str(self.path.resolve()),
            "from_cache": self.from_cache,
            "disk_bytes": sum(f.stat().st_size for f in files if f.exists()),
        }

    def val_bytes(self, n_tokens: int) -> int:
        """UTF-8 bytes of the text that the first n_tokens of the val split encode: the denominator of bits
        per byte. Each id counts its own bytes (byte: 1; char: its character's UTF-8 length; bpe, gpt2: the
        bytes of its merge); ids that stand for no text count 0: special tokens (gpt2's <|endoftext|>, which
        bin: corpora may hold) and padding ids beyond the tokenizer. char's <unk> counts 3, the bytes of the
        U+FFFD it decodes to (the character it replaced is not in the ids). Memoized per n_tokens."""
        if not 0 <= n_tokens <= len(self.val):
            raise ValueError(f"n_tokens must be in [0, {len(self.val)}], got {n_tokens}")
        if n_tokens not in self._val_bytes_memo:
            ids = np.asarray(self.val[:n_tokens], dtype=np.int64)
            self._val_bytes_memo[n_tokens] = int(self._token_bytes[np.minimum(ids, len(self._token_bytes) - 1)].sum())
        return self._val_bytes_memo[n_tokens]

    @cached_property
    def _token_bytes(self) -> np.ndarray:
        """Bytes per id over the model's id space (padding ids and one spare slot at the end: 0)."""
        table = np.zeros(max(self.vocab_size, self.tokenizer.vocab_size) + 1, dtype=np.int64)
        own = self.tokenizer.token_bytes()
        table[: len(own)] = own
        return table

    @cached_property
    def _val_bytes_memo(self) -> dict[int, int]:
        return {}


def _cap(docs: list[Doc], limit: int | None) -> Iterator[str]:
    """The texts of docs in order, truncated after `limit` characters in all."""
    for d in docs:
        if limit is not None and limit <= 0:
            return
        text = d.read()
        if limit is not None:
            text = text[:limit]
            limit -= len(text)
        yield text


def _pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """Cut after the last newline within `size` characters (deterministic), else at `size`."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size) + 1 or start + size
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def _split_limits(cfg: DataConfig) -> tuple[int | None, int | None]:
    if cfg.max_chars is None:
        return None, None
    n_train = int(cfg.max_chars * (1 - cfg.val_fraction))
    return n_train, cfg.max_chars - n_train


def _build_tokenizer(cfg: DataConfig, corpus: Corpus, limit: int | None, progress: Progress) -> Tokenizer:
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "gpt2":
        tok = GPT2Tokenizer()
        _ = tok.enc  # fail now, with one UserError line, rather than mid-tokenization
        return tok
    if cfg.tokenizer == "char":
        progress("scan characters", 0, 1)
        tok = CharTokenizer.fit(_cap(corpus.train_docs, limit))
        progress("scan characters", 1, 1)
        return tok
    # bpe: cached by (corpus, split, cap, vocab, library version), trained on the train split only
    vocab = cfg.requested_vocab_size
    key = sha256_json([corpus.content_hash, corpus.split_rule, cfg.max_chars, vocab, BPETokenizer.make_identity()])
    path = cfg.cache_dir / "tokenizers" / f"bpe-{vocab}-{key[:16]}.json"
    if path.is_file():
        return BPETokenizer.from_file(path)
    progress(f"train bpe {vocab}", 0, 1)
    tok = BPETokenizer.train((p for t in _cap(corpus.train_docs, limit) for p in _pieces(t)), vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, tok.tok.to_str().encode())
    progress(f"train bpe {vocab}", 1, 1)
    return tok


def _tokenize_split(
    tok: Tokenizer, docs: list[Doc], limit: int | None, dtype: np.dtype, out: Path, progress: Progress, what: str
) -> tuple[int, int]:
    """Encode docs into the raw array file `out`; -> (tokens, characters)."""
    total = sum(d.size_hint() for d in docs)
    total = min(total, limit) if limit is not None else total
    n_tokens = n_chars = 0
    progress(what, 0, total)
    with open(out, "wb") as f:
        batch: list[str] = []

        def flush() -> None:  # encode a batch of pieces together (bpe/gpt2 encode batches in parallel)
            nonlocal n_tokens, n_chars
            for ids in tok.encode_many(batch):
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                n_tokens += len(ids)
            n_chars += sum(map(len, batch))
            batch.clear()
            progress(what, min(n_chars, total), total)

        batch_chars = 0
        for text in _cap(docs, limit):
            for piece in _pieces(text):
                batch.append(piece)
                batch_chars += len(piece)
                if batch_chars >= PIECE_CHARS:
                    flush()
                    batch_chars = 0
        flush()
    progress(what, total, total)
    return n_tokens, n_chars


def _resolve_vocab(cfg_vocab: int | None, natural: int, what: str) -> int:
    if cfg_vocab is None:
        return natural
    if cfg_vocab < natural:
        raise UserError(
            f"vocab_size: {cfg_vocab} is smaller than the {natural} ids {what} needs; "
            f"unset vocab_size or raise it to >= {natural}"
        )
    return cfg_vocab


def _bin_vocab_and_tokenizer(cfg: DataConfig, corpus: Corpus) -> tuple[int, Tokenizer]:
    """A bin: corpus's id space and tokenizer, from its meta.json and cfg (nothing is read but meta.json)."""
    meta = corpus.bin_meta
    name = f"bin:{corpus.notes['root']}"
    meta_vocab = meta.get("vocab_size")
    if meta_vocab is not None and (not isinstance(meta_vocab, int) or meta_vocab < 2):
        raise UserError(f"vocab_size: {name}/meta.json has vocab_size {meta_vocab!r}; make it an int >= 2")
    if meta_vocab is None and cfg.vocab_size is None:
        pkl = " (meta.pkl is a pickle and is never unpickled)" if corpus.notes["has_meta_pkl"] else ""
        raise UserError(
            f"vocab_size: {name} has no meta.json with vocab_size{pkl}; pass vocab_size=N or "
            f'write {{"vocab_size": N}} to its meta.json'
        )
    vocab = _resolve_vocab(cfg.vocab_size, meta_vocab or 0, "its meta.json")
    tok_name = meta.get("tokenizer") or ("gpt2" if cfg.tokenizer == "gpt2" else None)
    if meta.get("tokenizer") and cfg.tokenizer not in ("byte", meta["tokenizer"]):
        raise UserError(
            f"tokenizer: {name} says its tokenizer is {meta['tokenizer']!r}, not "
            f"{cfg.tokenizer!r}; drop tokenizer or fix its meta.json"
        )
    if tok_name not in (None, "byte", "gpt2"):
        raise UserError(f"tokenizer: {name} meta.json names tokenizer {tok_name!r}; use 'byte', 'gpt2' or none")
    tok = {"byte": ByteTokenizer, "gpt2": GPT2Tokenizer}[tok_name]() if tok_name else OpaqueTokenizer(vocab)
    return vocab, tok


def _prepare_bin(cfg: DataConfig, corpus: Corpus, data_hash_fields: dict) -> PreparedData:
    vocab, tok = _bin_vocab_and_tokenizer(cfg, corpus)
    name = f"bin:{corpus.notes['root']}"
    dtype = np.dtype(corpus.bin_meta.get("dtype", "uint16"))
    data_hash = sha256_json({**data_hash_fields, "tokenizer": tok.identity, "vocab_size": vocab})
    try:
        arrays = {s: np.memmap(corpus.bin_dir / f"{s}.bin", dtype=dtype, mode="r") for s in ("train", "val")}
    except ValueError as e:  # empty file, or a size that is not a multiple of the dtype
        raise UserError(
            f"corpus: {name} train.bin/val.bin cannot be read as {dtype} ({e}); "
            f'fix the files or the "dtype" in meta.json'
        ) from None
    n_train, n_val = _split_limits(cfg)
    train, val = arrays["train"][:n_train], arrays["val"][:n_val]
    info = {
        "corpus_kind": "bin",
        "content_hash": corpus.content_hash,
        "split_rule": corpus.split_rule,
        "max_chars": cfg.max_chars,
        "max_chars_unit": "tokens",
        "notes": corpus.notes,
    }
    return PreparedData(
        train, val, vocab, data_hash, tok, cfg.corpus, len(train), len(val), corpus.bin_dir, info, from_cache=True
    )


def _hash_fields(cfg: DataConfig, corpus: Corpus) -> dict:
    return {
        "format": FORMAT_VERSION,
        "corpus": corpus.kind,
        "content": corpus.content_hash,
        "split": corpus.split_rule,
        "max_chars": cfg.max_chars,
    }


def _text_data_hash(cfg: DataConfig, corpus: Corpus) -> str:
    return sha256_json(
        {
            **_hash_fields(cfg, corpus),
            "tokenizer": tokenizer_identity(cfg.tokenizer),
            "vocab_size": cfg.requested_vocab_size,
        }
    )


def prepare(cfg: DataConfig, progress: Progress | None = None) -> PreparedData:
    """Tokenize cfg's corpus once into cache_dir/<data_hash>/; later calls just memmap the cache."""
    progress = progress or noop_progress
    corpus = load_corpus(cfg, progress)
    if corpus.bin_dir is not None:
        return _prepare_bin(cfg, corpus, _hash_fields(cfg, corpus))
    data_hash = _text_data_hash(cfg, corpus)
    folder = cfg.cache_dir / data_hash
    cached = load_cached(folder, data_hash)
    if cached is None:
        _write_cache(cfg, corpus, data_hash, progress)
        cached = load_cached(folder, data_hash)
        from_cache = False
    else:
        from_cache = True
    meta, train, val = cached
    tok = tokenizer_from_spec(meta["tokenizer"], folder)
    return PreparedData(
        train, val, meta["vocab_size"], data_hash, tok, cfg.corpus, len(train), len(val), folder, meta, from_cache
    )


def _write_cache(cfg: DataConfig, corpus: Corpus, data_hash: str, progress: Progress) -> None:
    t0 = time.perf_counter()
    train_limit, val_limit = _split_limits(cfg)
    tok = _build_tokenizer(cfg, corpus, train_limit, progress)
    vocab = _resolve_vocab(cfg.vocab_size, tok.vocab_size, f"the {cfg.tokenizer} tokenizer")
    dtype = dtype_for(vocab)
    folder, tmp = cfg.cache_dir / data_hash, cfg.cache_dir / f".tmp-{data_hash[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts = {}
        splits = (("train", corpus.train_docs, train_limit), ("val", corpus.val_docs, val_limit))
        for split, docs, limit in splits:
            counts[split] = _tokenize_split(
                tok, docs, limit, dtype, tmp / f"{split}.bin", progress, f"tokenize {split}"
            )
            if counts[split][0] == 0:
                raise UserError(
                    f"corpus: {cfg.corpus} gives an empty {split} split; use more text, a larger "
                    f"max_chars or another val_fraction"
                )
        if isinstance(tok, BPETokenizer):
            tok.tok.save(str(tmp / "tokenizer.json"))
        meta = {
            "format": FORMAT_VERSION,
            "data_hash": data_hash,
            "corpus": cfg.corpus,
            "corpus_kind": corpus.kind,
            "content_hash": corpus.content_hash,
            "split_rule": corpus.split_rule,
            "val_fraction": cfg.val_fraction,
            "max_chars": cfg.max_chars,
            "tokenizer": tok.spec(),
            "vocab_size": vocab,
            "dtype": dtype.name,
            "n_train_tokens": counts["train"][0],
            "n_val_tokens": counts["val"][0],
            "n_train_chars": counts["train"][1],
            "n_val_chars": counts["val"][1],
            "n_train_docs": len(corpus.train_docs),
            "n_val_docs": len(corpus.val_docs),
            "notes": corpus.notes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "prepare_s": round(time.perf_counter() - t0, 3),
        }
        (tmp / "meta.json").write_bytes(json_bytes(meta))
        publish(tmp, folder, data_hash)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -----------------------------------------------------------------------------------------------------------
# the vocabulary without preparing

CHAR_VOCAB_ESTIMATE = 257  # char, corpus not on disk: 256 characters (ASCII/Latin-1 text) + <unk>


def vocab_size_for(fields: dict) -> tuple[int, bool]:
    """The id space `prepare(DataConfig(**fields))` would give, without tokenizing and without the network:
    -> (vocab_size, exact). byte 256 and gpt2 50257 (or vocab_size, which pads them), bpe its vocab_size,
    a bin: corpus its meta.json: from the definition, exact. char (and bpe without vocab_size, which a tiny
    corpus may not fill): from the prepared cache when present, else from the corpus on disk (char: its
    train characters), exact; with neither, an estimate (char: CHAR_VOCAB_ESTIMATE, bpe: its default
    target), exact=False. A vocab_size below what the tokenizer needs raises the same UserError as prepare."""
    cfg = DataConfig(**fields)
    natural = {"byte": ByteTokenizer.vocab_size, "gpt2": GPT2Tokenizer.vocab_size}.get(cfg.tokenizer)
    if not (cfg.corpus.startswith("bin:") or natural is None):
        return _resolve_vocab(cfg.vocab_size, natural, f"the {cfg.tokenizer} tokenizer"), True
    if cfg.tokenizer == "bpe" and cfg.vocab_size is not None and not cfg.corpus.startswith("bin:"):
        return cfg.vocab_size, True
    estimate = cfg.vocab_size or (CHAR_VOCAB_ESTIMATE if cfg.tokenizer == "char" else cfg.requested_vocab_size)
    if not cfg.cache_dir.is_dir() and not cfg.corpus.startswith(("text:", "bin:", "python-")):
        return estimate, False  # a download corpus with no cache yet: nothing local to look at
    try:
        with no_downloads():
            corpus = load_corpus(cfg)
    except UserError:
        if cfg.corpus.startswith("bin:") and cfg.vocab_size is None:
            raise  # a bin: folder's ids mean nothing without its meta.json (or a stated vocab_size)
        return estimate, False
    if corpus.bin_dir is not None:
        return _bin_vocab_and_tokenizer(cfg, corpus)[0], True
    data_hash = _text_data_hash(cfg, corpus)
    cached = load_cached(cfg.cache_dir / data_hash, data_hash)
    if cached is not None:
        return cached[0]["vocab_size"], True
    if cfg.tokenizer == "char":
        tok = CharTokenizer.fit(_cap(corpus.train_docs, _split_limits(cfg)[0]))
        return _resolve_vocab(cfg.vocab_size, tok.vocab_size, "the char tokenizer"), True
    return estimate, False
