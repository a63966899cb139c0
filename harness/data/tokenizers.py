"""Tokenizers: byte (UTF-8, 256), char (sorted characters of the train text + one <unk> id at the end that
unseen characters map to and that decodes to U+FFFD), bpe (byte-level BPE trained on the train text with
Hugging Face `tokenizers`, cached under cache_dir/tokenizers/), gpt2 (tiktoken; needs its cached BPE files
offline: TIKTOKEN_CACHE_DIR). Ids beyond a tokenizer's own vocab (a padded model may sample them) decode to
U+FFFD.

`token_bytes()` gives each id's UTF-8 byte length (what bits per byte divides by); ids that stand for no text
(special tokens, padding ids) have length 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from harness.errors import UserError


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

    def token_bytes(self) -> np.ndarray:
        """int64 [vocab_size]: the UTF-8 bytes each id stands for (0 for ids that stand for no text)."""
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

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)


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

    def token_bytes(self) -> np.ndarray:
        sizes = [len(c.encode("utf-8", errors="surrogatepass")) for c in self.chars]
        return np.array([*sizes, len("\ufffd".encode())], dtype=np.int64)  # <unk>: what it decodes to

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
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,
            special_tokens=[],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
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

    def token_bytes(self) -> np.ndarray:
        """A byte-level token's string holds one alphabet character per byte; added tokens count 0."""
        special = set(self.tok.get_added_tokens_decoder())
        return np.array(
            [0 if i in special else len(self.tok.id_to_token(i) or "") for i in range(self.vocab_size)], dtype=np.int64
        )


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
                raise UserError(
                    f"tokenizer: tiktoken cannot load 'gpt2' ({reason}); run once online or copy "
                    f"a tiktoken cache and set TIKTOKEN_CACHE_DIR to it, or use tokenizer='bpe'"
                ) from None
        return self._enc

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [
            np.asarray(ids, dtype=np.int64)
            for ids in self.enc.encode_ordinary_batch(texts, num_threads=min(8, os.cpu_count() or 1))
        ]

    def decode(self, ids: Iterable[int]) -> str:
        return _decode_runs(_as_ids(ids), self.enc.n_vocab, self.enc.decode)

    def token_bytes(self) -> np.ndarray:
        special = self.enc.special_tokens_set
        sizes = np.zeros(self.enc.n_vocab, dtype=np.int64)
        for i in range(self.enc.n_vocab):
            try:
                token = self.enc.decode_single_token_bytes(i)
            except KeyError:  # an id with no merge (none in gpt2): no text
                continue
            sizes[i] = 0 if token.decode("utf-8", errors="replace") in special else len(token)
        return sizes


class OpaqueTokenizer(Tokenizer):
    """bin: corpora whose meta.json names no tokenizer: ids only."""

    kind, identity = "opaque", "opaque"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        raise UserError(
            'tokenizer: this bin: corpus does not say its tokenizer; add "tokenizer": '
            '"gpt2" or "byte" to its meta.json to encode text'
        )

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(map(str, _as_ids(ids)))

    def token_bytes(self) -> np.ndarray:
        raise UserError(
            "tokenizer: this bin: corpus does not say its tokenizer, so its bytes per token are "
            'unknown; add "tokenizer": "gpt2" or "byte" to its meta.json'
        )


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


def tokenizer_identity(name: str) -> str:
    """The identity of the tokenizer cfg asks for, known before it is built (char/bpe depend on the train
    text, which the data hash already covers)."""
    if name == "bpe":
        return BPETokenizer.make_identity()
    return {"byte": ByteTokenizer, "char": CharTokenizer, "gpt2": GPT2Tokenizer}[name].identity


# -----------------------------------------------------------------------------------------------------------
# prepare
