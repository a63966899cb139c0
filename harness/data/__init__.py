"""Corpora, tokenizers, cached token arrays and batch streams.

    data = prepare(DataConfig(corpus="python-stdlib", tokenizer="byte"))
    batches = TokenBatches(data.train, block_size, micro_batch_size, grad_accum, seed, world_size)
    x, y = batches.get(step, micro, rank)
    for x, y in val_batches(data.val, block_size, batch_size): ...
    vocab, exact = vocab_size_for({"corpus": "tinystories", "tokenizer": "gpt2"})  # offline, no tokenizing
    bits_per_byte = mean_nll * n_tokens / data.val_bytes(n_tokens) / math.log(2)

One module per concern:
  config      DataConfig: the data fields (the matrix's [data] section), validated by pydantic
  corpora     the corpus registry (python-stdlib, python-site, text:PATH, tinystories, bin:DIR, ...) and loaders
  tokenizers  byte, char, bpe, gpt2 (and opaque ids for bin: corpora)
  cache       atomic writes, hashes, the file-digest memo, cached memmaps
  pipeline    corpus -> tokens in the cache -> PreparedData; vocab_size_for without preparing
  batches     TokenBatches (training windows from (seed, step)) and val_batches (fixed val blocks)
"""

from harness.data.batches import TokenBatches, n_val_tokens, val_batches
from harness.data.cache import FORMAT_VERSION
from harness.data.config import DEFAULT_BPE_VOCAB, TOKENIZERS, DataConfig, Progress, default_cache_dir
from harness.data.corpora import CORPORA, Corpus, Doc, corpus_names, load_corpus, register_corpus
from harness.data.pipeline import PreparedData, prepare, vocab_size_for
from harness.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    OpaqueTokenizer,
    Tokenizer,
    tokenizer_from_spec,
)

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "CORPORA",
    "CharTokenizer",
    "Corpus",
    "DEFAULT_BPE_VOCAB",
    "DataConfig",
    "Doc",
    "FORMAT_VERSION",
    "GPT2Tokenizer",
    "OpaqueTokenizer",
    "PreparedData",
    "Progress",
    "TOKENIZERS",
    "TokenBatches",
    "Tokenizer",
    "corpus_names",
    "default_cache_dir",
    "load_corpus",
    "n_val_tokens",
    "prepare",
    "register_corpus",
    "tokenizer_from_spec",
    "val_batches",
    "vocab_size_for",
]
