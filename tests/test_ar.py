"""The AR baseline: exact NLL against hand-computed cross-entropies, KV-cache decoding against full recompute,
argmax / top-k / top-p, float64 draws that follow the model's law, and training to the entropy of a known source."""

import math

import pytest
import torch
import torch.nn.functional as F

from onestep_lm.config import BackboneConfig
from onestep_lm.models.ar import ARLM, filter_logits
from onestep_lm.nn.transformer import init_weights

from synthetic import MarkovSource, fit

CFG = BackboneConfig(width=32, depth=2, heads=2, mlp_ratio=2)


def random_model(V=5, T=6, seed=0, std=0.3):
    """A small model with large random weights, so its conditionals are far from uniform."""
    torch.manual_seed(seed)
    model = ARLM(V, T, CFG)
    init_weights(model, std=std)
    torch.nn.init.normal_(model.embed.weight, std=1.0)
    torch.nn.init.normal_(model.bos, std=1.0)
    return model.eval()


def test_nll_is_the_sum_of_next_token_cross_entropies():
    model = random_model()
    x = torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(1))
    by_hand = torch.zeros(3)
    for t in range(6):  # -log p(x_t | x_<t), the first token included (conditioned on BOS only)
        by_hand += F.cross_entropy(model.next_token_logits(x[:, :t]), x[:, t], reduction="none")
    assert torch.allclose(model.nll(x), by_hand, atol=1e-5)
    loss, metrics = model(x)
    assert abs(loss.item() - by_hand.sum().item() / (18 * math.log(2))) < 1e-5
    assert loss.requires_grad and 0 <= metrics["accuracy"] <= 1
    # a shorter window is scored by the same conditionals; a later token never changes earlier terms
    assert torch.allclose(model.token_nll(x[:, :4]), model.token_nll(x)[:, :4], atol=1e-5)
    y = x.clone()
    y[:, 3] = (y[:, 3] + 1) % 5
    assert torch.allclose(model.token_nll(y)[:, :3], model.token_nll(x)[:, :3], atol=1e-6)
    assert not torch.allclose(model.token_nll(y)[:, 4:], model.token_nll(x)[:, 4:])


def test_kv_cache_decoding_matches_full_recompute():
    model = random_model(T=7)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    cached, logits_c = model.sample(4, generator=g(), use_cache=True, return_logits=True)
    full, logits_f = model.sample(4, generator=g(), use_cache=False, return_logits=True)
    assert cached.shape == (4, 7) and logits_c.shape == (4, 7, 5)
    assert torch.allclose(logits_c, logits_f, atol=1e-5)
    assert torch.equal(cached, full)
    # the per-step logits are the model's conditionals given the sampled prefix
    assert torch.allclose(logits_c[:, 4], model.next_token_logits(cached[:, :4]), atol=1e-5)
    short = model.sample(4, seq_len=3, generator=g())
    assert torch.equal(short, cached[:, :3])


def test_temperature_zero_is_argmax_and_top_k_one_equals_it():
    model = random_model(seed=2)
    greedy = model.sample(3, temperature=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, model.sample(3, temperature=0, generator=torch.Generator().manual_seed(9)))
    for t in range(6):
        assert torch.equal(greedy[:, t], model.next_token_logits(greedy[:, :t]).argmax(-1))
    for seed in range(3):
        top1 = model.sample(3, top_k=1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(top1, greedy)
        tiny_p = model.sample(3, top_p=1e-6, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(tiny_p, greedy)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.2, 0.2]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, False]]
    assert torch.isinf(filter_logits(logits, top_p=0.45)).tolist() == [[True, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.65)).sum() == 2  # the nucleus {0.5, one 0.2} reaches 0.65
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()
    with pytest.raises(ValueError):
        filter_logits(logits, top_p=0.0)


def test_draws_are_float64_and_follow_the_tempered_law(monkeypatch):
    model = random_model(seed=4)
    seen = []
    real = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.dtype)
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    n = 20000
    for temperature in (1.0, 0.5):
        x = model.sample(n, seq_len=1, temperature=temperature, generator=torch.Generator().manual_seed(5))
        p = torch.softmax(model.next_token_logits(x[:1, :0]).double()[0] / temperature, -1)
        freq = torch.bincount(x[:, 0], minlength=5).double() / n
        assert ((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt() + 1e-4).all(), (freq, p)
    assert seen and all(dtype == torch.float64 for dtype in seen)


def test_training_approaches_the_entropy_and_never_beats_it():
    torch.manual_seed(0)
    src, T = MarkovSource(vocab_size=4, seed=0), 8
    H = src.entropy_per_token(T)
    model = ARLM(4, T, CFG)
    test_x = src.sample(4000, T, seed=123)

    def bits():
        b = model.eval().nll(test_x) / math.log(2) / T
        return b.mean().item(), b.std().item() / math.sqrt(len(b))

    before, _ = bits()
    fit(model, src, steps=300, T=T)
    after, se = bits()
    assert after < before - 0.3, (before, after)
    assert after >= H - 3 * se, f"exact NLL {after:.3f} below the true entropy {H:.3f}"
    assert after - H < 0.1, f"after training the NLL {after:.3f} should reach the entropy {H:.3f}"
