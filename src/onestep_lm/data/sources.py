"""Corpora: read a data source into train / val (/ test) text, with clear errors for bad files.

Sources (`data.source`):

- shakespeare: the embedded Tiny Shakespeare; first 90% train, last 10% val (by character), no test.
- text: any UTF-8 file (`data.path`), cut by contiguous position with `data.split` (train, val[, test]).
- ptb: Mikolov's word-level Penn Treebank (`ptb.{train,valid,test}.txt`). A word-level tokenizer is not
  provided: the character or BPE tokenizer reads these files as text (`<unk>` is five characters).
- ptb-char: the character-level files (`ptb.char.*.txt`): symbols separated by spaces, `_` for a word
  gap. They become plain text with one character per symbol: the separating spaces are removed, `_`
  stays the word gap and each line ends with a newline (the end-of-line symbol).
- wikitext2: WikiText-2 v1 (`wiki.{train,valid,test}.tokens`), read as text.
- text8: the file `text8` or `text8.zip` (or a folder holding one); first 90M / next 5M / last 5M
  characters. A file of another length is cut at the same fractions (90% / 5% / 5%).

Every split file may be plain or xz-compressed (name + `.xz`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import lzma
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..config import DataConfig
from ..errors import DataError

SHAKESPEARE_SPLIT = (0.9, 0.1)
TEXT8_SPLIT = (0.9, 0.05, 0.05)  # = 90M / 5M / 5M characters of the 100M-character file
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
# The md5 of text8.zip as widely published (31,344,016 bytes); to be double-checked against a fresh download.
TEXT8_ZIP_MD5 = "f26f94c5209bc6c6c2ac3fc8afd2c84b"

# file names of the split files of each folder source (each may also be given as name + ".xz")
FOLDER_SOURCES = {
    "ptb": {"train": "ptb.train.txt", "val": "ptb.valid.txt", "test": "ptb.test.txt"},
    "ptb-char": {"train": "ptb.char.train.txt", "val": "ptb.char.valid.txt", "test": "ptb.char.test.txt"},
    "wikitext2": {"train": "wiki.train.tokens", "val": "wiki.valid.tokens", "test": "wiki.test.tokens"},
}


@dataclass
class Corpus:
    """The text of each split ("train", "val", and "test" when the source has one).

    `fingerprint` is a sha256 hex of the source bytes and of how they were cut into splits; it keys the
    cache of tokenized splits.
    """

    name: str
    splits: dict[str, str]
    fingerprint: str


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the corpus `cfg.source` names (see the module docstring for each source)."""
    source = cfg.source
    if source == "shakespeare":
        data = importlib.resources.files("onestep_lm").joinpath("assets/tiny_shakespeare.txt").read_bytes()
        text = decode_text(data, "the embedded Tiny Shakespeare")
        return _cut_corpus(source, text, data, SHAKESPEARE_SPLIT, "the embedded Tiny Shakespeare")
    if source not in ("text", "text8", *FOLDER_SOURCES):
        raise DataError(f"config key data.source: {source!r} is not one of shakespeare, text, "
                        f"{', '.join(FOLDER_SOURCES)}, text8")
    if not cfg.path:
        raise DataError(f"config key data.path is required when data.source is {source!r}")
    path = Path(cfg.path).expanduser()
    if source == "text":
        text, data = read_text_file(path)
        return _cut_corpus(source, text, data, tuple(cfg.split), str(path))
    if source == "text8":
        path = _find_text8(path)
        text, data = read_text_file(path)
        return _cut_corpus(source, text, data, TEXT8_SPLIT, str(path))
    return _load_folder(source, path)


def split_text(text: str, fractions: tuple[float, ...] | list[float], where: str) -> dict[str, str]:
    """Cut `text` by contiguous position: train = the first fraction, val = the next, test = the rest.

    The cut points are int(fraction * len) (cumulative), so [0.9, 0.1] keeps the first int(0.9 * len)
    characters for training. With two fractions there is no test split; a test fraction of exactly 0
    also means no test split. Any other split that ends up empty is a DataError naming `where`.
    """
    if len(fractions) not in (2, 3) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"config key data.split: {list(fractions)} must be 2 or 3 non-negative fractions "
                        "summing to 1 (train, val[, test])")
    n = len(text)
    cut1 = int(fractions[0] * n)
    cut2 = n if len(fractions) == 2 or fractions[2] == 0 else int((fractions[0] + fractions[1]) * n)
    splits = {"train": text[:cut1], "val": text[cut1:cut2]}
    if cut2 < n:
        splits["test"] = text[cut2:]
    for name, part in splits.items():
        if not part:
            raise DataError(f"{where}: the {name} split is empty ({n:,} characters cut at fractions "
                            f"{list(fractions)}); use a longer text or other data.split fractions")
    return splits


