"""The masked-diffusion baseline, MDLM (Sahoo et al. 2024): SUBS parameterisation, continuous-time NELBO.

Forward process: each token is independently replaced by [MASK] (id V) with probability 1 - alpha_t, with the
log-linear schedule sigma(t) = -log(1 - t), i.e. alpha_t = 1 - t, on t in [0, 1]: alpha_0 = 1 (clean data) and
alpha_1 = 0 (all masked, the sampler's start, so the prior term of the bound is zero).

SUBS: the denoiser x_theta(z_t) gives logits over the V real tokens only (the mask is never output), and every
unmasked position carries its input over unchanged. The network is a bidirectional transformer with no time
conditioning (the number of masks tells the time; MDLM works as well without it), which is also what makes
the sampler's cache exact: an unchanged z gives unchanged logits.

The continuous-time NELBO, in nats per sequence,

    -log p(x) <= E_t E_{z_t ~ q(.|x)} [ (-alpha'_t / (1 - alpha_t)) * sum_{l: z_t^l = MASK} -log x_theta(z_t)_l[x_l] ]

has weight -alpha'_t / (1 - alpha_t) = 1 / t. Its estimator's variance grows like log(1/t_min), so t is floored
at eps: t_eff = max(t, eps). That is still an upper bound, not an approximation: for t < eps the estimate is
(1/eps) E[masked cross-entropy at eps], whose integral over [0, eps) is exactly the reconstruction term
E_{z_eps}[-log p_theta(x | z_eps)] of the bound that starts the diffusion at eps instead of 0. t is drawn
low-discrepancy across the batch (t_i = (u + i/B) mod 1, u ~ U(0, 1)), so each t_i is still U(0, 1).

Sampling is ancestral, from t = 1 to 0 on a uniform grid: a masked position is revealed between t and s < t
with probability (alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t (1 at s = 0, so no mask survives), its
token drawn in float64 from the denoiser; revealed tokens stay fixed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BackboneConfig
from ..nn.draws import categorical
from ..nn.noise import BatchNoise
from ..nn.transformer import Transformer, init_weights

LN2 = math.log(2)


class MDLM(nn.Module):
    kind = "mdlm"
    bound = True  # nll() is an upper bound (the NELBO) on the negative log-likelihood

    def __init__(self, vocab_size: int, seq_len: int, cfg: BackboneConfig, eps: float = 1e-3):
        super().__init__()
        self.vocab_size, self.seq_len, self.eps = vocab_size, seq_len, eps
        self.mask_id = vocab_size  # [MASK]: an input id only
        self.embed = nn.Embedding(vocab_size + 1, cfg.width)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, seq_len, causal=False,
                                       mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)
        self.head = nn.Linear(cfg.width, vocab_size)  # V logits: the mask has probability 0 (SUBS)
        init_weights(self)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.last_sample_nfe = 0  # network calls made by the latest sample()

    # ---- schedule and forward process -------------------------------------------------------------------
    @staticmethod
    def alpha(t: Tensor) -> Tensor:
        """alpha_t = 1 - t: the probability that a token is still unmasked at time t."""
        return 1 - t

    def sample_t(self, batch: int, device: torch.device, generator: torch.Generator | None = None,
                 noise: BatchNoise | None = None) -> Tensor:
        """Low-discrepancy times t_i = (u + i/B) mod 1, floored at eps (B,). With the trainer's `noise`, i and B
        are the global index and the global batch size (so the times do not depend on the split)."""
        if noise is not None:
            u = noise.shared_rand(1, device=device)
            index, total = noise.index(batch, device=device)
        else:
            u = torch.rand(1, device=device, generator=generator)
            index, total = torch.arange(batch, device=device), batch
        t = (u + index / total) % 1
        return t.clamp_min(self.eps)

    def denoiser_logits(self, z: Tensor) -> Tensor:
        """Logits (B, T, V) of x_theta(z) over the real tokens, from a partly masked z (B, T)."""
        return self.head(self.transformer(self.embed(z)))

    # ---- the objective ----------------------------------------------------------------------------------
    def nelbo(self, x: Tensor, generator: torch.Generator | None = None,
              noise: BatchNoise | None = None) -> tuple[Tensor, Tensor]:
        """One draw of the NELBO estimate in nats per sequence (B,), and the mask (B, T) it used:
        (1 / t) * sum over masked positions of -log x_theta(z_t)[x] (unmasked positions carry over: 0)."""
        t = self.sample_t(x.shape[0], x.device, generator, noise)
        if noise is not None:
            draws = noise.rand(x.shape[0], x.shape[1], device=x.device)
        else:
            draws = torch.rand(x.shape, device=x.device, generator=generator)
        masked = draws < (1 - self.alpha(t))[:, None]
        z_t = torch.where(masked, torch.full_like(x, self.mask_id), x)
        ce = F.cross_entropy(self.denoiser_logits(z_t).float().transpose(1, 2), x, reduction="none")
        weight = 1 / t  # -alpha'_t / (1 - alpha_t)
        return weight * (ce * masked).sum(-1), masked

    def loss(self, x: Tensor, noise: BatchNoise | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Training loss: the NELBO in bits per token; metrics: the fraction of masked tokens. The times and
        masks come from `noise` (the trainer's, see nn/noise.py), else the global torch RNG."""
        bound, masked = self.nelbo(x, noise=noise)
        return bound.sum() / (x.numel() * LN2), {"mask_rate": masked.float().mean()}

    forward = loss  # the trainer (and DDP) call model(x)

    @torch.no_grad()
    def nll(self, x: Tensor, samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """The NELBO in nats per sequence (B,), averaged over `samples` draws of (t, mask) from `generator`."""
        return torch.stack([self.nelbo(x, generator)[0] for _ in range(samples)]).mean(0)

    # ---- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, seq_len: int | None = None, steps: int | None = None,
               generator: torch.Generator | None = None, temperature: float = 1.0,
               use_cache: bool = True) -> Tensor:
        """n sequences (n, seq_len) by `steps` ancestral steps (default seq_len) from all-mask at t = 1 to t = 0.
        With use_cache, a step where nothing was revealed reuses the previous logits (the network has no time
        input, so its output is unchanged); `self.last_sample_nfe` counts the network calls."""
        L = seq_len or self.seq_len
        steps = steps or L
        if L > self.seq_len:
            raise ValueError(f"seq_len {L} is longer than the model's {self.seq_len}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        device = self.head.weight.device
        z = torch.full((n, L), self.mask_id, dtype=torch.long, device=device)
        logits, changed, nfe = None, True, 0
        for i in range(steps):
            t, s = (steps - i) / steps, (steps - i - 1) / steps
            still_masked = z == self.mask_id
            if not still_masked.any():  # every position revealed early: nothing left to do
                break
            if changed or not use_cache:
                logits = self.denoiser_logits(z)
                nfe += 1
            if i == steps - 1:  # s = 0: (t - s) / t = 1, every remaining mask is revealed
                reveal = still_masked
            else:
                u = torch.rand(n, L, dtype=torch.float64, device=device, generator=generator)
                reveal = still_masked & (u < (t - s) / t)
            changed = bool(reveal.any())
            if changed:
                z[reveal] = categorical(logits[reveal], temperature, generator)
        self.last_sample_nfe = nfe
        return z
