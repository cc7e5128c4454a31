"""Text metrics of samples (METHOD.md, "Metrics"), computed without any model.

- unigram entropy: for each sample, the entropy (nats) of the empirical distribution of its token ids;
  reported as the mean over samples. Comparable across samplers only at the same length; the same figure on
  real text windows of that length is the reference (a low judge perplexity at low entropy is mode collapse).
- distinct-n (Li et al. 2016): distinct word n-grams / all word n-grams, pooled over the samples; words are
  whitespace-separated, so the figure does not depend on the tokenizer.
- repetition rate: per sample, 1 - distinct token 4-grams / all token 4-grams (seq-rep-4, Welleck et al.
  2019), averaged over samples.
- word validity (character data): the fraction of whitespace-separated words that occur as words of the
  training text. A sample is a window cut out of running text, so its first and last words are left out
  unless whitespace bounds them (they may be cut in half).
- copying: with a suffix array of the training split's token ids, the matching statistic at each position
  of a sample (the longest prefix of the sample's suffix that occurs anywhere in the training split); from
  it, the fraction of the sample's 8-grams found in the training split and the longest substring shared with
  it (in tokens: characters for character data). Exact, no hashing. A training split longer than
  MAX_INDEX_TOKENS is searched in its first MAX_INDEX_TOKENS tokens (reported as train_tokens_searched).
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

COPY_N = 8  # n of the n-gram overlap with the training split
REP_N = 4  # n of the repetition rate
DISTINCT_N = (1, 2, 3)
MAX_INDEX_TOKENS = 20_000_000  # suffix array: about 1 s per million tokens on one core


# ---- per-sample statistics ------------------------------------------------------------------------------
def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy in nats of the empirical distribution of the ids of one sample (0 for an empty sample)."""
    counts = np.array(list(Counter(int(i) for i in ids).values()), dtype=np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mean_unigram_entropy(samples: Iterable[Sequence[int]]) -> float:
    values = [unigram_entropy(s) for s in samples]
    return float(np.mean(values)) if values else float("nan")


def ngrams(items: Sequence, n: int) -> list[tuple]:
    return [tuple(items[i:i + n]) for i in range(len(items) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over all texts (nan when there is no n-gram)."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(samples: Iterable[Sequence[int]], n: int = REP_N) -> float:
    """Mean over samples of 1 - distinct n-grams / all n-grams of the sample's token ids."""
    values = []
    for s in samples:
        grams = ngrams([int(i) for i in s], n)
        if grams:
            values.append(1 - len(set(grams)) / len(grams))
    return float(np.mean(values)) if values else float("nan")


def interior_words(text: str) -> list[str]:
    """Whitespace-separated words of a window of running text, without a first or last word that the window's
    edge may have cut (kept when whitespace bounds them)."""
    words = text.split()
    if words and text and not text[0].isspace():
        words = words[1:]
    if words and text and not text[-1].isspace():
        words = words[:-1]
    return words


def word_validity(texts: Iterable[str], vocabulary: set[str]) -> tuple[float, int]:
    """The fraction of interior words of the texts that are words of the training text, and their number."""
    words = [w for t in texts for w in interior_words(t)]
    if not words:
        return float("nan"), 0
    return sum(w in vocabulary for w in words) / len(words), len(words)


# ---- copying of the training split ------------------------------------------------------------------------
def as_symbols(ids: Sequence[int] | np.ndarray) -> str:
    """Token ids as a str of one code point each (surrogates skipped), so that Python's string comparison
    compares token sequences."""
    a = np.asarray(ids, dtype=np.int64)
    if a.size and a.min() < 0:
        raise ValueError("token ids must be >= 0")
    a = np.where(a >= 0xD800, a + 0x800, a)
    return a.astype("<u4").tobytes().decode("utf-32-le")


def suffix_array(ids: np.ndarray) -> np.ndarray:
    """Start offsets of all suffixes of `ids`, in lexicographic order (a shorter prefix sorts first).
    Prefix doubling with numpy sorts: O(n log n) per round, log2(longest repeat) rounds."""
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = np.unique(np.asarray(ids), return_inverse=True)[1].astype(np.int64).reshape(-1)
    k = 1
    while True:
        second = np.zeros(n, dtype=np.int64)
        second[: n - k] = rank[k:] + 1 if k < n else 0
        key = rank * (n + 1) + second
        sa = np.argsort(key, kind="stable")
        sorted_key = key[sa]
        new_rank = np.empty(n, dtype=np.int64)
        new_rank[sa] = np.concatenate([[0], np.cumsum(sorted_key[1:] != sorted_key[:-1])])
        rank = new_rank
        if rank[sa[-1]] == n - 1 or k >= n:
            return sa
        k *= 2


class TrainingIndex:
    """The training split's token ids, searchable for any substring (suffix array over a code-point str)."""

    def __init__(self, ids: np.ndarray):
        self.ids = np.asarray(ids)
        self.text = as_symbols(self.ids)
        self.sa = array("q", suffix_array(self.ids).astype(np.int64).tobytes())  # 8 bytes per suffix
        self.tokens = len(self.ids)

    def _common(self, start: int, pattern: str) -> int:
        """Length of the common prefix of the suffix at `start` and `pattern`."""
        other = self.text[start:start + len(pattern)]
        lo, hi = 0, len(other)
        if other == pattern[:hi]:
            return hi
        while lo < hi:  # binary search on the first difference, by slice equality (C speed)
            mid = (lo + hi + 1) // 2
            if other[:mid] == pattern[:mid]:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def longest_match(self, pattern: str) -> int:
        """The longest prefix of `pattern` that occurs in the training split, in tokens."""
        if not pattern or not self.sa:
            return 0
        text, sa, m = self.text, self.sa, len(pattern)
        lo, hi = 0, len(sa)
        while lo < hi:  # first suffix >= pattern (comparing at most len(pattern) symbols)
            mid = (lo + hi) // 2
            if text[sa[mid]:sa[mid] + m] < pattern:
                lo = mid + 1
            else:
                hi = mid
        best = 0
        for j in (lo - 1, lo):  # the longest common prefix is with one of the two neighbours
            if 0 <= j < len(sa):
                best = max(best, self._common(sa[j], pattern))
        return best

    def matching_statistics(self, ids: Sequence[int]) -> list[int]:
        """For each position i of a sample: the longest prefix of sample[i:] that occurs in the training split."""
        s = as_symbols(ids)
        return [self.longest_match(s[i:]) for i in range(len(s))]

    def copying(self, samples: Iterable[Sequence[int]], n: int = COPY_N) -> dict:
        """The fraction of the samples' n-grams found in the training split (pooled), and the longest
        substring of each sample shared with it (mean and max over samples), in tokens."""
        found = total = 0
        longest = []
        for s in samples:
            ms = self.matching_statistics(s)
            grams = ms[: max(len(ms) - n + 1, 0)]
            found += sum(m >= n for m in grams)
            total += len(grams)
            longest.append(max(ms) if ms else 0)
        return {f"ngram_overlap_{n}": found / total if total else float("nan"),
                "longest_shared_mean": float(np.mean(longest)) if longest else float("nan"),
                "longest_shared_max": int(max(longest)) if longest else 0,
                "train_tokens_searched": self.tokens}


# ---- everything at once ---------------------------------------------------------------------------------
def text_metrics(samples: Sequence[Sequence[int]], texts: Sequence[str], *, index: TrainingIndex | None = None,
                 vocabulary: set[str] | None = None) -> dict:
    """Every model-free metric of a set of samples (token ids and their decoded texts)."""
    out = {"unigram_entropy_nats": mean_unigram_entropy(samples),
           "repetition_rate": repetition_rate(samples),
           **{f"distinct_{n}": distinct_n(texts, n) for n in DISTINCT_N}}
    if vocabulary is not None:
        out["word_validity"], out["words_checked"] = word_validity(texts, vocabulary)
    if index is not None:
        out["copying"] = index.copying(samples)
    return out


def clean(obj):
    """nan -> None throughout (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj
