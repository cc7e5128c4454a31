"""Mixture-CDF flow blocks (issue #7): Mix-1 (a learned 1-D mixture per scalar) and Mix-d (the codebook mixture).

Both have the AffineBlock interface (models/tarflow.py): a causal transformer over [start, v_0, ..., v_{T-2}] in
the block's order gives a state h_t from the positions before t; forward(v) -> (y, log|det| (B,), h) in the
natural order; inverse(y, use_cache=True) position by position with a KV cache; `reverse` flips the order. The
transform and its log-det run in float32 with autocast off. The scalar maps are y = Phi^{-1}(F(v)) with the
clamp, tolerance and root-finding inverse (safeguarded Newton) documented in models/mixture.py.

Mix-1. Position t, dimension i: F is a mixture of M Gaussians whose weights, means and log-scales come from h_t
and from v_{t,<i} (a MADE-masked MLP over the dimensions, `DimConditioner`). log|det| = sum_{t,i} log f(v_{t,i})
- log N(y_{t,i}; 0, 1). It cannot start as the identity; at initialisation every scalar map is the CDF of the
same equal-weight mixture of M components (means evenly spread, total variance 1, close to N(0, 1)), so the
block starts as a near-identity standardisation (exactly the identity for M = 1).

Mix-d (codebook mixture; allowed only as the first block, reading u from the text encoder). The network
predicts only V logits pi(u_<t); the components are the codebook's own N(mu_k, sigma_k^2 I):
    p(u_t | u_<t) = sum_k pi_k(u_<t) N(u_t; mu_k, sigma_k^2 I),
made a flow by the Rosenblatt transform: dimension i's conditional given u_{t,<i} is the mixture with weights
w_{k,i} ∝ pi_k prod_{j<i} N(u_{t,j}; mu_{k,j}, sigma_k^2) and components N(mu_{k,i}, sigma_k^2), so
    y_{t,i} = Phi^{-1}( sum_k w_{k,i} Phi((u_{t,i} - mu_{k,i}) / sigma_k) ),
    log|det| = sum_t [ log p(u_t | u_<t) - log N(y_t; 0, I) ].
The codebook's gradient flows through the block (the codebook is shared with the encoder and decoder; it is
owned by FlowLM and only referenced here, so it is stored once in the state_dict).

Mix-d and an autoregressive LM. With Mix-d as the whole flow (or later blocks at the identity), N(y; 0, I) in
the prior cancels -log N(y) in the log-det, and the per-position ELBO term is
    log p(x_t|u_t) + log p(u_t|u_<t) - log q(u_t|x_t)
      = log [N(u_t; mu_x, sigma_x^2 I) / sum_j N(u_t; mu_j, sigma_j^2 I)] + log sum_k pi_k N_k(u_t) - log N_x(u_t)
      = log sum_k pi_k(u_<t) p(k | u_t),
with p(k | u_t) the tied decoder's posterior. The decoder and entropy terms cancel the data's own component,
leaving pi averaged over the decoder's posterior. As sigma -> 0 (distinct means), p(k | u_t) -> 1[k = x_t]
and u_<t -> mu_{x_<t} for u ~ q(.|x), so -ELBO -> -sum_t log pi_{x_t}(mu_{x_<t}): exactly the cross-entropy of
a causal transformer LM whose input embeddings are the codebook means. For sigma > 0 the bound pays for the
overlap of the codebook clusters (the posterior blurs x_t with its neighbours) and the network sees noisy
inputs. At pi uniform (the zero-initialised head) the bound is exactly log V per token. Later blocks start at
the identity, so a stack starts from this bound. The cost: tensors of shape (B, T, V, d), fine for character
and small BPE vocabularies, large for V in the tens of thousands.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.transformer import init_weights
from .mixture import gaussianize_from_log_cdf, log_normal, mixture_gaussianize, mixture_invert
from .tarflow import CausalFlowBlock

MIX_LOG_SCALE_CLIP = 4.0  # Mix-1 component log-scales: c * tanh(raw / c), scales in [0.018, 55]
INIT_MEAN_VARIANCE = 0.3  # Mix-1 at init: variance of the evenly spread means (the rest is the components')


class MaskedLinear(nn.Linear):
    def __init__(self, n_in: int, n_out: int, mask: Tensor, bias: bool = True):
        super().__init__(n_in, n_out, bias=bias)
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask.to(self.weight.dtype), self.bias)


class DimConditioner(nn.Module):
    """n_out parameters for every latent dimension i from a context vector (h_t) and v_{t,<i} only: a one-hidden-
    layer MADE over the d dimensions plus a masked linear skip. Output (..., d, n_out); zero-initialised weights,
    so at initialisation the output is the bias."""

    def __init__(self, d: int, width: int, n_out: int):
        super().__init__()
        self.d, self.n_out = d, n_out
        hidden = max(width, d)
        degree = torch.arange(hidden) % d  # hidden unit h sees v_j for j < degree[h]
        out_dim = torch.arange(d * n_out) // n_out  # the dimension each output row belongs to
        self.ctx = nn.Linear(width, hidden)
        self.fc = MaskedLinear(d, hidden, torch.arange(d)[None, :] < degree[:, None], bias=False)
        self.out = MaskedLinear(hidden, d * n_out, degree[None, :] <= out_dim[:, None])
        self.skip = MaskedLinear(d, d * n_out, torch.arange(d)[None, :] < out_dim[:, None], bias=False)

    def forward(self, v: Tensor, ctx: Tensor) -> Tensor:
        v = v.to(self.fc.weight.dtype)
        a = F.gelu(self.ctx(ctx) + self.fc(v))
        return (self.out(a) + self.skip(v)).unflatten(-1, (self.d, self.n_out))


class Mix1Block(CausalFlowBlock):
    def __init__(self, d: int, seq_len: int, width: int, depth: int, heads: int, reverse: bool,
                 components: int = 8, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__(d, seq_len, width, depth, heads, reverse, mlp_ratio, dropout)
        self.components = M = components
        self.head = DimConditioner(d, width, 3 * M)
        init_weights(self)
        nn.init.zeros_(self.head.out.weight)
        nn.init.zeros_(self.head.skip.weight)
        # near-standardisation: equal weights, means spread with variance INIT_MEAN_VARIANCE, scales filling to 1
        spread = math.sqrt(3 * INIT_MEAN_VARIANCE * (M - 1) / (M + 1)) if M > 1 else 0.0
        means = torch.linspace(-spread, spread, M)
        scale = math.sqrt(1.0 - means.var(unbiased=False).item())
        raw_scale = MIX_LOG_SCALE_CLIP * math.atanh(math.log(scale) / MIX_LOG_SCALE_CLIP)
        bias = torch.cat([torch.zeros(M), means, torch.full((M,), raw_scale)])
        with torch.no_grad():
            self.head.out.bias.copy_(bias.repeat(d))

    def _mixture(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, mean, raw = out.float().split(self.components, dim=-1)
        return (torch.log_softmax(logits, dim=-1), mean,
                MIX_LOG_SCALE_CLIP * torch.tanh(raw / MIX_LOG_SCALE_CLIP))

    def _transform(self, w: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        out = self.head(w, h)  # (B, T, d, 3M): dimension i from h_t and w_{t,<i}
        with torch.autocast(w.device.type, enabled=False):
            y, logdet = mixture_gaussianize(w.float(), *self._mixture(out))
        return y, logdet.sum(dim=(1, 2))

    def _invert_position(self, y_t: Tensor, h: Tensor) -> Tensor:
        v = torch.zeros_like(y_t)
        for i in range(self.d):  # dimension i's mixture depends on v_{<i} only (masked), so zeros above are inert
            v[..., i] = mixture_invert(y_t[..., i], *self._mixture(self.head(v, h)[..., i, :]))
        return v


class MixdBlock(CausalFlowBlock):
    def __init__(self, codebook: nn.Module, d: int, seq_len: int, width: int, depth: int, heads: int,
                 reverse: bool = False, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__(d, seq_len, width, depth, heads, reverse, mlp_ratio, dropout)
        object.__setattr__(self, "_codebook", codebook)  # shared with FlowLM, not registered a second time
        self.head = nn.Linear(width, codebook.vocab_size)
        init_weights(self)
        nn.init.zeros_(self.head.weight)  # uniform pi at initialisation
        nn.init.zeros_(self.head.bias)

    def _components(self) -> tuple[Tensor, Tensor]:
        return self._codebook.mu.float(), self._codebook.log_sigma.float()

    def log_pi(self, h: Tensor) -> Tensor:
        """log pi_k(u_<t): (..., V)."""
        return torch.log_softmax(self.head(h).float(), dim=-1)

    def _transform(self, w: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        log_pi = self.log_pi(h)  # (B, T, V)
        with torch.autocast(w.device.type, enabled=False):
            mu, log_sigma = self._components()
            z = (w.float().unsqueeze(-2) - mu) * torch.exp(-log_sigma)[:, None]  # (B, T, V, d)
            lpd = log_normal(z) - log_sigma[:, None]  # log N(u_{t,i}; mu_{k,i}, sigma_k^2)
            prev = torch.cat([torch.zeros_like(lpd[..., :1]), lpd[..., :-1].cumsum(-1)], dim=-1)  # sum_{j<i}
            logw = torch.log_softmax(log_pi.unsqueeze(-1) + prev, dim=-2).transpose(-1, -2)  # (B, T, d, V)
            z = z.transpose(-1, -2)
            log_cdf = torch.logsumexp(logw + torch.special.log_ndtr(z), dim=-1)
            log_sf = torch.logsumexp(logw + torch.special.log_ndtr(-z), dim=-1)
            y = gaussianize_from_log_cdf(log_cdf, log_sf)  # (B, T, d)
            log_p = torch.logsumexp(log_pi + lpd.sum(-1), dim=-1)  # log p(u_t | u_<t): (B, T)
            logdet = (log_p - log_normal(y).sum(-1)).sum(-1)
        return y, logdet

    def _invert_position(self, y_t: Tensor, h: Tensor) -> Tensor:
        mu, log_sigma = self._components()
        acc = self.log_pi(h)  # (..., V): log pi_k + sum_{j<i} log N(u_j; mu_kj, sigma_k^2), unnormalised
        v = torch.zeros_like(y_t)
        for i in range(self.d):
            v[..., i] = mixture_invert(y_t[..., i], torch.log_softmax(acc, dim=-1), mu[:, i], log_sigma)
            acc = acc + log_normal((v[..., i:i + 1] - mu[:, i]) * torch.exp(-log_sigma)) - log_sigma
        return v
