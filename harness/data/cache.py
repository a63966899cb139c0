"""The token cache's file helpers: atomic writes, content hashes, the file-digest memo, cached memmaps.

Layout: cache_dir/<data_hash>/{train.bin, val.bin, meta.json[, tokenizer.json]}, written into a temporary
folder that is renamed into place (`publish`), so a killed prepare never leaves a half-written cache (only a
cache_dir/.tmp-* folder, safe to delete when no prepare runs). Concurrent prepares of the same data are safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from harness.errors import UserError

# progress(description, completed, total): one task per distinct description; the last call of a task has
# completed == total. Units: files for hashing, bytes for downloads, (about) characters for tokenization.
Progress = Callable[[str, int, int], None]


def noop_progress(description: str, completed: int, total: int) -> None:
    pass


FORMAT_VERSION = 1  # bump when tokenization or the cache layout changes: it enters every data_hash


def ensure_writable(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"cache_dir: cannot write to {str(cache_dir)!r} ({e.strerror or e}); "
            f"set KIMI_BENCH_CACHE or cache_dir to a writable folder"
        ) from None


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def json_bytes(obj: object) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class DigestMemo:
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
            atomic_write(self.path, json_bytes(self.memo))


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def load_cached(folder: Path, data_hash: str) -> tuple[dict, np.memmap, np.memmap] | None:
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


def publish(tmp: Path, folder: Path, data_hash: str) -> None:
    """Rename the finished folder into place; if another process got there first, keep theirs."""
    try:
        os.replace(tmp, folder)
    except OSError:
        if load_cached(folder, data_hash) is None:  # a stale, invalid folder: replace it
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
