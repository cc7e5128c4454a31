"""Tokenizers: characters, or byte-level BPE (trained on the training split, or GPT-2's published files).

Both kinds share one small interface, used by the rest of the package:

- `vocab_size`, `kind` ("char" | "bpe");
- `encode(text) -> list[int]`, `encode_array(text, offset=0) -> np.ndarray` (int64), `decode(ids) -> str`;
- `save(path)` writes one JSON file that `load_tokenizer` reads back;
- `fingerprint()`: a sha256 hex of what decides the ids (vocabulary, merges), used as a cache key.

A word-level tokenizer is not provided: word-level corpora (PTB, WikiText-2) are read as text by the
character or BPE tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..config import DataConfig
from ..errors import DataError

FORMAT_VERSION = 1  # of the JSON file written by `save`
UNK_TOKEN = "<unk>"
UNK_PLACEHOLDER = "\ufffd"  # CharTokenizer.decode shows the <unk> id as U+FFFD, the replacement character
BYTE_ALPHABET = 256  # a byte-level BPE always holds the 256 byte symbols
ENCODE_PIECE_CHARS = 16_384  # BPE encodes long text in pieces of about this size (see encode_array)


class CharTokenizer:
    """One id per character: the sorted characters of the training text, plus `<unk>` last when `unk` is set.

    Without `unk`, a character never seen in training is an error (DataError naming it and its position);
    with `unk`, it maps to the `<unk>` id, which decodes to U+FFFD ("\ufffd").
    """

    kind = "char"

    def __init__(self, chars: list[str], unk: bool = False) -> None:
        if not chars:
            raise DataError("a character tokenizer needs at least one character (the training text is empty)")
        if any(len(c) != 1 for c in chars) or sorted(set(chars)) != list(chars):
            raise DataError("a character tokenizer needs a sorted list of distinct single characters")
        self.chars = list(chars)
        self.unk = unk
        self.unk_id: int | None = len(self.chars) if unk else None
        self.vocab_size = len(self.chars) + (1 if unk else 0)
        # sorted code points: encoding is a vectorised binary search (fast enough for 100M characters)
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str, unk: bool = False) -> "CharTokenizer":
        """The vocabulary of `text` (normally the training split)."""
        if not text:
            raise DataError("cannot build a character vocabulary from an empty training split")
        return cls(sorted(set(text)), unk=unk)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str, offset: int = 0) -> np.ndarray:
        """The ids of `text` as an int64 array. `offset` (the position of text[0] in a larger text) only
        shifts the position reported for an unknown character."""
        points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
        ids = np.searchsorted(self._codes, points).astype(np.int64)
        known = self._codes[np.minimum(ids, len(self._codes) - 1)] == points
        if not known.all():
            if self.unk_id is None:
                pos = int(np.argmin(known))
                raise DataError(f"character {text[pos]!r} at position {offset + pos} is not in the character "
                                "vocabulary built from the training split (set data.unk=true to map unseen "
                                "characters to <unk>)")
            ids[~known] = self.unk_id
        return ids

    def decode(self, ids: Any) -> str:
        """Text of `ids` (a list, numpy array or torch tensor of ints, 1-D); <unk> decodes to U+FFFD."""
        table = self.chars + ([UNK_PLACEHOLDER] if self.unk else [])
        return "".join(table[i] for i in _id_list(ids, self.vocab_size))

    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "kind": self.kind, "chars": self.chars, "unk": self.unk}

    def fingerprint(self) -> str:
        return _sha256_json({"kind": self.kind, "chars": self.chars, "unk": self.unk})

    def save(self, path: Path) -> None:
        _write_json_atomic(Path(path), self.to_dict())

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unk={self.unk})"


class BPETokenizer:
    """Byte-level BPE (a wrapped HF `tokenizers.Tokenizer`): any text encodes, nothing is unknown.

    No prefix space is added and no special token is recognised in the text, so encoding is plain
    concatenation-friendly byte-level BPE (as GPT-2 / tiktoken with special tokens disallowed).
    """

    kind = "bpe"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._fingerprint: str | None = None  # computed once: serialising GPT-2's vocabulary takes a while

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        """Train on `text` (the training split). The result may hold fewer than `vocab_size` tokens when
        the text is too small to find that many merges. Deterministic: the same text gives the same merges."""
        if vocab_size < BYTE_ALPHABET:
            raise DataError(f"config key data.vocab_size: {vocab_size} is below {BYTE_ALPHABET}, the byte "
                            "alphabet of a byte-level BPE tokenizer")
        if not text:
            raise DataError("cannot train a BPE tokenizer on an empty training split")
        tokenizer = Tokenizer(models.BPE())
        _set_byte_level(tokenizer)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                      special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(safe_chunks(text), trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_gpt2_files(cls, folder: str | Path) -> "BPETokenizer":
        """GPT-2's published tokenizer: `encoder.json` and `vocab.bpe` in `folder` (50,257 tokens).
        `<|endoftext|>` has its id (50256) but is not recognised inside text."""
        folder = Path(folder)
        vocab, merges = folder / "encoder.json", folder / "vocab.bpe"
        missing = [str(p) for p in (vocab, merges) if not p.is_file()]
        if missing:
            raise DataError(f"GPT-2 tokenizer file(s) not found: {', '.join(missing)} (config key "
                            "data.tokenizer_path must name a folder with encoder.json and vocab.bpe)")
        try:
            tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
            raise DataError(f"cannot read the GPT-2 tokenizer files {vocab} and {merges}: {e}") from None
        _set_byte_level(tokenizer)
        return cls(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str, offset: int = 0) -> np.ndarray:
        """The ids of `text` as an int64 array (`offset` is unused: nothing is unknown to a byte-level BPE).

        The text is cut with `safe_chunks` (same ids as the whole text) and the pieces are encoded as one
        batch: many small pieces encode several times faster than one long string, and in parallel."""
        pieces = list(safe_chunks(text, ENCODE_PIECE_CHARS))
        ids = [np.asarray(e.ids, dtype=np.int64) for e in self.tokenizer.encode_batch(pieces)]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def decode(self, ids: Any) -> str:
        """Text of `ids` (a list, numpy array or torch tensor of ints, 1-D). A cut through a multi-byte
        character decodes to U+FFFD."""
        return self.tokenizer.decode(_id_list(ids, self.vocab_size), skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "kind": self.kind, "tokenizer": json.loads(self.tokenizer.to_str())}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            content = json.loads(self.tokenizer.to_str())
            self._fingerprint = _sha256_json({"kind": self.kind, "tokenizer": content})
        return self._fingerprint

    def save(self, path: Path) -> None:
        _write_json_atomic(Path(path), self.to_dict())

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(path: Path) -> CharTokenizer | BPETokenizer:
    """Read a tokenizer written by `save`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"tokenizer file {path} is damaged (not readable JSON): {e}") from None
    kind = data.get("kind") if isinstance(data, dict) else None
    try:
        if kind == "char":
            return CharTokenizer(list(data["chars"]), unk=bool(data["unk"]))
        if kind == "bpe":
            return BPETokenizer(Tokenizer.from_str(json.dumps(data["tokenizer"])))
    except DataError as e:
        raise DataError(f"tokenizer file {path} is damaged: {e}") from None
    except Exception as e:  # a missing key, or the tokenizers library refusing the content
        raise DataError(f"tokenizer file {path} is damaged: {type(e).__name__}: {e}") from None
    raise DataError(f"tokenizer file {path} is damaged: key 'kind' is {kind!r}, not 'char' or 'bpe'")


