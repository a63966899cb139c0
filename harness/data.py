"""Corpora, tokenizers, cached token arrays and batch streams.

    data = prepare(DataConfig(corpus="python-stdlib", tokenizer="byte"))
    batches = TokenBatches(data.train, block_size, micro_batch_size, grad_accum, seed, world_size)
    x, y = batches.get(step, micro, rank)
    for x, y in val_batches(data.val, block_size, batch_size): ...

Corpora (CORPORA registry; `corpus_names()` lists them):
  python-stdlib       the running interpreter's standard library .py files (offline default). Excluded:
                      site-packages/dist-packages, __pycache__, test dirs (test, tests, idle_test), and the
                      build-specific config-* dirs and _sysconfigdata*.py, so the same Python build gives the
                      same corpus anywhere. Another Python version gives another corpus: the hash shows it.
  python-stdlib-full  the same with the test dirs (about 2.5x larger).
  text:PATH           a local file (split by characters: the last val_fraction is val) or a folder (every
                      non-hidden, non-binary file, recursively, split by file; one file -> split by chars).
  tinyshakespeare     karpathy's char-rnn input.txt (1.1 MB), split by characters like nanoGPT.
  tinystories         roneneldan/TinyStories V2-GPT4 train/valid txt files (2.2 GB, official split).
  tinystories-valid   only its valid file (22 MB), split by characters: a quick real-text corpus.
  bin:DIR             nanoGPT-style pre-tokenized DIR/train.bin, DIR/val.bin (uint16), memmapped in place.
Split by file: a file is val when int(sha256(relative path)[:8], 16) / 2**32 < val_fraction, with at least
one file on each side, so the split never depends on file sizes, order or count.
max_chars caps the text per split: train keeps its first int(max_chars * (1 - val_fraction)) characters,
val its first max_chars - that (for bin: the same rule in tokens). Documents are concatenated without
separator tokens; every document is tokenized on its own (huge ones in ~1 MB pieces cut after a newline).

Tokenizers: byte (UTF-8, 256), char (sorted characters of the train text + one <unk> id at the end that
unseen characters map to and that decodes to U+FFFD), bpe (byte-level BPE trained on the train text with
Hugging Face `tokenizers`, cached under cache_dir/tokenizers/), gpt2 (tiktoken; needs its cached BPE files
offline: TIKTOKEN_CACHE_DIR). Ids beyond a tokenizer's own vocab (a padded model may sample them) decode to
U+FFFD.

Cache: cache_dir/<data_hash>/{train.bin, val.bin, meta.json[, tokenizer.json]}, written into a temporary
folder that is renamed into place, so a killed prepare never leaves a half-written cache (only a
cache_dir/.tmp-* folder, safe to delete when no prepare runs). Concurrent prepares of the same data are safe.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import operator
import os
import shutil
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.errors import UserError

FORMAT_VERSION = 1  # bump when tokenization or the cache layout changes: it enters every data_hash
TOKENIZERS = ("byte", "char", "bpe", "gpt2")
DEFAULT_BPE_VOCAB = 4096
PIECE_CHARS = 1 << 20  # documents longer than this are encoded in pieces (memory, progress, parallelism)

# progress(description, completed, total): one task per distinct description; the last call of a task has
# completed == total. Units: files for hashing, bytes for downloads, (about) characters for tokenization.
Progress = Callable[[str, int, int], None]


def _noop(description: str, completed: int, total: int) -> None:
    pass


def default_cache_dir() -> Path:
    return Path(os.environ.get("KIMI_BENCH_CACHE") or ".kimi-cache")


def _suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=2, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


# -----------------------------------------------------------------------------------------------------------
# config


@dataclass
class DataConfig:
    corpus: str = "python-stdlib"
    tokenizer: str = "byte"  # byte | char | bpe | gpt2
    vocab_size: int | None = None  # bpe: merges target (default 4096); others: pad the id space up to it
    cache_dir: Path = field(default_factory=default_cache_dir)
    val_fraction: float = 0.1
    max_chars: int | None = None  # cap the corpus for tiny runs (see module docstring)

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser()
        if self.tokenizer not in TOKENIZERS:
            hint = _suggest(self.tokenizer, TOKENIZERS)
            raise UserError(f"tokenizer: unknown tokenizer {self.tokenizer!r}{hint}; "
                            f"use one of {', '.join(TOKENIZERS)}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0 < self.val_fraction < 1:
            raise UserError(f"val_fraction: must be a number in (0, 1), got {self.val_fraction!r}; e.g. 0.1")
        for name in ("vocab_size", "max_chars"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
                raise UserError(f"{name}: must be an integer >= 2 or unset, got {value!r}")
        if self.tokenizer == "bpe" and self.vocab_size is not None and self.vocab_size <= 256:
            raise UserError(f"vocab_size: bpe needs more than 256 (its byte alphabet), got "
                            f"{self.vocab_size}; e.g. {DEFAULT_BPE_VOCAB}")
        _find_loader(self.corpus)  # unknown corpus names fail here, before any work

    @property
    def requested_vocab_size(self) -> int | None:
        if self.tokenizer == "bpe":
            return self.vocab_size or DEFAULT_BPE_VOCAB
        return self.vocab_size


# -----------------------------------------------------------------------------------------------------------
# small file helpers


def _ensure_writable(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cache_dir: cannot write to {str(cache_dir)!r} ({e.strerror or e}); "
                        f"set KIMI_BENCH_CACHE or cache_dir to a writable folder") from None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def _sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class _DigestMemo:
    """sha256 of files, remembered in cache_dir/file-digests.json by (path, size, mtime) so a cached prepare
    of a large corpus does not re-read it just to find its hash."""

    def __init__(self, cache_dir: Path):
        self.path = cache_dir / "file-digests.json"
        try:
            self.memo = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.memo = {}
        self.dirty = False

    def digest(self, path: Path) -> str:
        st = path.stat()
        key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
        hit = self.memo.get(key)
        if hit and hit[:2] == stamp:
            return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        self.memo[key] = [*stamp, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def save(self) -> None:
        if self.dirty:
            _atomic_write(self.path, _json_bytes(self.memo))


def _download(url: str, dest: Path, progress: Progress, what: str) -> str | None:
    """Download url to dest atomically; return None on success or the reason it failed (offline)."""
    if os.environ.get("KIMI_BENCH_OFFLINE"):
        return "KIMI_BENCH_OFFLINE is set"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            total, done = int(r.headers.get("Content-Length") or 0), 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                progress(f"download {what}", done, max(total, done))
        os.replace(tmp, dest)
        return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        return " ".join(str(getattr(e, "reason", e)).split())


# -----------------------------------------------------------------------------------------------------------
# corpora


@dataclass(frozen=True)
class Doc:
    """One document, read lazily: a file (or in-memory text), optionally only the characters
    [int(n * start), int(n * end)) of it (for corpora split by characters)."""

    name: str
    path: Path | None = None
    text: str | None = None
    start: float = 0.0
    end: float = 1.0

    def read(self) -> str:
        t = self.text if self.text is not None else self.path.read_bytes().decode("utf-8", errors="replace")
        n = len(t)
        return t[int(n * self.start):int(n * self.end)]

    def size_hint(self) -> int:
        n = len(self.text) if self.text is not None else self.path.stat().st_size
        return int(n * self.end) - int(n * self.start)


@dataclass
class Corpus:
    kind: str  # registry name; enters the hash instead of the user's path
    content_hash: str  # sha256 over (document key, sha256 of its bytes)
    split_rule: str
    train_docs: list[Doc] = field(default_factory=list)
    val_docs: list[Doc] = field(default_factory=list)
    bin_dir: Path | None = None  # bin: corpora are pre-tokenized
    bin_meta: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)


CorpusLoader = Callable[[str, DataConfig, "_DigestMemo", Progress], Corpus]
CORPORA: dict[str, CorpusLoader] = {}  # exact names, and prefixes ending in ":" ("text:", "bin:")


def register_corpus(name: str) -> Callable[[CorpusLoader], CorpusLoader]:
    def deco(fn: CorpusLoader) -> CorpusLoader:
        CORPORA[name] = fn
        return fn
    return deco


def corpus_names() -> list[str]:
    return [n + ("PATH" if n == "text:" else "DIR") if n.endswith(":") else n for n in CORPORA]


def _find_loader(corpus: str) -> tuple[CorpusLoader, str]:
    """-> (loader, argument after the prefix, or the name)."""
    if corpus in CORPORA and not corpus.endswith(":"):
        return CORPORA[corpus], corpus
    prefix, sep, arg = corpus.partition(":")
    if sep and prefix + ":" in CORPORA:
        if not arg:
            raise UserError(f"corpus: {corpus!r} needs a path after the colon; e.g. {prefix}:./data")
        return CORPORA[prefix + ":"], arg
    raise UserError(f"corpus: unknown corpus {corpus!r}{_suggest(corpus, corpus_names())}; "
                    f"use one of {', '.join(corpus_names())}")


def _content_hash(entries: Iterable[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for key, digest in entries:
        h.update(f"{key}\0{digest}\n".encode())
    return h.hexdigest()


def _split_by_file(docs: list[Doc], val_fraction: float) -> tuple[list[Doc], list[Doc]]:
    """Keep the given (sorted) order on each side; at least one file per side."""
    u = {d.name: int(hashlib.sha256(d.name.encode()).hexdigest()[:8], 16) / 2**32 for d in docs}
    val = [d for d in docs if u[d.name] < val_fraction]
    if not val:
        val = [min(docs, key=lambda d: u[d.name])]
    if len(val) == len(docs):
        val.remove(max(docs, key=lambda d: u[d.name]))
    val_names = {d.name for d in val}
    return [d for d in docs if d.name not in val_names], val


def _split_by_chars(doc: Doc, val_fraction: float) -> tuple[list[Doc], list[Doc]]:
    cut = 1.0 - val_fraction
    return [Doc(doc.name, doc.path, doc.text, 0.0, cut)], [Doc(doc.name, doc.path, doc.text, cut, 1.0)]


def _file_corpus(kind: str, files: list[tuple[str, Path]], cfg: DataConfig, memo: _DigestMemo,
                 progress: Progress, notes: dict) -> Corpus:
    """files: (relative name, path) sorted by name; one file is split by characters, several by file."""
    entries = []
    for i, (name, path) in enumerate(files):
        entries.append((name if len(files) > 1 else "", memo.digest(path)))
        progress(f"hash {kind}", i + 1, len(files))
    docs = [Doc(name, path) for name, path in files]
    if len(docs) == 1:
        train, val = _split_by_chars(docs[0], cfg.val_fraction)
        rule = f"last-chars:{cfg.val_fraction}"
    else:
        train, val = _split_by_file(docs, cfg.val_fraction)
        rule = f"by-file:sha256(name)<{cfg.val_fraction}"
    return Corpus(kind, _content_hash(entries), rule, train, val, notes={**notes, "n_files": len(files)})


_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def _stdlib_files(include_tests: bool) -> tuple[Path, list[tuple[str, Path]]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = _STDLIB_SKIP if include_tests else _STDLIB_SKIP | _TEST_DIRS
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(("config-", "."))]
        for fn in filenames:
            if fn.endswith(".py") and not fn.startswith("_sysconfigdata"):
                path = Path(dirpath) / fn
                files.append((path.relative_to(root).as_posix(), path))
    return root, sorted(files)


def _stdlib_loader(include_tests: bool) -> CorpusLoader:
    def load(arg: str, cfg: DataConfig, memo: _DigestMemo, progress: Progress) -> Corpus:
        import platform

        root, files = _stdlib_files(include_tests)
        if len(files) < 2:
            raise UserError(f"corpus: found no standard library .py files under {str(root)!r}; "
                            f"use corpus='text:PATH' instead")
        return _file_corpus(arg, files, cfg, memo, progress,
                            {"python": platform.python_version(), "root": str(root)})
    return load


register_corpus("python-stdlib")(_stdlib_loader(include_tests=False))
register_corpus("python-stdlib-full")(_stdlib_loader(include_tests=True))


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


@register_corpus("text:")
def _load_text(arg: str, cfg: DataConfig, memo: _DigestMemo, progress: Progress) -> Corpus:
    root = Path(arg).expanduser()
    if root.is_file():
        return _file_corpus("text", [(root.name, root)], cfg, memo, progress, {"root": str(root.resolve())})
    if not root.is_dir():
        raise UserError(f"corpus: text:{arg} does not exist; give an existing file or folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            path = Path(dirpath) / fn
            if not fn.startswith(".") and path.is_file() and not _is_binary(path):
                files.append((path.relative_to(root).as_posix(), path))
    if not files:
        raise UserError(f"corpus: text:{arg} holds no (non-hidden, non-binary) files; point it at text files")
    return _file_corpus("text", sorted(files), cfg, memo, progress, {"root": str(root.resolve())})


def _find_or_fetch(kind: str, filename: str, url: str, cfg: DataConfig, progress: Progress) -> Path:
    """Look in $KIMI_BENCH_DATA/<kind>/ then cache_dir/corpora/<kind>/; download into the latter."""
    dest = cfg.cache_dir / "corpora" / kind / filename
    candidates = [Path(d) / kind / filename for d in [os.environ.get("KIMI_BENCH_DATA")] if d] + [dest]
    for path in candidates:
        if path.is_file():
            return path
    reason = _download(url, dest, progress, f"{kind} {filename}")
    if reason is None:
        return dest
    raise UserError(f"corpus: {kind} file {filename} not found and its download failed ({reason}); put it at "
                    f"{str(dest)!r} (or $KIMI_BENCH_DATA/{kind}/{filename}), or use corpus='text:PATH'")


TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSTORIES_FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "valid": "TinyStoriesV2-GPT4-valid.txt"}


def _tinystories_url(filename: str) -> str:
    base = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{base}/datasets/roneneldan/TinyStories/resolve/main/{filename}"


@register_corpus("tinyshakespeare")
def _load_tinyshakespeare(arg: str, cfg: DataConfig, memo: _DigestMemo, progress: Progress) -> Corpus:
    path = _find_or_fetch("tinyshakespeare", "input.txt", TINYSHAKESPEARE_URL, cfg, progress)
    return _file_corpus("tinyshakespeare", [("input.txt", path)], cfg, memo, progress, {"file": str(path)})


@register_corpus("tinystories")
def _load_tinystories(arg: str, cfg: DataConfig, memo: _DigestMemo, progress: Progress) -> Corpus:
    paths = {split: _find_or_fetch("tinystories", fn, _tinystories_url(fn), cfg, progress)
             for split, fn in TINYSTORIES_FILES.items()}
    entries = []
    for i, (split, path) in enumerate(paths.items()):
        entries.append((split, memo.digest(path)))
        progress("hash tinystories", i + 1, len(paths))
    return Corpus("tinystories", _content_hash(entries), "official-files",
                  [Doc(paths["train"].name, paths["train"])], [Doc(paths["valid"].name, paths["valid"])],
                  notes={"files": {k: str(p) for k, p in paths.items()}, "val_fraction_ignored": True})


@register_corpus("tinystories-valid")
def _load_tinystories_valid(arg: str, cfg: DataConfig, memo: _DigestMemo, progress: Progress) -> Corpus:
    fn = TINYSTORIES_FILES["valid"]
    path = _find_or_fetch("tinystories", fn, _tinystories_url(fn), cfg, progress)
    return _file_corpus("tinystories-valid", [(fn, path)], cfg, memo, progress, {"file": str(path)})


@register_corpus("bin:")
def _load_bin(arg: str, cfg: DataConfig, memo: _DigestMemo, progress: Progress) -> Corpus:
    root = Path(arg).expanduser()
    for fn in ("train.bin", "val.bin"):
        if not (root / fn).is_file():
            raise UserError(f"corpus: bin:{arg} has no {fn}; give a folder with nanoGPT-style train.bin and "
                            f"val.bin")
    meta = {}
    if (root / "meta.json").is_file():
        try:
            meta = json.loads((root / "meta.json").read_text())
        except ValueError as e:
            raise UserError(f"corpus: bin:{arg}/meta.json is not valid JSON ({e}); fix it") from None
    entries = []
    for i, fn in enumerate(("train.bin", "val.bin")):
        entries.append((fn, memo.digest(root / fn)))
        progress(f"hash bin:{arg}", i + 1, 2)
    return Corpus("bin", _content_hash(entries), "bin-files", bin_dir=root, bin_meta=meta,
                  notes={"root": str(root.resolve()), "has_meta_pkl": (root / "meta.pkl").exists()})


def load_corpus(cfg: DataConfig, progress: Progress | None = None) -> Corpus:
    """Find (download if needed and possible) and hash a corpus; documents are read later, lazily."""
    _ensure_writable(cfg.cache_dir)
    loader, arg = _find_loader(cfg.corpus)
    memo = _DigestMemo(cfg.cache_dir)
    corpus = loader(arg, cfg, memo, progress or _noop)
    memo.save()
    return corpus


# -----------------------------------------------------------------------------------------------------------
# tokenizers


def _as_ids(ids: Iterable[int]) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


def _decode_runs(ids: list[int], n: int, decode: Callable[[list[int]], str]) -> str:
    """Decode runs of valid ids; an id >= n (a padded model's extra ids) becomes U+FFFD."""
    out, run = [], []
    for i in ids:
        if 0 <= i < n:
            run.append(i)
            continue
        if run:
            out.append(decode(run))
            run = []
        out.append("\ufffd")
    if run:
        out.append(decode(run))
    return "".join(out)


class Tokenizer:
    kind: str = ""
    identity: str = ""  # stable: enters the data hash
    vocab_size: int = 0  # the ids this tokenizer produces: 0..vocab_size-1

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def spec(self) -> dict:
        """What meta.json stores to rebuild this tokenizer from the cache."""
        return {"kind": self.kind, "identity": self.identity, "vocab_size": self.vocab_size}


class ByteTokenizer(Tokenizer):
    kind, identity, vocab_size = "byte", "byte:utf-8", 256

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return _decode_runs(_as_ids(ids), 256, lambda run: bytes(run).decode("utf-8", errors="replace"))


class CharTokenizer(Tokenizer):
    """nanoGPT shakespeare_char: ids are the sorted distinct characters of the TRAIN text; the extra last id
    is <unk>: characters never seen in training (e.g. only in val) map to it and it decodes to U+FFFD."""

    kind, identity = "char", "char:sorted-train-chars+unk"

    def __init__(self, chars: str):
        self.chars = chars
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
        self.unk_id = len(chars)
        self.vocab_size = len(chars) + 1

    @staticmethod
    def codepoints(text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)

    @classmethod
    def fit(cls, texts: Iterable[str]) -> CharTokenizer:
        seen = np.zeros(0, dtype=np.uint32)
        for t in texts:
            seen = np.union1d(seen, np.unique(cls.codepoints(t)))
        return cls("".join(map(chr, seen.tolist())))

    def encode_array(self, text: str) -> np.ndarray:
        cps = self.codepoints(text)
        if self.unk_id == 0:
            return np.zeros(len(cps), dtype=np.int64)
        idx = np.minimum(np.searchsorted(self._codepoints, cps), self.unk_id - 1)
        return np.where(self._codepoints[idx] == cps, idx, self.unk_id).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] if 0 <= i < self.unk_id else "\ufffd" for i in _as_ids(ids))

    def spec(self) -> dict:
        return {**super().spec(), "chars": self.chars}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 pre-tokenizer regex, all 256 bytes in the alphabet, no special tokens)."""

    kind = "bpe"

    def __init__(self, tok):  # a tokenizers.Tokenizer
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.identity = self.make_identity()

    @staticmethod
    def make_identity() -> str:
        import tokenizers

        return f"bpe:bytelevel:hf-tokenizers-{tokenizers.__version__}"

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return _decode_runs(_as_ids(ids), self.vocab_size, self.tok.decode)


class GPT2Tokenizer(Tokenizer):
    """tiktoken "gpt2" (50257 ids), loaded on first use so cached gpt2 tokens train offline without it."""

    kind, identity, vocab_size = "gpt2", "tiktoken:gpt2", 50257

    def __init__(self):
        self._enc = None

    @property
    def enc(self):
        if self._enc is None:
            try:
                import tiktoken

                self._enc = tiktoken.get_encoding("gpt2")
            except Exception as e:  # network errors, missing files, hash mismatches: all mean "not available"
                reason = " ".join(f"{type(e).__name__}: {e}".split())
                reason = reason if len(reason) < 100 else reason[:97] + "..."
                raise UserError(f"tokenizer: tiktoken cannot load 'gpt2' ({reason}); run once online or copy "
                                f"a tiktoken cache and set TIKTOKEN_CACHE_DIR to it, or use tokenizer='bpe'"
                                ) from None
        return self._enc

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64)
                for ids in self.enc.encode_ordinary_batch(texts, num_threads=min(8, os.cpu_count() or 1))]

    def decode(self, ids: Iterable[int]) -> str:
        return _decode_runs(_as_ids(ids), self.enc.n_vocab, self.enc.decode)


class OpaqueTokenizer(Tokenizer):
    """bin: corpora whose meta.json names no tokenizer: ids only."""

    kind, identity = "opaque", "opaque"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        raise UserError("tokenizer: this bin: corpus does not say its tokenizer; add \"tokenizer\": "
                        "\"gpt2\" or \"byte\" to its meta.json to encode text")

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(map(str, _as_ids(ids)))


def tokenizer_from_spec(spec: dict, folder: Path | None = None) -> Tokenizer:
    kind = spec["kind"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "bpe":
        return BPETokenizer.from_file(folder / "tokenizer.json")
    if kind == "gpt2":
        return GPT2Tokenizer()
    return OpaqueTokenizer(spec["vocab_size"])


def _tokenizer_identity(name: str) -> str:
    """The identity of the tokenizer cfg asks for, known before it is built (char/bpe depend on the train
    text, which the data hash already covers)."""
    if name == "bpe":
        return BPETokenizer.make_identity()
    return {"byte": ByteTokenizer, "char": CharTokenizer, "gpt2": GPT2Tokenizer}[name].identity


# -----------------------------------------------------------------------------------------------------------
# prepare


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
        return {**self.meta, "corpus": self.corpus_name, "data_hash": self.data_hash,
                "vocab_size": self.vocab_size, "tokenizer": self.tokenizer.identity,
                "n_train_tokens": self.n_train_tokens, "n_val_tokens": self.n_val_tokens,
                "dtype": str(self.train.dtype), "path": str(self.path.resolve()),
                "from_cache": self.from_cache,
                "disk_bytes": sum(f.stat().st_size for f in files if f.exists())}


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
    key = _sha256_json([corpus.content_hash, corpus.split_rule, cfg.max_chars, vocab,
                        BPETokenizer.make_identity()])
    path = cfg.cache_dir / "tokenizers" / f"bpe-{vocab}-{key[:16]}.json"
    if path.is_file():
        return BPETokenizer.from_file(path)
    progress(f"train bpe {vocab}", 0, 1)
    tok = BPETokenizer.train((p for t in _cap(corpus.train_docs, limit) for p in _pieces(t)), vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, tok.tok.to_str().encode())
    progress(f"train bpe {vocab}", 1, 1)
    return tok


def _tokenize_split(tok: Tokenizer, docs: list[Doc], limit: int | None, dtype: np.dtype, out: Path,
                    progress: Progress, what: str) -> tuple[int, int]:
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
        raise UserError(f"vocab_size: {cfg_vocab} is smaller than the {natural} ids {what} needs; "
                        f"unset vocab_size or raise it to >= {natural}")
    return cfg_vocab


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _load_cached(folder: Path, data_hash: str) -> tuple[dict, np.memmap, np.memmap] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        arrays = []
        for split in ("train", "val"):
            n, path = meta[f"n_{split}_tokens"], folder / f"{split}.bin"
            if meta["data_hash"] != data_hash or path.stat().st_size != n * dtype.itemsize:
                return None
            arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)))
        return meta, arrays[0], arrays[1]
    except (OSError, ValueError, KeyError):
        return None


def _prepare_bin(cfg: DataConfig, corpus: Corpus, data_hash_fields: dict) -> PreparedData:
    meta = corpus.bin_meta
    name = f"bin:{corpus.notes['root']}"
    meta_vocab = meta.get("vocab_size")
    if meta_vocab is not None and (not isinstance(meta_vocab, int) or meta_vocab < 2):
        raise UserError(f"vocab_size: {name}/meta.json has vocab_size {meta_vocab!r}; make it an int >= 2")
    if meta_vocab is None and cfg.vocab_size is None:
        pkl = " (meta.pkl is a pickle and is never unpickled)" if corpus.notes["has_meta_pkl"] else ""
        raise UserError(f"vocab_size: {name} has no meta.json with vocab_size{pkl}; pass vocab_size=N or "
                        f"write {{\"vocab_size\": N}} to its meta.json")
    vocab = _resolve_vocab(cfg.vocab_size, meta_vocab or 0, "its meta.json")
    tok_name = meta.get("tokenizer") or ("gpt2" if cfg.tokenizer == "gpt2" else None)
    if meta.get("tokenizer") and cfg.tokenizer not in ("byte", meta["tokenizer"]):
        raise UserError(f"tokenizer: {name} says its tokenizer is {meta['tokenizer']!r}, not "
                        f"{cfg.tokenizer!r}; drop tokenizer or fix its meta.json")
    if tok_name not in (None, "byte", "gpt2"):
        raise UserError(f"tokenizer: {name} meta.json names tokenizer {tok_name!r}; use 'byte', 'gpt2' or "
                        f"none")
    tok = {"byte": ByteTokenizer, "gpt2": GPT2Tokenizer}[tok_name]() if tok_name else OpaqueTokenizer(vocab)
    dtype = np.dtype(meta.get("dtype", "uint16"))
    data_hash = _sha256_json({**data_hash_fields, "tokenizer": tok.identity, "vocab_size": vocab})
    try:
        arrays = {s: np.memmap(corpus.bin_dir / f"{s}.bin", dtype=dtype, mode="r") for s in ("train", "val")}
    except ValueError as e:  # empty file, or a size that is not a multiple of the dtype
        raise UserError(f"corpus: {name} train.bin/val.bin cannot be read as {dtype} ({e}); "
                        f"fix the files or the \"dtype\" in meta.json") from None
    n_train, n_val = _split_limits(cfg)
    train, val = arrays["train"][:n_train], arrays["val"][:n_val]
    info = {"corpus_kind": "bin", "content_hash": corpus.content_hash, "split_rule": corpus.split_rule,
            "max_chars": cfg.max_chars, "max_chars_unit": "tokens", "notes": corpus.notes}
    return PreparedData(train, val, vocab, data_hash, tok, cfg.corpus, len(train), len(val), corpus.bin_dir,
                        info, from_cache=True)


def prepare(cfg: DataConfig, progress: Progress | None = None) -> PreparedData:
    """Tokenize cfg's corpus once into cache_dir/<data_hash>/; later calls just memmap the cache."""
    progress = progress or _noop
    corpus = load_corpus(cfg, progress)
    fields = {"format": FORMAT_VERSION, "corpus": corpus.kind, "content": corpus.content_hash,
              "split": corpus.split_rule, "max_chars": cfg.max_chars}
    if corpus.bin_dir is not None:
        return _prepare_bin(cfg, corpus, fields)
    data_hash = _sha256_json({**fields, "tokenizer": _tokenizer_identity(cfg.tokenizer),
                              "vocab_size": cfg.requested_vocab_size})
    folder = cfg.cache_dir / data_hash
    cached = _load_cached(folder, data_hash)
    if cached is None:
        _write_cache(cfg, corpus, data_hash, progress)
        cached = _load_cached(folder, data_hash)
        from_cache = False
    else:
        from_cache = True
    meta, train, val = cached
    tok = tokenizer_from_spec(meta["tokenizer"], folder)
    return PreparedData(train, val, meta["vocab_size"], data_hash, tok, cfg.corpus, len(train), len(val),
                        folder, meta, from_cache)


