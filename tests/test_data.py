"""Tests of the data layer: tokenizers, sources, the token cache and the windows."""

from __future__ import annotations

import hashlib
import io
import lzma
import random
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from onestep_lm.config import DataConfig
from onestep_lm.data import (
    BPETokenizer,
    CharTokenizer,
    Corpus,
    TokenizedSplit,
    build_tokenizer,
    check_length,
    download_text8,
    eval_windows,
    load_corpus,
    load_tokenizer,
    prepare_data,
    random_windows,
    split_text,
    tokenize_corpus,
)
from onestep_lm.data import sources
from onestep_lm.data.tokenizers import UNK_PLACEHOLDER, safe_chunks
from onestep_lm.errors import DataError

GPT2_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/gpt2_bpe"
ALPHABET = "abcdefghij ABC,.;'\n\t  éüß日本語🙂\u00a0\u2028-_0123456789"
CORPUS = ("The quick brown fox jumps over the lazy dog. It's 2024, isn't it?\n"
          "  Indented line with    many spaces\n\nNew paragraph: naïve café, 日本語のテキスト 🙂.\n") * 40


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=320)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- tokenizers

def test_char_round_trip_on_random_text():
    rng = random.Random(0)
    tok = CharTokenizer.from_text(ALPHABET)
    assert tok.vocab_size == len(set(ALPHABET)) and tok.kind == "char"
    for _ in range(50):
        text = random_text(rng, rng.randint(0, 200))
        ids = tok.encode(text)
        assert len(ids) == len(text) and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(np.array(ids, dtype=np.uint16)) == text
        assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_char_vocabulary_is_sorted_characters():
    tok = CharTokenizer.from_text("cabca")
    assert tok.chars == ["a", "b", "c"]
    assert tok.encode("abc") == [0, 1, 2]


def test_char_unseen_character_names_it_and_its_position():
    tok = CharTokenizer.from_text("hello world")
    with pytest.raises(DataError) as info:
        tok.encode("hello wörld")
    assert "'ö'" in str(info.value) and "position 7" in str(info.value)


def test_char_unk_maps_unseen_characters():
    tok = CharTokenizer.from_text("abc", unk=True)
    assert tok.vocab_size == 4 and tok.unk_id == 3
    assert tok.encode("axbz🙂") == [0, 3, 1, 3, 3]
    assert tok.decode([0, 3, 1]) == "a" + UNK_PLACEHOLDER + "b"


def test_decode_rejects_out_of_range_ids(bpe):
    with pytest.raises(DataError, match="token id 5"):
        CharTokenizer.from_text("abc").decode([0, 5])
    with pytest.raises(DataError, match="token id -1"):
        bpe.decode([-1])


def test_bpe_round_trips_arbitrary_text(bpe):
    assert bpe.kind == "bpe" and 256 < bpe.vocab_size <= 320
    rng = random.Random(1)
    texts = [random_text(rng, rng.randint(0, 300)) for _ in range(30)]
    texts += ["", "\x00\x01 control", "Ω≈ç√∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧", CORPUS[:500]]
    for text in texts:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
    assert len(bpe.encode(CORPUS)) < 0.75 * len(CORPUS.encode())  # the merges compress the training text


def test_bpe_training_is_deterministic(bpe):
    again = BPETokenizer.train(CORPUS, vocab_size=320)
    assert again.fingerprint() == bpe.fingerprint()
    assert again.encode(CORPUS) == bpe.encode(CORPUS)
    assert BPETokenizer.train(CORPUS[:2000], vocab_size=300).fingerprint() != bpe.fingerprint()


def test_bpe_vocab_size_below_the_byte_alphabet_is_an_error():
    with pytest.raises(DataError, match="data.vocab_size"):
        BPETokenizer.train(CORPUS, vocab_size=100)


@pytest.mark.parametrize("size", [1, 3, 10, 50])
def test_safe_chunks_give_the_same_ids_as_the_whole_text(bpe, size):
    rng = random.Random(size)
    text = CORPUS[:1500] + random_text(rng, 1500) + "a  b \n c\n\nd 's 't x"
    pieces = list(safe_chunks(text, size))
    assert "".join(pieces) == text and len(pieces) > 1
    whole = bpe.tokenizer.encode(text).ids  # the library's own encoding of the whole string
    assert [i for p in pieces for i in bpe.tokenizer.encode(p).ids] == whole
    assert bpe.encode(text) == whole


