"""A synthetic source with a known entropy: an order-1 Markov chain started from its stationary law.

The entropy of a length-T window is H(pi) + (T - 1) * H_rate, where H_rate = sum_i pi_i H(P_i.), so any
honest likelihood bound, in bits per token, is at least entropy_per_token(T).
"""

import numpy as np
import torch


class MarkovSource:
    def __init__(self, vocab_size: int = 4, seed: int = 0, concentration: float = 0.3):
        rng = np.random.default_rng(seed)
        self.V = vocab_size
        self.P = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)
        w, v = np.linalg.eig(self.P.T)
        pi = np.real(v[:, np.argmin(np.abs(w - 1))])
        self.pi = pi / pi.sum()

    def entropy_per_token(self, T: int) -> float:
        h_pi = -(self.pi * np.log2(self.pi)).sum()
        h_rate = -(self.pi[:, None] * self.P * np.log2(np.clip(self.P, 1e-300, None))).sum()
        return (h_pi + (T - 1) * h_rate) / T

    def sample(self, n: int, T: int, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        x = np.empty((n, T), dtype=np.int64)
        x[:, 0] = rng.choice(self.V, size=n, p=self.pi)
        cum = self.P.cumsum(1)
        for t in range(1, T):
            r = rng.random(n)
            x[:, t] = np.minimum((r[:, None] > cum[x[:, t - 1]]).sum(1), self.V - 1)
        return torch.from_numpy(x)


def fit(model, src: MarkovSource, steps: int = 300, T: int = 8, batch: int = 64, lr: float = 3e-3):
    """Train a model on fresh windows of the source with Adam (seeded by step); leaves it in eval mode."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss, _ = model(src.sample(batch, T, seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
