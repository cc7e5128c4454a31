"""Model-free sample metrics: entropy, distinct-n and repetition against hand counts, word validity, and the
suffix-array copying search against brute force (an inserted training substring of known length is found)."""

import math

import numpy as np
import pytest

from onestep_lm.evaluation.samples import (TrainingIndex, as_symbols, distinct_n, interior_words,
                                           mean_unigram_entropy, repetition_rate, suffix_array, text_metrics,
                                           unigram_entropy, word_validity)


def test_unigram_entropy_by_hand():
    # "aab": p = (2/3, 1/3)
    assert unigram_entropy([0, 0, 1]) == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert unigram_entropy([5, 5, 5, 5]) == 0.0
    assert unigram_entropy(list(range(8))) == pytest.approx(math.log(8))
    assert mean_unigram_entropy([[1, 1], [1, 2]]) == pytest.approx(math.log(2) / 2)


def test_distinct_n_and_repetition_on_crafted_text():
    texts = ["a b a b", "a c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)  # a b c among a b a b a c
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (a b) (b a) (a b) | (a c)
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)  # (a b a) (b a b)
    assert math.isnan(distinct_n(["a"], 2))
    # 4-grams of 1 2 3 4 1 2 3 4: 1234 2341 3412 4123 1234 -> 4 distinct of 5
    assert repetition_rate([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 / 5)
    assert repetition_rate([[7] * 10, list(range(10))]) == pytest.approx((1 - 1 / 7) / 2)


def test_word_validity_leaves_out_words_cut_by_the_window():
    assert interior_words("ing the kin") == ["the"]
    assert interior_words(" the king ") == ["the", "king"]
    assert interior_words("\nthe kingg") == ["the"]
    vocab = {"the", "king"}
    frac, count = word_validity(["xx the kingg zz", " the qqq "], vocab)
    assert count == 4 and frac == pytest.approx(2 / 4)  # the, kingg | the, qqq


def brute_suffix_array(a):
    return sorted(range(len(a)), key=lambda i: list(a[i:]))


@pytest.mark.parametrize("V", [2, 3, 60000])
def test_suffix_array_matches_sorting(V):
    rng = np.random.default_rng(V)
    for n in (1, 2, 7, 200):
        a = rng.integers(0, V, n)
        assert suffix_array(a).tolist() == brute_suffix_array(a)
    # ids above the surrogate range keep their order as symbols
    ids = [0xD7FF, 0xD800, 0xE000, 70000]
    assert list(as_symbols(ids)) == sorted(as_symbols(ids))


def test_copying_finds_an_inserted_training_substring():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 200, 5000)
    index = TrainingIndex(train)
    start, length = 1234, 20
    sample = np.concatenate([rng.integers(200, 400, 10), train[start:start + length], rng.integers(200, 400, 10)])
    ms = index.matching_statistics(sample)
    assert max(ms) == length  # flanked by ids that never occur in training
    assert ms[10] == length and ms[10 + length - 1] == 1 and ms[0] == 0
    copy = index.copying([sample])
    assert copy["longest_shared_max"] == length
    # 8-grams inside the inserted piece: length - 7, of len(sample) - 7 in all
    assert copy["ngram_overlap_8"] == pytest.approx((length - 7) / (len(sample) - 7))


def test_matching_statistics_against_brute_force():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 4, 300)
    index = TrainingIndex(train)
    text = as_symbols(train)
    for _ in range(20):
        s = as_symbols(rng.integers(0, 4, 25))
        ms = index.matching_statistics([ord(c) for c in s])
        for i in range(len(s)):
            k = 0
            while i + k < len(s) and s[i:i + k + 1] in text:
                k += 1
            assert ms[i] == k


def test_text_metrics_bundle():
    index = TrainingIndex(np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))
    m = text_metrics([[1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 0, 0, 0]], ["to be or", "not"], index=index,
                     vocabulary={"be"})
    assert m["copying"]["longest_shared_max"] == 9
    assert m["copying"]["ngram_overlap_8"] == pytest.approx(1.0)  # 2 of 2 8-grams (the second sample has none)
    assert m["word_validity"] == 1.0 and m["words_checked"] == 1
    assert m["unigram_entropy_nats"] == pytest.approx((math.log(9) + 0) / 2)