def read_text_file(path: Path) -> tuple[str, bytes]:
    """The text of a UTF-8 file (plain, `.xz`, or the `text8` member of a `.zip`), and its bytes
    (decompressed). A missing, empty, binary or non-UTF-8 file is a DataError naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    try:
        if path.suffix == ".xz":
            with lzma.open(path, "rb") as f:
                data = f.read()
        elif path.suffix == ".zip":
            data = _read_zip_member(path)
        else:
            data = path.read_bytes()
    except lzma.LZMAError as e:
        raise DataError(f"{path} is not a valid xz file: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    what = f"{path} (after decompression)" if path.suffix in (".xz", ".zip") else str(path)
    return decode_text(data, what), data


def decode_text(data: bytes, what: str) -> str:
    """`data` as UTF-8 text; empty, binary (a NUL byte) or non-UTF-8 data is a DataError naming `what`."""
    if not data:
        raise DataError(f"{what} is empty")
    nul = data.find(b"\x00")
    if nul != -1:
        raise DataError(f"{what} looks like a binary file, not text (NUL byte at byte offset {nul:,})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} is not valid UTF-8 text: byte {data[e.start:e.start + 1]!r} at byte offset "
                        f"{e.start:,} ({e.reason})") from None


def ptb_char_to_text(text: str) -> str:
    """The plain text of a PTB character-level file: drop the spaces that separate the symbols, so each
    symbol is one character; `_` stays the word gap and the newline stays the end of a line."""
    return text.replace(" ", "")


def download_text8(dest_folder: str | Path) -> Path:
    """Download text8.zip into `dest_folder` (kept if already there with the right checksum); return its path.

    The file is written to a temporary name and renamed only once its md5 matches TEXT8_ZIP_MD5, so an
    interrupted or corrupted download never leaves a file named text8.zip.
    """
    dest_folder = Path(dest_folder).expanduser()
    dest = dest_folder / "text8.zip"
    if dest.is_file() and _md5(dest) == TEXT8_ZIP_MD5:
        return dest
    try:
        dest_folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the folder {dest_folder}: {e}") from None
    fd, tmp = tempfile.mkstemp(dir=dest_folder, prefix="text8.zip.", suffix=".part")
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(TEXT8_URL, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="downloading text8.zip") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != TEXT8_ZIP_MD5:
            raise DataError(f"the download of {TEXT8_URL} has md5 {digest.hexdigest()}, expected "
                            f"{TEXT8_ZIP_MD5}; the file was not kept (try again, or fetch it by hand)")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"could not download {TEXT8_URL} to {dest}: {e}; download it by hand and set "
                        "data.path to the file") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def _cut_corpus(name: str, text: str, data: bytes, fractions: tuple[float, ...], where: str) -> Corpus:
    splits = split_text(text, fractions, where)
    digest = hashlib.sha256(f"{name}|split={list(fractions)}|".encode())
    digest.update(data)
    return Corpus(name=name, splits=splits, fingerprint=digest.hexdigest())


def _load_folder(source: str, folder: Path) -> Corpus:
    """A source given as a folder of split files (ptb, ptb-char, wikitext2)."""
    if not folder.exists():
        raise DataError(f"data folder not found: {folder} (config key data.path, source {source!r})")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; data.source {source!r} needs a folder holding "
                        f"{', '.join(FOLDER_SOURCES[source].values())}")
    splits: dict[str, str] = {}
    digest = hashlib.sha256(f"{source}|".encode())
    for split, file_name in FOLDER_SOURCES[source].items():
        path = _split_file(folder, file_name)
        text, data = read_text_file(path)
        if source == "ptb-char":
            text = ptb_char_to_text(text)
            if not text:
                raise DataError(f"{path} holds only spaces: the {split} split is empty")
        splits[split] = text
        digest.update(f"|{split}|{len(data)}|".encode())
        digest.update(data)
    return Corpus(name=source, splits=splits, fingerprint=digest.hexdigest())


def _split_file(folder: Path, file_name: str) -> Path:
    for candidate in (folder / file_name, folder / (file_name + ".xz")):
        if candidate.is_file():
            return candidate
    raise DataError(f"split file not found: {folder / file_name} (or {file_name}.xz)")


def _find_text8(path: Path) -> Path:
    if path.is_dir():
        for name in ("text8", "text8.zip"):
            if (path / name).is_file():
                return path / name
        raise DataError(f"no text8 or text8.zip in the folder {path} (config key data.path); "
                        "onestep_lm.data.download_text8 can fetch it")
    if not path.exists():
        raise DataError(f"data file not found: {path} (config key data.path, source 'text8')")
    return path


def _read_zip_member(path: Path) -> bytes:
    """The `text8` member of a zip file (or its only member)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            name = "text8" if "text8" in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise DataError(f"{path} holds no member named text8 (members: {', '.join(names[:5])})")
            return archive.read(name)
    except zipfile.BadZipFile as e:
        raise DataError(f"{path} is not a valid zip file: {e}") from None


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
