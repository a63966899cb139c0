"""DataConfig: the one definition of the data fields, the `[data]` section of a matrix as the user types it.

Validated by pydantic (strict types, unknown fields rejected). Built directly (`DataConfig(corpus=...)`) a bad
value raises one-line `UserError`s; nested in a matrix model the same checks surface as pydantic errors that
the matrix loader formats with the file name. `cache_dir` is where tokens are cached, not what they are: it
is excluded from `model_dump()`, so it never enters a trial key or the MLflow `data.*` params.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from harness.data.cache import Progress, noop_progress  # noqa: F401  (re-exported: the data API)
from harness.errors import UserError, suggest

TOKENIZERS = ("byte", "char", "bpe", "gpt2")
DEFAULT_BPE_VOCAB = 4096  # a small-corpus default; GPT-2's 50257 is what the paper-scale matrices set


def default_cache_dir() -> Path:
    return Path(os.environ.get("KIMI_BENCH_CACHE") or ".kimi-cache")


PositiveInt = Annotated[int, Field(gt=0)]


class _OneLineErrors(type(BaseModel)):
    """Calling the class (`DataConfig(...)`) turns a ValidationError into one UserError line; nested in another
    model (a matrix's [data]) pydantic validates without this call, so its errors keep their full location."""

    def __call__(cls, *args: Any, **fields: Any) -> Any:
        try:
            return super().__call__(*args, **fields)
        except ValidationError as e:
            raise UserError(format_error(e, sorted(cls.model_fields))) from None


class DataConfig(BaseModel, metaclass=_OneLineErrors):
    """What to train on: a corpus, a tokenizer, an optional cap and the val share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    corpus: str = "python-stdlib"  # a CORPORA name, text:PATH or bin:DIR (harness.data.corpora)
    tokenizer: str = "byte"  # byte | char | bpe | gpt2
    vocab_size: PositiveInt | None = None  # bpe: merges target (default 4096); others: pad the id space up to it
    max_chars: PositiveInt | None = None  # cap the corpus for tiny runs (see harness.data)
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    cache_dir: Path = Field(default_factory=default_cache_dir, exclude=True)

    @field_validator("corpus")
    @classmethod
    def _known_corpus(cls, corpus: str) -> str:
        from harness.data.corpora import find_loader  # corpora import this module

        try:
            find_loader(corpus)
        except UserError as e:
            raise ValueError(str(e).removeprefix("corpus: ")) from None
        return corpus

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, tokenizer: str) -> str:
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tokenizer!r}; {suggest(tokenizer, TOKENIZERS)}")
        return tokenizer

    @field_validator("vocab_size")
    @classmethod
    def _bpe_above_bytes(cls, vocab_size: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("tokenizer") == "bpe" and vocab_size is not None and vocab_size <= 256:
            raise ValueError(f"bpe needs more than 256 (its byte alphabet), got {vocab_size}; e.g. {DEFAULT_BPE_VOCAB}")
        return vocab_size

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _as_path(cls, value: Any) -> Any:
        return Path(value).expanduser() if isinstance(value, str | os.PathLike) else value

    @property
    def requested_vocab_size(self) -> int | None:
        if self.tokenizer == "bpe":
            return self.vocab_size or DEFAULT_BPE_VOCAB
        return self.vocab_size


def format_error(e: ValidationError, fields: list[str]) -> str:
    """The first pydantic error as `field: what; fix (got value)`."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown data field; {suggest(loc, fields)}"
    got = err.get("input")
    return f"{loc or 'data'}: {msg} (got {got!r})"
