"""Corpora: a registry of loaders that find, hash and split a corpus; documents are read later, lazily.

Corpora (CORPORA registry; `corpus_names()` lists them):
  python-stdlib       the running interpreter's standard library .py files (offline default). Excluded:
                      site-packages/dist-packages, __pycache__, test dirs (test, tests, idle_test), and the
                      build-specific config-* dirs and _sysconfigdata*.py, so the same Python build gives the
                      same corpus anywhere. Another Python version gives another corpus: the hash shows it.
  python-stdlib-full  the same with the test dirs (about 2.5x larger).
  python-site         python-stdlib plus every .py file of the installed packages (sysconfig purelib and
                      platlib, then the site-packages on sys.path; __pycache__ and hidden dirs skipped): a
                      large offline corpus on any machine with packages installed. Names are `stdlib/<path>`
                      and `site/<path>`; the hash covers every file, so other installed packages give
                      another corpus.
  text:PATH           a local file (split by characters: the last val_fraction is val) or a folder (every
                      non-hidden, non-binary file, recursively, split by file; one file -> split by chars).
  tinyshakespeare     karpathy's char-rnn input.txt (1.1 MB), split by characters like nanoGPT.
  tinystories         roneneldan/TinyStories V2-GPT4 train/valid txt files (2.2 GB, official split).
  tinystories-valid   only its valid file (22 MB), split by characters: a quick real-text corpus.
  bin:DIR             nanoGPT-style pre-tokenized DIR/train.bin, DIR/val.bin (uint16), memmapped in place.
Split by file: a file is val when int(sha256(relative path)[:8], 16) / 2**32 < val_fraction, with at least
one file on each side, so the split never depends on file sizes, order or count.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from harness.data.cache import DigestMemo, Progress, ensure_writable, noop_progress
from harness.errors import UserError, suggest


class LoaderConfig(Protocol):
    """The fields of harness.data.config.DataConfig a loader reads (that module imports this one, to check a
    corpus name, so the class itself is not imported here)."""

    corpus: str
    cache_dir: Path
    val_fraction: float


_NO_DOWNLOADS = contextvars.ContextVar("kimi_bench_no_downloads", default=False)


@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """Corpora that are not on disk fail instead of downloading (offline look-ups such as vocab_size_for)."""
    token = _NO_DOWNLOADS.set(True)
    try:
        yield
    finally:
        _NO_DOWNLOADS.reset(token)


def _download(url: str, dest: Path, progress: Progress, what: str) -> str | None:
    """Download url to dest atomically; return None on success or the reason it failed (offline)."""
    if os.environ.get("KIMI_BENCH_OFFLINE"):
        return "KIMI_BENCH_OFFLINE is set"
    if _NO_DOWNLOADS.get():
        return "downloads are off for this look-up"
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
        return t[int(n * self.start) : int(n * self.end)]

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


CorpusLoader = Callable[[str, "LoaderConfig", DigestMemo, Progress], Corpus]
CORPORA: dict[str, CorpusLoader] = {}  # exact names, and prefixes ending in ":" ("text:", "bin:")


def register_corpus(name: str) -> Callable[[CorpusLoader], CorpusLoader]:
    def deco(fn: CorpusLoader) -> CorpusLoader:
        CORPORA[name] = fn
        return fn

    return deco


def corpus_names() -> list[str]:
    return [n + ("PATH" if n == "text:" else "DIR") if n.endswith(":") else n for n in CORPORA]


def find_loader(corpus: str) -> tuple[CorpusLoader, str]:
    """-> (loader, argument after the prefix, or the name)."""
    if corpus in CORPORA and not corpus.endswith(":"):
        return CORPORA[corpus], corpus
    prefix, sep, arg = corpus.partition(":")
    if sep and prefix + ":" in CORPORA:
        if not arg:
            raise UserError(f"corpus: {corpus!r} needs a path after the colon; e.g. {prefix}:./data")
        return CORPORA[prefix + ":"], arg
    raise UserError(f"corpus: unknown corpus {corpus!r}; {suggest(corpus, corpus_names())}")


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


def _file_corpus(
    kind: str, files: list[tuple[str, Path]], cfg: LoaderConfig, memo: DigestMemo, progress: Progress, notes: dict
) -> Corpus:
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
    def load(arg: str, cfg: LoaderConfig, memo: DigestMemo, progress: Progress) -> Corpus:
        import platform

        root, files = _stdlib_files(include_tests)
        if len(files) < 2:
            raise UserError(
                f"corpus: found no standard library .py files under {str(root)!r}; use corpus='text:PATH' instead"
            )
        return _file_corpus(arg, files, cfg, memo, progress, {"python": platform.python_version(), "root": str(root)})

    return load


register_corpus("python-stdlib")(_stdlib_loader(include_tests=False))
register_corpus("python-stdlib-full")(_stdlib_loader(include_tests=True))

_SITE_SKIP = {"__pycache__"}


def _site_roots() -> list[Path]:
    """Where installed packages are imported from, each once: sysconfig's purelib and platlib, then the
    site-packages / dist-packages folders on sys.path (a venv can reach another's through a .pth file)."""
    import sys

    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"]]
    candidates += [p for p in sys.path if Path(p or ".").name in ("site-packages", "dist-packages")]
    roots: list[Path] = []
    for candidate in candidates:
        root = Path(candidate).resolve()
        if root.is_dir() and root not in roots:
            roots.append(root)
    return roots


def _site_files() -> list[tuple[str, Path]]:
    """`stdlib/<path>` for python-stdlib's files, `site/<path>` for every .py file under the site folders
    (a path found under two folders: the first folder's file, as imports would). A site folder inside
    another is walked once, as part of the outer one."""
    _, stdlib = _stdlib_files(include_tests=False)
    files = {f"stdlib/{name}": path for name, path in stdlib}
    roots = _site_roots()
    for root in roots:
        if any(other != root and root.is_relative_to(other) for other in roots):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SITE_SKIP and not d.startswith("."))
            for fn in filenames:
                path = Path(dirpath) / fn
                if fn.endswith(".py") and not fn.startswith(".") and path.is_file():
                    files.setdefault(f"site/{path.relative_to(root).as_posix()}", path)
    return sorted(files.items())