def build_tokenizer(cfg: DataConfig, train_text: str) -> CharTokenizer | BPETokenizer:
    """The tokenizer `cfg.tokenizer` asks for: char or bpe built from `train_text`, or gpt2 from its files."""
    if cfg.tokenizer == "char":
        return CharTokenizer.from_text(train_text, unk=cfg.unk)
    if cfg.tokenizer == "bpe":
        return BPETokenizer.train(train_text, cfg.vocab_size)
    if cfg.tokenizer == "gpt2":
        if not cfg.tokenizer_path:
            raise DataError("config key data.tokenizer_path (a folder with encoder.json and vocab.bpe) is "
                            "required when data.tokenizer is 'gpt2'")
        return BPETokenizer.from_gpt2_files(cfg.tokenizer_path)
    raise DataError(f"config key data.tokenizer: {cfg.tokenizer!r} is not one of char, bpe, gpt2")


def safe_chunks(text: str, size: int = 1 << 20) -> Iterator[str]:
    """Cut `text` into pieces of about `size` characters whose encodings, concatenated, equal the encoding
    of the whole text, for the character tokenizer and for byte-level BPE alike.

    A cut is made only just before a space that sits between two printable non-space characters
    ("word| word"). The byte-level pre-tokenizer (GPT-2's regex) always starts a new piece there (" word"),
    and no piece reaches across it, so BPE gives the same ids. Text without such a space (for example
    Chinese) stays in one piece, which is correct, only slower to show progress.
    """
    start = 0
    while len(text) - start > size:
        cut = text.find(" ", start + size)
        while cut != -1 and not (cut + 1 < len(text) and _solid(text[cut - 1]) and _solid(text[cut + 1])):
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _solid(ch: str) -> bool:
    """True for a character that no regex `\\s` can match (printable and not whitespace)."""
    return ch.isprintable() and not ch.isspace()


def _set_byte_level(tokenizer: Tokenizer) -> None:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()


def _id_list(ids: Any, vocab_size: int) -> list[int]:
    """`ids` (list, numpy array, torch tensor) as a list of Python ints, each checked to be a valid id."""
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if not isinstance(values, list):  # a 0-d array or tensor
        values = [values]
    for i in values:
        if not isinstance(i, int) or not 0 <= i < vocab_size:
            raise DataError(f"token id {i!r} is not an integer in [0, {vocab_size}) (the vocabulary size)")
    return values


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file next to `path`, then rename it (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private (0600); the tokenizer is an ordinary file of the run
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