def _write_cache(cfg: DataConfig, corpus: Corpus, data_hash: str, progress: Progress) -> None:
    t0 = time.perf_counter()
    train_limit, val_limit = _split_limits(cfg)
    tok = _build_tokenizer(cfg, corpus, train_limit, progress)
    vocab = _resolve_vocab(cfg.vocab_size, tok.vocab_size, f"the {cfg.tokenizer} tokenizer")
    dtype = _dtype_for(vocab)
    folder, tmp = cfg.cache_dir / data_hash, cfg.cache_dir / f".tmp-{data_hash[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts = {}
        splits = (("train", corpus.train_docs, train_limit), ("val", corpus.val_docs, val_limit))
        for split, docs, limit in splits:
            counts[split] = _tokenize_split(tok, docs, limit, dtype, tmp / f"{split}.bin", progress,
                                            f"tokenize {split}")
            if counts[split][0] == 0:
                raise UserError(f"corpus: {cfg.corpus} gives an empty {split} split; use more text, a larger "
                                f"max_chars or another val_fraction")
        if isinstance(tok, BPETokenizer):
            tok.tok.save(str(tmp / "tokenizer.json"))
        meta = {"format": FORMAT_VERSION, "data_hash": data_hash, "corpus": cfg.corpus,
                "corpus_kind": corpus.kind,
                "content_hash": corpus.content_hash, "split_rule": corpus.split_rule,
                "val_fraction": cfg.val_fraction, "max_chars": cfg.max_chars, "tokenizer": tok.spec(),
                "vocab_size": vocab, "dtype": dtype.name,
                "n_train_tokens": counts["train"][0], "n_val_tokens": counts["val"][0],
                "n_train_chars": counts["train"][1], "n_val_chars": counts["val"][1],
                "n_train_docs": len(corpus.train_docs), "n_val_docs": len(corpus.val_docs),
                "notes": corpus.notes,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "prepare_s": round(time.perf_counter() - t0, 3)}
        (tmp / "meta.json").write_bytes(_json_bytes(meta))
        _publish(tmp, folder, data_hash)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, folder: Path, data_hash: str) -> None:
    """Rename the finished folder into place; if another process got there first, keep theirs."""
    try:
        os.replace(tmp, folder)
    except OSError:
        if _load_cached(folder, data_hash) is None:  # a stale, invalid folder: replace it
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)