@pytest.mark.skipif(not GPT2_DIR.is_dir(), reason="GPT-2 tokenizer files not staged")
def test_gpt2_files_give_the_published_ids():
    tok = BPETokenizer.from_gpt2_files(GPT2_DIR)
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world!") == [15496, 995, 0]
    assert tok.decode([15496, 995, 0]) == "Hello world!"
    cfg = DataConfig(tokenizer="gpt2", tokenizer_path=str(GPT2_DIR))
    assert build_tokenizer(cfg, "unused").fingerprint() == tok.fingerprint()


def test_gpt2_missing_files_are_named(tmp_path):
    write(tmp_path / "encoder.json", b"{}")
    with pytest.raises(DataError) as info:
        BPETokenizer.from_gpt2_files(tmp_path)
    assert str(tmp_path / "vocab.bpe") in str(info.value)
    assert str(tmp_path / "encoder.json") not in str(info.value)


def test_save_and_load_round_trip(tmp_path, bpe):
    for tok in (CharTokenizer.from_text("hello", unk=True), bpe):
        path = tmp_path / f"{tok.kind}.json"
        tok.save(path)
        loaded = load_tokenizer(path)
        assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
        assert loaded.fingerprint() == tok.fingerprint()
        assert loaded.encode("hello é") == tok.encode("hello é")
    assert not list(tmp_path.glob("*.tmp"))


def test_load_tokenizer_missing_or_damaged_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    for content in (b"{not json", b'{"kind": "word"}', b'{"kind": "char"}', b'{"kind": "bpe", "tokenizer": 3}'):
        path = write(tmp_path / "bad.json", content)
        with pytest.raises(DataError, match=str(path)):
            load_tokenizer(path)


def test_fingerprints_differ_between_tokenizers(bpe):
    prints = {CharTokenizer.from_text("abc").fingerprint(), CharTokenizer.from_text("abc", unk=True).fingerprint(),
              CharTokenizer.from_text("abd").fingerprint(), bpe.fingerprint()}
    assert len(prints) == 4


# ---------------------------------------------------------------- sources

def test_shakespeare_standard_split():
    corpus = load_corpus(DataConfig(source="shakespeare"))
    assert set(corpus.splits) == {"train", "val"}
    assert len(corpus.splits["train"]) == 1_003_854 and len(corpus.splits["val"]) == 111_540
    assert corpus.splits["train"].startswith("First Citizen:")
    assert len(CharTokenizer.from_text(corpus.splits["train"]).chars) == 65


def test_text_source_split_90_5_5(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000)) + "\n"
    path = write(tmp_path / "t.txt", text.encode())
    corpus = load_corpus(DataConfig(source="text", path=str(path)))
    assert [len(corpus.splits[k]) for k in ("train", "val", "test")] == [900, 50, 51]
    assert "".join(corpus.splits.values()) == text
    two = load_corpus(DataConfig(source="text", path=str(path), split=[0.8, 0.2]))
    assert set(two.splits) == {"train", "val"} and len(two.splits["train"]) == 800
    assert two.fingerprint != corpus.fingerprint  # the cut is part of the cache key


def test_split_text_empty_split_is_an_error():
    with pytest.raises(DataError, match="some.txt: the val split is empty"):
        split_text("abcdefghij", [1.0, 0.0], "some.txt")
    assert set(split_text("abcdefghij", [0.9, 0.1, 0.0], "x")) == {"train", "val"}


def test_xz_files_and_folder_sources(tmp_path):
    words = "the cat sat on the mat\n a dog <unk> N\n"
    write(tmp_path / "ptb.train.txt.xz", lzma.compress((words * 20).encode()))
    write(tmp_path / "ptb.valid.txt", words.encode())
    write(tmp_path / "ptb.test.txt", words.encode())
    corpus = load_corpus(DataConfig(source="ptb", path=str(tmp_path)))
    assert corpus.splits["train"] == words * 20 and corpus.splits["test"] == words

    char_text = " t h e _ c a t \n a _ < u n k > \n "
    for name in ("train", "valid", "test"):
        write(tmp_path / f"ptb.char.{name}.txt", char_text.encode())
    chars = load_corpus(DataConfig(source="ptb-char", path=str(tmp_path)))
    assert chars.splits["val"] == "the_cat\na_<unk>\n"


