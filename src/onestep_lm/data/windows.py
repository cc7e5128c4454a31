"""Tokenized splits (cached as .npy memmaps) and the windows of tokens that training and evaluation read.

- `tokenize_corpus` encodes each split once and keeps it in a cache folder, keyed by the corpus and
  tokenizer fingerprints, so later runs open the ids as a memory map instead of encoding again.
- `random_windows` draws training windows; `eval_windows` covers a split exactly once for evaluation.
- `prepare_data` does all of it from a DataConfig.

Short splits: the training split must hold at least `seq_len` tokens (`check_length`, called by
`prepare_data`). A val/test split may be shorter: `eval_windows` then yields it as one short window,
while `random_windows` refuses it (it cannot draw a full window).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from ..config import DataConfig
from ..errors import DataError
from .sources import Corpus, load_corpus
from .tokenizers import BPETokenizer, CharTokenizer, build_tokenizer, safe_chunks

Tokenizer = CharTokenizer | BPETokenizer
CACHE_VERSION = 1  # bump when the cache layout or what decides the ids changes
CACHE_ENV = "ONESTEP_LM_CACHE"
PROGRESS_MIN_CHARS = 1_000_000  # show a progress bar when encoding a split at least this long
CHUNK_CHARS = 1 << 20  # characters encoded per step of the progress bar


@dataclass
class TokenizedSplit:
    """The ids of one split: `tokens` is 1-D (a read-only np.memmap from the cache; uint16 when the
    vocabulary has fewer than 65,536 tokens, else uint32); `chars` is the length of the split's text, so
    that a loss per token can be reported in bits per character."""

    name: str
    tokens: np.ndarray
    chars: int

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class DataBundle:
    """Everything a run reads: the tokenizer, the tokenized splits and the window length."""

    tokenizer: Tokenizer
    splits: dict[str, TokenizedSplit]
    seq_len: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def prepare_data(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> DataBundle:
    """Load the corpus, build the tokenizer from its train split unless one is given (a trained run
    reuses its saved tokenizer), tokenize every split (with the cache) and check the train split length."""
    corpus = load_corpus(cfg)
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg, corpus.splits["train"])
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None
    splits = tokenize_corpus(corpus, tokenizer, cache_dir)
    check_length(splits["train"], cfg.seq_len)
    return DataBundle(tokenizer=tokenizer, splits=splits, seq_len=cfg.seq_len)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it, else uint32."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def default_cache_dir() -> Path:
    """$ONESTEP_LM_CACHE, or ~/.cache/onestep-lm."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onestep-lm"