@register_corpus("python-site")
def _load_site(arg: str, cfg: LoaderConfig, memo: DigestMemo, progress: Progress) -> Corpus:
    import platform

    files = _site_files()
    if len(files) < 2:
        raise UserError(
            "corpus: found no .py files in the standard library or the installed packages; "
            "use corpus='text:PATH' instead"
        )
    return _file_corpus(
        arg,
        files,
        cfg,
        memo,
        progress,
        {
            "python": platform.python_version(),
            "roots": [str(r) for r in _site_roots()],
            "n_site_files": sum(n.startswith("site/") for n, _ in files),
        },
    )


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


@register_corpus("text:")
def _load_text(arg: str, cfg: LoaderConfig, memo: DigestMemo, progress: Progress) -> Corpus:
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


def _find_or_fetch(kind: str, filename: str, url: str, cfg: LoaderConfig, progress: Progress) -> Path:
    """Look in $KIMI_BENCH_DATA/<kind>/ then cache_dir/corpora/<kind>/; download into the latter."""
    dest = cfg.cache_dir / "corpora" / kind / filename
    candidates = [Path(d) / kind / filename for d in [os.environ.get("KIMI_BENCH_DATA")] if d] + [dest]
    for path in candidates:
        if path.is_file():
            return path
    reason = _download(url, dest, progress, f"{kind} {filename}")
    if reason is None:
        return dest
    raise UserError(
        f"corpus: {kind} file {filename} not found and its download failed ({reason}); put it at "
        f"{str(dest)!r} (or $KIMI_BENCH_DATA/{kind}/{filename}), or use corpus='text:PATH'"
    )


TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSTORIES_FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "valid": "TinyStoriesV2-GPT4-valid.txt"}


def _tinystories_url(filename: str) -> str:
    base = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{base}/datasets/roneneldan/TinyStories/resolve/main/{filename}"


@register_corpus("tinyshakespeare")
def _load_tinyshakespeare(arg: str, cfg: LoaderConfig, memo: DigestMemo, progress: Progress) -> Corpus:
    path = _find_or_fetch("tinyshakespeare", "input.txt", TINYSHAKESPEARE_URL, cfg, progress)
    return _file_corpus("tinyshakespeare", [("input.txt", path)], cfg, memo, progress, {"file": str(path)})


@register_corpus("tinystories")
def _load_tinystories(arg: str, cfg: LoaderConfig, memo: DigestMemo, progress: Progress) -> Corpus:
    paths = {
        split: _find_or_fetch("tinystories", fn, _tinystories_url(fn), cfg, progress)
        for split, fn in TINYSTORIES_FILES.items()
    }
    entries = []
    for i, (split, path) in enumerate(paths.items()):
        entries.append((split, memo.digest(path)))
        progress("hash tinystories", i + 1, len(paths))
    return Corpus(
        "tinystories",
        _content_hash(entries),
        "official-files",
        [Doc(paths["train"].name, paths["train"])],
        [Doc(paths["valid"].name, paths["valid"])],
        notes={"files": {k: str(p) for k, p in paths.items()}, "val_fraction_ignored": True},
    )


@register_corpus("tinystories-valid")
def _load_tinystories_valid(arg: str, cfg: LoaderConfig, memo: DigestMemo, progress: Progress) -> Corpus:
    fn = TINYSTORIES_FILES["valid"]
    path = _find_or_fetch("tinystories", fn, _tinystories_url(fn), cfg, progress)
    return _file_corpus("tinystories-valid", [(fn, path)], cfg, memo, progress, {"file": str(path)})


@register_corpus("bin:")
def _load_bin(arg: str, cfg: LoaderConfig, memo: DigestMemo, progress: Progress) -> Corpus:
    root = Path(arg).expanduser()
    for fn in ("train.bin", "val.bin"):
        if not (root / fn).is_file():
            raise UserError(f"corpus: bin:{arg} has no {fn}; give a folder with nanoGPT-style train.bin and val.bin")
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
    return Corpus(
        "bin",
        _content_hash(entries),
        "bin-files",
        bin_dir=root,
        bin_meta=meta,
        notes={"root": str(root.resolve()), "has_meta_pkl": (root / "meta.pkl").exists()},
    )


def load_corpus(cfg: LoaderConfig, progress: Progress | None = None) -> Corpus:
    """Find (download if needed and possible) and hash a corpus; documents are read later, lazily."""
    ensure_writable(cfg.cache_dir)
    loader, arg = find_loader(cfg.corpus)
    memo = DigestMemo(cfg.cache_dir)
    corpus = loader(arg, cfg, memo, progress or noop_progress)
    memo.save()
    return corpus