def test_missing_split_file_and_folder(tmp_path):
    write(tmp_path / "wiki.train.tokens", b"some text\n")
    write(tmp_path / "wiki.valid.tokens", b"some text\n")
    with pytest.raises(DataError, match=r"wiki\.test\.tokens"):
        load_corpus(DataConfig(source="wikitext2", path=str(tmp_path)))
    with pytest.raises(DataError, match="not found"):
        load_corpus(DataConfig(source="wikitext2", path=str(tmp_path / "absent")))


@pytest.mark.parametrize("data, message", [
    (b"", "is empty"),
    (b"text\x00\x01\x02", "NUL byte at byte offset 4"),
    (b"caf\xc3\xa9 ok \xff bad", "not valid UTF-8.*byte offset 9"),
])
def test_bad_files_are_named(tmp_path, data, message):
    path = write(tmp_path / "bad.txt", data)
    with pytest.raises(DataError, match=message) as info:
        load_corpus(DataConfig(source="text", path=str(path)))
    assert str(path) in str(info.value)
    xz = write(tmp_path / "bad.txt.xz", lzma.compress(data))
    with pytest.raises(DataError, match=message) as info:
        load_corpus(DataConfig(source="text", path=str(xz)))
    assert str(xz) in str(info.value)


def test_missing_text_file_is_named(tmp_path):
    with pytest.raises(DataError) as info:
        load_corpus(DataConfig(source="text", path=str(tmp_path / "missing.txt")))
    assert str(tmp_path / "missing.txt") in str(info.value)


def test_text8_from_zip_and_folder(tmp_path):
    text = "anarchism originated as a term " * 100
    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as archive:
        archive.writestr("text8", text)
    for path in (tmp_path, tmp_path / "text8.zip"):
        corpus = load_corpus(DataConfig(source="text8", path=str(path)))
        n = len(text)
        assert [len(corpus.splits[k]) for k in ("train", "val", "test")] == [int(0.9 * n), int(0.95 * n)
                                                                             - int(0.9 * n), n - int(0.95 * n)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text8"):
        load_corpus(DataConfig(source="text8", path=str(tmp_path / "empty")))


class FakeResponse(io.BytesIO):
    headers: dict = {}


def test_download_text8_checks_the_md5_and_writes_atomically(tmp_path, monkeypatch):
    payload = b"PK fake zip bytes"
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout: FakeResponse(payload))
    with pytest.raises(DataError, match="md5"):
        download_text8(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left
    monkeypatch.setattr(sources, "TEXT8_ZIP_MD5", hashlib.md5(payload).hexdigest())
    assert download_text8(tmp_path).read_bytes() == payload

    def offline(url, timeout):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(sources.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download"):
        download_text8(tmp_path / "other")


# ---------------------------------------------------------------- cache and windows

def small_corpus(text: str = CORPUS) -> Corpus:
    return Corpus(name="small", splits=split_text(text, [0.8, 0.1, 0.1], "test"),
                  fingerprint=hashlib.sha256(text.encode()).hexdigest())


def test_tokenize_corpus_caches_and_reuses(tmp_path, monkeypatch, bpe):
    corpus = small_corpus()
    tok = CharTokenizer.from_text(corpus.splits["train"], unk=True)
    first = tokenize_corpus(corpus, tok, tmp_path)
    for name, split in first.items():
        assert split.tokens.dtype == np.uint16 and isinstance(split.tokens, np.memmap)
        assert split.chars == len(corpus.splits[name])
        assert tok.decode(split.tokens) == corpus.splits[name]
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3 and all(f.suffix == ".npy" for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again instead of reading the cache")
    monkeypatch.setattr(tok, "encode_array", no_encoding)
    second = tokenize_corpus(corpus, tok, tmp_path)
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.iterdir())] == mtimes
    for name in first:
        assert np.array_equal(second[name].tokens, first[name].tokens)

    tokenize_corpus(corpus, bpe, tmp_path)  # another tokenizer: other cache files
    assert len(list(tmp_path.iterdir())) == 6


def test_cache_dir_defaults_to_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_LM_CACHE", str(tmp_path / "env-cache"))
    tokenize_corpus(small_corpus(), CharTokenizer.from_text(CORPUS), None)
    assert len(list((tmp_path / "env-cache").glob("*.npy"))) == 3


def test_damaged_cache_file_is_encoded_again(tmp_path):
    corpus, tok = small_corpus(), CharTokenizer.from_text(CORPUS)
    tokenize_corpus(corpus, tok, tmp_path)
    victim = sorted(tmp_path.iterdir())[0]
    victim.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="damaged"):
        again = tokenize_corpus(corpus, tok, tmp_path)
    assert all(tok.decode(s.tokens) == corpus.splits[n] for n, s in again.items())


