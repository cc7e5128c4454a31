"""Gaussian codebook text encoder q(u|x) and its tied decoder p(x|u) (METHOD.md, Stage A).

Token k has a mean mu_k in R^d and a scale sigma_k > 0:
    q(u_t | x_t = k) = N(u_t; mu_k, sigma_k^2 I)                                  (dequantisation)
    p(x_t = k | u_t) = N(u_t; mu_k, sigma_k^2 I) / sum_j N(u_t; mu_j, sigma_j^2 I)  (tied decoder)
The decoder is the Bayes posterior of the encoder under a uniform prior over tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


class GaussianCodebook(nn.Module):
    def __init__(self, vocab_size: int, d: int, mu_init: float = 1.0, sigma_init: float = 0.3):
        super().__init__()
        self.vocab_size, self.d = vocab_size, d
        self.mu = nn.Parameter(torch.randn(vocab_size, d) * mu_init)
        self.log_sigma = nn.Parameter(torch.full((vocab_size,), math.log(sigma_init)))

    @property
    def sigma(self) -> Tensor:
        return self.log_sigma.exp()

    def sample(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """u ~ q(.|x) and log q(u|x) per position, (B, T, d) and (B, T). eps=0 gives the mean u = mu_x."""
        mu, log_sigma = self.mu[x].float(), self.log_sigma[x].float()
        if eps is None:
            eps = torch.randn_like(mu)
        u = mu + log_sigma.exp().unsqueeze(-1) * eps
        log_q = -0.5 * (eps ** 2).sum(-1) - self.d * log_sigma - 0.5 * self.d * LOG_2PI
        return u, log_q

    def log_likelihoods(self, u: Tensor) -> Tensor:
        """log N(u_t; mu_k, sigma_k^2 I) for every token k: (B, T, V), computed in float32 (also under autocast)."""
        with torch.autocast(u.device.type, enabled=False):
            return self._log_likelihoods(u.float())

    def _log_likelihoods(self, u: Tensor) -> Tensor:
        mu, log_sigma = self.mu.float(), self.log_sigma.float()
        sq = (u ** 2).sum(-1, keepdim=True) - 2 * u @ mu.T + (mu ** 2).sum(-1)  # ||u - mu_k||^2
        sq = sq.clamp_min(0.0)
        return -0.5 * sq * torch.exp(-2 * log_sigma) - self.d * log_sigma - 0.5 * self.d * LOG_2PI

    def log_posterior(self, u: Tensor) -> Tensor:
        """log p(x_t = k | u_t), the tied decoder: (B, T, V)."""
        return torch.log_softmax(self.log_likelihoods(u), dim=-1)

    def decode(self, u: Tensor) -> Tensor:
        """The most probable token at each position: (B, T)."""
        return self.log_likelihoods(u).argmax(-1)