def cache_path(cache_dir: Path, corpus: Corpus, tokenizer: Tokenizer, split: str) -> Path:
    """Where the ids of one split are cached: named after the corpus and split, keyed by a hash of the
    corpus fingerprint, the tokenizer fingerprint, the split name and the cache version."""
    key = hashlib.sha256(f"v{CACHE_VERSION}|{corpus.fingerprint}|{tokenizer.fingerprint()}|{split}".encode())
    return Path(cache_dir) / f"{corpus.name}.{split}.{tokenizer.kind}.{key.hexdigest()[:32]}.npy"


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path | None = None
                    ) -> dict[str, TokenizedSplit]:
    """Encode every split of `corpus`, or open its cached ids. A cache file is written atomically
    (temporary file + rename), so an interrupted run never leaves a half-written one."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache folder {cache_dir} (config key data.cache_dir or "
                        f"${CACHE_ENV}): {e}") from None
    result = {}
    for name, text in corpus.splits.items():
        path = cache_path(cache_dir, corpus, tokenizer, name)
        tokens = _open_cached(path)
        if tokens is None:
            parts = _encode_split(corpus.name, name, text, tokenizer)
            _write_npy_atomic(path, parts)
            tokens = np.load(path, mmap_mode="r")
        result[name] = TokenizedSplit(name=name, tokens=tokens, chars=len(text))
    return result


def check_length(split: TokenizedSplit, seq_len: int) -> None:
    """A DataError when `split` holds fewer than `seq_len` tokens (one full window)."""
    if len(split.tokens) < seq_len:
        raise DataError(f"the {split.name} split holds {len(split.tokens):,} tokens, fewer than one window of "
                        f"data.seq_len={seq_len} tokens; use more data or a smaller data.seq_len")


def random_windows(tokens: np.ndarray, seq_len: int, batch_size: int, generator: torch.Generator
                   ) -> torch.Tensor:
    """A LongTensor (batch_size, seq_len) of windows whose start offsets are drawn uniformly in
    [0, len(tokens) - seq_len] with `generator` (so the same generator state gives the same batch)."""
    n = len(tokens)
    if n < seq_len:
        raise DataError(f"cannot draw windows of {seq_len} tokens from a split of {n:,} tokens")
    starts = torch.randint(0, n - seq_len + 1, (batch_size,), generator=generator, device=generator.device)
    index = starts.cpu().numpy()[:, None] + np.arange(seq_len)[None, :]
    return torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int) -> Iterator[torch.Tensor]:
    """LongTensor batches that cover every token once, in order: non-overlapping windows of `seq_len`,
    `batch_size` windows per batch (the last full batch may hold fewer); then the tail
    (len % seq_len tokens, when there are any) as its own batch of shape (1, tail_len)."""
    if seq_len < 1 or batch_size < 1:
        raise DataError(f"eval_windows needs seq_len >= 1 and batch_size >= 1, got {seq_len} and {batch_size}")
    full = len(tokens) // seq_len
    for first in range(0, full, batch_size):
        last = min(first + batch_size, full)
        block = np.asarray(tokens[first * seq_len:last * seq_len], dtype=np.int64)
        yield torch.from_numpy(block.reshape(last - first, seq_len))
    if full * seq_len < len(tokens):
        tail = np.asarray(tokens[full * seq_len:], dtype=np.int64)
        yield torch.from_numpy(tail.reshape(1, -1))


def _encode_split(corpus_name: str, split: str, text: str, tokenizer: Tokenizer) -> list[np.ndarray]:
    """The ids of `text` (as arrays of `token_dtype`), encoded in pieces (same ids as the whole text),
    with a progress bar when the text is long."""
    dtype = token_dtype(tokenizer.vocab_size)
    parts = []
    with tqdm(total=len(text), unit="char", unit_scale=True, desc=f"tokenizing {corpus_name} {split}",
              disable=len(text) < PROGRESS_MIN_CHARS) as bar:
        offset = 0
        for piece in safe_chunks(text, CHUNK_CHARS):
            try:
                parts.append(tokenizer.encode_array(piece, offset).astype(dtype))
            except DataError as e:
                raise DataError(f"{corpus_name}, {split} split: {e}") from None
            offset += len(piece)
            bar.update(len(piece))
    return parts


def _write_npy_atomic(path: Path, parts: list[np.ndarray]) -> None:
    """Write the concatenated `parts` (all of one dtype) as a .npy file, through a temporary file renamed
    at the end."""
    total = sum(len(p) for p in parts)
    dtype = parts[0].dtype
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private (0600); the cache is ordinary data
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
        start = 0
        for part in parts:
            out[start:start + len(part)] = part
            start += len(part)
        out.flush()
        del out
        os.replace(tmp, path)
    except OSError as e:
        raise DataError(f"cannot write the token cache {path}: {e}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _open_cached(path: Path) -> np.ndarray | None:
    """The cached ids at `path` as a read-only memmap, or None when absent (or damaged: then it is
    removed, with a warning, and encoded again)."""
    if not path.is_file():
        return None
    try:
        tokens = np.load(path, mmap_mode="r")
        if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32):
            raise ValueError(f"unexpected array {tokens.dtype} {tokens.shape}")
        return tokens
    except (OSError, ValueError) as e:
        warnings.warn(f"token cache {path} is damaged ({e}); encoding again", stacklevel=3)
        path.unlink(missing_ok=True)
        return None
