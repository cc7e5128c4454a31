"""The Gaussian codebook encoder q(u|x) and its tied decoder p(x|u)."""

import math

import numpy as np
import torch

from onestep_lm.models.codebook import GaussianCodebook


def test_tied_decoder_is_the_bayes_posterior():
    torch.manual_seed(0)
    cb = GaussianCodebook(vocab_size=5, d=3, mu_init=1.0, sigma_init=0.5)
    with torch.no_grad():
        cb.log_sigma.copy_(torch.tensor([-1.0, -0.5, 0.0, 0.3, -0.2]))
    u = torch.randn(2, 4, 3)
    got = cb.log_posterior(u).exp().detach().double().numpy()
    mu, sigma = cb.mu.detach().double().numpy(), cb.sigma.detach().double().numpy()
    for b in range(2):
        for t in range(4):
            x = u[b, t].double().numpy()
            dens = np.array([np.prod(np.exp(-(x - mu[k]) ** 2 / (2 * sigma[k] ** 2)) / (sigma[k] * math.sqrt(2 * math.pi)))
                             for k in range(5)])
            assert np.allclose(got[b, t], dens / dens.sum(), atol=1e-5)


def test_sample_and_log_q_match_the_gaussian_density():
    torch.manual_seed(1)
    cb = GaussianCodebook(vocab_size=4, d=2, sigma_init=0.7)
    x = torch.tensor([[0, 3, 1]])
    u, log_q = cb.sample(x)
    mu, sigma = cb.mu[x].detach(), cb.sigma[x].detach()
    by_hand = torch.distributions.Normal(mu, sigma.unsqueeze(-1)).log_prob(u.detach()).sum(-1)
    assert torch.allclose(log_q.detach(), by_hand, atol=1e-5)
    mean_u, _ = cb.sample(x, eps=torch.zeros(1, 3, 2))
    assert torch.equal(mean_u.detach(), mu)


def test_decoder_recovers_tokens_from_their_means():
    torch.manual_seed(2)
    cb = GaussianCodebook(vocab_size=20, d=8, mu_init=1.0, sigma_init=0.1)
    x = torch.arange(20).view(2, 10)
    u, _ = cb.sample(x, eps=torch.zeros(2, 10, 8))
    assert torch.equal(cb.decode(u), x)