# -----------------------------------------------------------------------------------------------------------
# batches


class TokenBatches:
    """Random training windows that depend only on (seed, step): each step draws the GLOBAL
    micro_batch_size * grad_accum * world_size offsets from a generator seeded with (seed, step); rank r,
    micro-step m takes rows [(m * world_size + r) * B, +B). So 1 process x grad_accum 2 sees exactly the
    rows of 2 ranks x grad_accum 1, and resuming at any step needs no state."""

    def __init__(self, tokens: np.ndarray, block_size: int, micro_batch_size: int, grad_accum: int = 1,
                 seed: int = 0, world_size: int = 1):
        for name, v in (("block_size", block_size), ("micro_batch_size", micro_batch_size),
                        ("grad_accum", grad_accum), ("world_size", world_size)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise UserError(f"{name}: must be a positive integer, got {v!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed: must be an integer >= 0, got {seed!r}")
        if len(tokens) < block_size + 2:
            raise UserError(f"block_size: {block_size} needs at least {block_size + 2} tokens but the split "
                            f"has {len(tokens)}; use a smaller block_size or more data (max_chars)")
        self.tokens, self.block_size, self.micro_batch_size = tokens, block_size, micro_batch_size
        self.grad_accum, self.seed, self.world_size = grad_accum, seed, world_size
        self._step, self._offsets = None, None

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def offsets(self, step: int) -> np.ndarray:
        """All start offsets of `step` (int64 [rows_per_step]); windows are tokens[o : o + block_size + 1]."""
        step = operator.index(step)
        if step != self._step:
            if step < 0:
                raise ValueError(f"step must be >= 0, got {step}")
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))
            high = len(self.tokens) - self.block_size  # exclusive: the last window ends at the last token
            self._step, self._offsets = step, rng.integers(0, high, size=self.rows_per_step, dtype=np.int64)
        return self._offsets

    def get(self, step: int, micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) LongTensors [micro_batch_size, block_size] on the CPU; y is x shifted left by one token."""
        if not (0 <= micro < self.grad_accum and 0 <= rank < self.world_size):
            raise ValueError(f"micro={micro} rank={rank} out of range (grad_accum={self.grad_accum}, "
                             f"world_size={self.world_size})")
        b, t = self.micro_batch_size, self.block_size
        start = (micro * self.world_size + rank) * b
        rows = self.offsets(step)[start:start + b]
        buf = np.stack([self.tokens[o:o + t + 1] for o in rows])
        # numpy makes the shifted int64 copies: torch's threaded copy is slower on small, busy CPUs
        return torch.from_numpy(buf[:, :-1].astype(np.int64)), torch.from_numpy(buf[:, 1:].astype(np.int64))


def _n_val_blocks(tokens: Sequence, block_size: int, max_tokens: int | None) -> int:
    n = (len(tokens) - 1) // block_size
    return n if max_tokens is None else min(n, max_tokens // block_size)


def n_val_tokens(tokens: Sequence, block_size: int, max_tokens: int | None = None) -> int:
    """How many target tokens val_batches evaluates (whole blocks: a tail shorter than a block is not)."""
    return _n_val_blocks(tokens, block_size, max_tokens) * block_size


def val_batches(tokens: np.ndarray, block_size: int, batch_size: int, max_tokens: int | None = None,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The val split as fixed, non-overlapping, contiguous blocks in order: block k is
    x = tokens[k*T : (k+1)*T], y = tokens[k*T+1 : (k+1)*T+1], for the first n_val_tokens(...) // T blocks
    (max_tokens keeps the first blocks). Batches hold up to batch_size blocks (the last may hold fewer, so
    average losses per token, not per batch). With world_size > 1, rank r gets batches r, r + world_size..."""
    n_blocks = _n_val_blocks(tokens, block_size, max_tokens)
    if n_blocks == 0:
        raise UserError(f"block_size: the val split ({len(tokens)} tokens, max_tokens={max_tokens}) holds no "
                        f"block of {block_size} tokens; use a smaller block_size or more val data")
    for i, first in enumerate(range(0, n_blocks, batch_size)):
        if i % world_size != rank:
            continue
        n = min(batch_size, n_blocks - first)
        lo = first * block_size
        buf = torch.from_numpy(np.asarray(tokens[lo:lo + n * block_size + 1], dtype=np.int64))
        yield buf[:-1].view(n, block_size), buf[1:].view(n, block_size)
