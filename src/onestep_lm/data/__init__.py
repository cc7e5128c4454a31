"""The data layer: corpora, tokenizers, the token cache and the windows that training and evaluation read."""

from .sources import Corpus, download_text8, load_corpus, read_text_file, split_text
from .tokenizers import BPETokenizer, CharTokenizer, build_tokenizer, load_tokenizer
from .windows import (
    DataBundle,
    TokenizedSplit,
    check_length,
    eval_windows,
    prepare_data,
    random_windows,
    tokenize_corpus,
)

__all__ = [
    "BPETokenizer",
    "CharTokenizer",
    "Corpus",
    "DataBundle",
    "TokenizedSplit",
    "build_tokenizer",
    "check_length",
    "download_text8",
    "eval_windows",
    "load_corpus",
    "load_tokenizer",
    "prepare_data",
    "random_windows",
    "read_text_file",
    "split_text",
    "tokenize_corpus",
]