def test_unknown_character_in_a_split_names_the_split(tmp_path):
    corpus = Corpus(name="c", splits={"train": "abcabc", "val": "abxa"}, fingerprint="f")
    with pytest.raises(DataError, match=r"val split.*'x' at position 2"):
        tokenize_corpus(corpus, CharTokenizer.from_text("abcabc"), tmp_path)


def test_prepare_data_and_the_short_train_split(tmp_path):
    path = write(tmp_path / "t.txt", CORPUS.encode())
    cfg = DataConfig(source="text", path=str(path), seq_len=16, cache_dir=str(tmp_path / "cache"))
    bundle = prepare_data(cfg)
    assert bundle.seq_len == 16 and bundle.vocab_size == len(set(bundle.tokenizer.chars))
    assert set(bundle.splits) == {"train", "val", "test"}
    reused = prepare_data(cfg, tokenizer=bundle.tokenizer)
    assert reused.tokenizer is bundle.tokenizer

    short = write(tmp_path / "short.txt", b"x" * 100)
    cfg = DataConfig(source="text", path=str(short), seq_len=128, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"train split holds 90 tokens.*seq_len=128"):
        prepare_data(cfg)


def test_check_length():
    split = TokenizedSplit(name="val", tokens=np.zeros(10, dtype=np.uint16), chars=10)
    check_length(split, 10)
    with pytest.raises(DataError, match="val split holds 10 tokens"):
        check_length(split, 11)


@pytest.mark.parametrize("n, seq_len, batch_size", [(100, 8, 3), (96, 8, 4), (5, 8, 2), (17, 1, 5), (0, 4, 2)])
def test_eval_windows_cover_every_token_once_in_order(n, seq_len, batch_size):
    tokens = np.arange(n, dtype=np.uint16)
    batches = list(eval_windows(tokens, seq_len, batch_size))
    flat = torch.cat([b.reshape(-1) for b in batches]) if batches else torch.zeros(0, dtype=torch.long)
    assert flat.tolist() == list(range(n))
    assert all(b.dtype == torch.long and b.ndim == 2 for b in batches)
    full, tail = divmod(n, seq_len)
    assert all(b.shape[1] == seq_len and b.shape[0] <= batch_size for b in batches[:len(batches) - bool(tail)])
    if tail:
        assert batches[-1].shape == (1, tail)
    assert len(batches) == -(-full // batch_size) + bool(tail)


def test_random_windows_are_deterministic_and_in_range():
    tokens = np.arange(50, dtype=np.uint16)
    draw = lambda seed: random_windows(tokens, 10, 64, torch.Generator().manual_seed(seed))
    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (64, 10) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    starts = a[:, 0]
    assert starts.min() >= 0 and starts.max() <= 40
    assert torch.equal(a, starts[:, None] + torch.arange(10))  # contiguous windows
    many = random_windows(tokens, 10, 4000, torch.Generator().manual_seed(2))
    assert set(many[:, 0].tolist()) == set(range(41))  # every start, both ends included, is drawn
    with pytest.raises(DataError, match="50 tokens"):
        random_windows(tokens, 51, 2, torch.Generator().manual_seed(0))
