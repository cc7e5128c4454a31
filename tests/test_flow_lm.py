"""The flow LM's ELBO: an honest upper bound on the entropy of a known source, falling with training."""

import math

import torch

from onestep_lm.config import FlowConfig
from onestep_lm.models.flow_lm import FlowLM

from synthetic import MarkovSource, fit


def bound_bits(model, x, samples=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    nll = model.nll(x, samples=samples, generator=g)
    return (nll / math.log(2) / x.shape[1]).mean().item(), (nll / math.log(2) / x.shape[1]).std().item() / math.sqrt(len(x))


def test_bound_never_below_true_entropy_and_falls_with_training():
    torch.manual_seed(0)
    src, T = MarkovSource(vocab_size=4, seed=0), 8
    H = src.entropy_per_token(T)
    model = FlowLM(4, T, FlowConfig(d=2, blocks=2, layers_per_block=1, width=32, heads=2, sigma_init=0.5))
    test_x = src.sample(4000, T, seed=123)
    before, _ = bound_bits(model.eval(), test_x)
    fit(model, src, steps=300, T=T)
    model.eval()
    after, se = bound_bits(model, test_x)
    iw, se_iw = bound_bits(model, test_x, samples=8)
    assert after < before - 0.5, (before, after)
    assert after >= H - 3 * se, f"ELBO {after:.3f} below the true entropy {H:.3f}"
    assert iw >= H - 3 * se_iw, f"IW bound {iw:.3f} below the true entropy {H:.3f}"
    assert iw <= after + 3 * se, "the importance-weighted bound should not be looser than the ELBO"
    assert after - H < 1.5, f"after training the bound {after:.3f} should approach the entropy {H:.3f}"


def test_elbo_terms_add_up_and_training_loss_is_bits_per_token():
    torch.manual_seed(1)
    model = FlowLM(5, 6, FlowConfig(d=3, blocks=2, layers_per_block=1, width=16, heads=2))
    x = torch.randint(0, 5, (4, 6))
    g = torch.Generator().manual_seed(0)
    t = model.elbo_terms(x, g)
    assert torch.allclose(t["neg_elbo"], t["decoder"] + t["prior"] - t["logdet"] - t["entropy"])
    torch.manual_seed(5)
    loss, metrics = model(x)
    per_token = 4 * 6 * math.log(2)
    total = metrics["decoder"] + metrics["prior"] - metrics["logdet"] - metrics["entropy"]
    assert abs(loss.item() - total) < 1e-4 and abs(loss.item()) > 0


def test_encode_decode_round_trip_and_sampling_shapes():
    torch.manual_seed(2)
    model = FlowLM(9, 5, FlowConfig(d=4, blocks=2, layers_per_block=1, width=16, heads=2, sigma_init=0.1)).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.head.weight, std=0.05)
    x = torch.randint(0, 9, (3, 5))
    assert torch.equal(model.decode(model.encode(x)), x)
    s = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 5) and s.max() < 9
