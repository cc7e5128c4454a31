"""The MDLM baseline: an honest bound (never below a known entropy, equal in expectation to the exact
continuous-time integral), falling with training; ancestral sampling that leaves no mask, follows the model's
law, draws in float64 and skips the network when nothing changed."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from onestep_lm.config import BackboneConfig
from onestep_lm.models.mdlm import MDLM
from onestep_lm.nn.transformer import init_weights

from synthetic import MarkovSource, fit

CFG = BackboneConfig(width=32, depth=2, heads=2, mlp_ratio=2)


def random_model(V=3, T=3, seed=0, std=0.3):
    """A small model with large random weights, so its denoiser is far from uniform."""
    torch.manual_seed(seed)
    model = MDLM(V, T, CFG)
    init_weights(model, std=std)
    torch.nn.init.normal_(model.embed.weight, std=1.0)
    return model.eval()


def test_bound_never_below_the_entropy_and_falls_with_training():
    torch.manual_seed(0)
    src, T = MarkovSource(vocab_size=4, seed=0), 8
    H = src.entropy_per_token(T)
    model = MDLM(4, T, CFG)
    test_x = src.sample(4000, T, seed=123)

    def bits():
        b = model.eval().nll(test_x, samples=2, generator=torch.Generator().manual_seed(0)) / math.log(2) / T
        return b.mean().item(), b.std().item() / math.sqrt(len(b))

    before, se_before = bits()
    fit(model, src, steps=300, T=T)
    after, se = bits()
    assert before >= H - 3 * se_before, f"NELBO {before:.3f} below the true entropy {H:.3f} before training"
    assert after >= H - 3 * se, f"NELBO {after:.3f} below the true entropy {H:.3f} after training"
    assert after < before - 0.15, (before, after)
    assert after - H < 0.4, f"after training the bound {after:.3f} should approach the entropy {H:.3f}"


def test_estimate_matches_the_exact_continuous_time_integral():
    """For T = 3 every mask pattern S can be enumerated: with g(m) = sum_S m^|S| (1 - m)^(T - |S|) c_S,
    c_S = sum_{l in S} -log x_theta(z_S)_l[x_l], the bound is int_eps^1 g(m) / m dm + g(eps)."""
    model = random_model()
    x = torch.tensor([[2, 0, 1]])
    patterns = [torch.tensor(S, dtype=torch.bool) for S in itertools.product([False, True], repeat=3)]
    m = torch.linspace(model.eps, 1, 200001, dtype=torch.float64)
    g = torch.zeros_like(m)
    for S in patterns:
        z = torch.where(S, model.mask_id, x)
        c = (F.cross_entropy(model.denoiser_logits(z)[0], x[0], reduction="none") * S).sum().double()
        g += m ** S.sum() * (1 - m) ** (3 - S.sum()) * c.detach()
    exact = torch.trapezoid(g / m, m).item() + g[0].item()
    draws = model.nll(x.repeat(20000, 1), samples=2, generator=torch.Generator().manual_seed(0))
    mc, se = draws.mean().item(), draws.std().item() / math.sqrt(len(draws))
    assert abs(mc - exact) < 4 * se, (mc, exact, se)
    # the same generator state gives the same estimate; the training loss is the same estimate in bits/token
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(model.nll(x.repeat(8, 1), generator=g1), model.nll(x.repeat(8, 1), generator=g2))
    torch.manual_seed(1)
    loss, metrics = model(x.repeat(8, 1))
    torch.manual_seed(1)
    nats = model.nll(x.repeat(8, 1))
    assert abs(loss.item() - nats.sum().item() / (24 * math.log(2))) < 1e-5 and 0 <= metrics["mask_rate"] <= 1


@pytest.mark.parametrize("steps", [1, 2, 8, 16, 40])
def test_sampling_leaves_no_mask(steps):
    model = random_model(V=5, T=16)
    x = model.sample(6, steps=steps, generator=torch.Generator().manual_seed(steps))
    assert x.shape == (6, 16) and x.dtype == torch.long
    assert (x >= 0).all() and (x < 5).all(), "a mask (or invalid id) survived sampling"
    assert 1 <= model.last_sample_nfe <= steps
    assert model.sample(2, seq_len=4, steps=steps, generator=torch.Generator().manual_seed(0)).max() < 5


def test_cache_skips_unchanged_steps_and_changes_nothing():
    model = random_model(V=5, T=8)
    model.sample(1, steps=64, generator=torch.Generator().manual_seed(0))
    assert 1 <= model.last_sample_nfe <= 8  # one call per step that revealed a position, at most 8 such steps
    cached = model.sample(4, steps=64, generator=torch.Generator().manual_seed(0))
    nfe = model.last_sample_nfe
    assert 1 <= nfe < 64
    uncached = model.sample(4, steps=64, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert nfe < model.last_sample_nfe <= 64  # without the cache: a call per step until no mask is left
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, model.sample(4, steps=64, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(cached, model.sample(4, steps=64, generator=torch.Generator().manual_seed(1)))
    model.sample(4, steps=1)
    assert model.last_sample_nfe == 1


def test_two_step_samples_follow_the_ancestral_law_with_float64_draws(monkeypatch):
    """T = 2, two steps (t = 1 -> 1/2 -> 0): each position is revealed at the first step with probability 1/2,
    and the exact law of the output is a mixture over which positions were revealed first."""
    model = random_model(V=3, T=2, seed=3)
    seen = []
    real = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.dtype)
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    M, V = model.mask_id, 3
    p = lambda z: torch.softmax(model.denoiser_logits(torch.tensor([z])).double()[0], -1)  # noqa: E731
    both = p([M, M])
    law = torch.zeros(V, V, dtype=torch.float64)
    for a, b in itertools.product(range(V), repeat=2):
        law[a, b] = 0.5 * both[0, a] * both[1, b] + 0.25 * both[0, a] * p([a, M])[1, b] \
            + 0.25 * both[1, b] * p([M, b])[0, a]
    n = 30000
    x = model.sample(n, steps=2, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(x[:, 0] * V + x[:, 1], minlength=V * V).double().view(V, V) / n
    assert abs(law.sum().item() - 1) < 1e-9
    assert ((freq - law).abs() <= 4.5 * (law * (1 - law) / n).sqrt() + 1e-4).all(), (freq, law)
    assert seen and all(dtype == torch.float64 for dtype in seen)
