"""Stage A: the flow language model. Gaussian codebook -> flow blocks -> N(0, I), trained by the ELBO.

The blocks (config key model.flow.blocks) are affine TarFlow blocks (tarflow.py) or mixture-CDF blocks
(mixture_blocks.py: mix1, and mixd, the codebook mixture, as the first block only), all with the same interface.

    log p(x) >= E_{u ~ q(.|x)} [ log p(x|u) + log N(f(u); 0, I) + log|det df/du| - log q(u|x) ]

Each term is kept separately (in nats per sequence): the decoder NLL -log p(x|u), the prior NLL
-log N(z; 0, I), the log-det, and the encoder entropy -log q(u|x). The negative ELBO is
    decoder + prior - logdet - entropy
and is an upper bound on -log p(x). With S samples of u, the importance-weighted bound
-log (1/S) sum_s w_s (w_s the ELBO's integrand) is tighter and still a bound.

The transport penalty (config key model.flow.transport, issue #8). Among flows of equal likelihood, the one that
moves points least is the easiest for a one-step network to undo. Training adds
    beta * displacement,   displacement = ||z - u||^2 (kind `end`) or sum_k ||v_k - v_{k-1}||^2 (kind `blocks`)
per token (summed over the d dimensions, averaged over tokens) to the loss. It is logged as its own term
(`transport`, and `displacement`: the mean (z - u)^2 per dimension) and is never part of the bound: nll() and the
logged `bound` are the negative ELBO alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import FlowConfig
from ..errors import ConfigError
from ..nn.noise import BatchNoise
from .codebook import LOG_2PI, GaussianCodebook
from .mixture_blocks import Mix1Block, MixdBlock
from .tarflow import AffineBlock

LN2 = math.log(2)


class FlowLM(nn.Module):
    kind = "flow"
    bound = True  # nll() is an upper bound on the negative log-likelihood

    def __init__(self, vocab_size: int, seq_len: int, cfg: FlowConfig):
        super().__init__()
        self.vocab_size, self.seq_len, self.d = vocab_size, seq_len, cfg.d
        self.codebook = GaussianCodebook(vocab_size, cfg.d, cfg.mu_init, cfg.sigma_init)
        self.blocks = nn.ModuleList(self._block(k, spec, seq_len, cfg) for k, spec in enumerate(cfg.block_specs()))
        self.freeze_schedule = list(cfg.freeze_schedule)
        self.transport = cfg.transport

    def _block(self, k: int, spec: dict, seq_len: int, cfg: FlowConfig) -> nn.Module:
        """Block k of the stack (config key model.flow.blocks): affine, mix1 or mixd; directions alternate."""
        common = dict(d=cfg.d, seq_len=seq_len, width=cfg.width, depth=spec["layers"], heads=cfg.heads,
                      reverse=k % 2 == 1, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)
        if spec["type"] == "affine":
            return AffineBlock(clip=cfg.clip, **common)
        if spec["type"] == "mix1":
            return Mix1Block(components=spec["components"], **common)
        if spec["type"] == "mixd":
            if k != 0:
                raise ConfigError(f"config key model.flow.blocks: a 'mixd' block may only be the first block; "
                                  f"found at block {k}")
            return MixdBlock(self.codebook, **common)
        raise ConfigError(f"config key model.flow.blocks: block type {spec['type']!r} is not one of affine, "
                          "mix1, mixd")

    def frozen_parameters(self, step: int) -> list[nn.Parameter]:
        """The parameters that progressive freezing (config key model.flow.freeze_schedule) holds fixed at this
        training step: block k from step freeze_schedule[k] on, the codebook with block 0. The trainer drops
        their gradients after each backward (so they get no update, momentum or weight decay)."""
        frozen = []
        for k, start in enumerate(self.freeze_schedule):
            if step >= start:
                frozen += list(self.blocks[k].parameters())
                if k == 0:
                    frozen += list(self.codebook.parameters())
        return frozen

    # ---- the flow f: u -> z and its exact inverse -------------------------------------------------------
    def flow(self, u: Tensor) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """z = f(u), log|det df/du| (B,), the latents [u = v_0, v_1, ..., v_K = z] and each block's hidden states."""
        logdet = torch.zeros(u.shape[0], device=u.device)
        latents, hidden = [u], []
        v = u
        for block in self.blocks:
            v, ld, h = block(v)
            logdet = logdet + ld
            latents.append(v)
            hidden.append(h)
        return v, logdet, latents, hidden

    @torch.no_grad()
    def inverse(self, z: Tensor, use_cache: bool = True) -> Tensor:
        """u = f^{-1}(z): blocks in reverse order, each one position at a time."""
        v = z.float()
        for block in reversed(self.blocks):
            v = block.inverse(v, use_cache=use_cache)
        return v

    @torch.no_grad()
    def inverse_jacobi(self, z: Tensor, tol: float = 1e-4, max_sweeps: int | None = None) -> tuple[Tensor, list[int]]:
        """u = f^{-1}(z) with Jacobi sweeps in each block (see CausalFlowBlock.inverse_jacobi): exact after T
        sweeps per block. Returns u and the sweeps each block made, in the order they ran (block K first)."""
        v, sweeps = z.float(), []
        for block in reversed(self.blocks):
            v, s = block.inverse_jacobi(v, tol=tol, max_sweeps=max_sweeps)
            sweeps.append(s)
        return v, sweeps

    # ---- the objective ----------------------------------------------------------------------------------
    def draw_u(self, x: Tensor, generator: torch.Generator | None = None, noise: BatchNoise | None = None,
               deterministic: bool = False) -> tuple[Tensor, Tensor]:
        """u ~ q(.|x) and log q(u|x) per position, (B, T, d) and (B, T); u = mu_x when deterministic. The noise
        comes from `noise` (the trainer's, see nn/noise.py), else `generator`."""
        if deterministic:
            eps = torch.zeros(*x.shape, self.d, device=x.device)
        elif noise is not None:
            eps = noise.randn(x.shape[0], x.shape[1], self.d, device=x.device)
        else:
            eps = torch.randn(*x.shape, self.d, device=x.device, generator=generator)
        return self.codebook.sample(x, eps)

    def elbo_terms(self, x: Tensor, generator: torch.Generator | None = None,
                   noise: BatchNoise | None = None) -> dict[str, Tensor]:
        """The ELBO's terms in nats per sequence (B,), with `neg_elbo` their sum, and the latents. The noise
        of u ~ q(.|x) comes from `noise` (the trainer's, see nn/noise.py), else `generator`."""
        u, log_q = self.draw_u(x, generator, noise)
        z, logdet, latents, _ = self.flow(u)
        decoder = -self.codebook.log_posterior(u).gather(-1, x.unsqueeze(-1)).squeeze(-1).sum(-1)
        prior = 0.5 * (z ** 2).sum(dim=(1, 2)) + 0.5 * z.shape[1] * self.d * LOG_2PI
        entropy = -log_q.sum(-1)
        neg_elbo = decoder + prior - logdet - entropy
        return {"neg_elbo": neg_elbo, "decoder": decoder, "prior": prior, "logdet": logdet,
                "entropy": entropy, "latents": latents}

    def displacement(self, latents: list[Tensor]) -> Tensor:
        """The transport penalty's displacement per token (summed over dimensions, averaged over tokens)."""
        if self.transport.kind == "blocks":
            return sum(((b - a) ** 2).sum(-1).mean() for a, b in zip(latents, latents[1:]))
        return ((latents[-1] - latents[0]) ** 2).sum(-1).mean()

    def loss(self, x: Tensor, noise: BatchNoise | None = None) -> tuple[Tensor, dict[str, float]]:
        """Training loss: the negative ELBO in bits per token, plus the transport penalty when its weight is > 0;
        metrics hold each ELBO term and the bound (bits per token), and the transport terms."""
        terms = self.elbo_terms(x, noise=noise)
        per_token = x.shape[0] * x.shape[1] * LN2
        metrics = {k: terms[k].detach().sum() / per_token for k in ("decoder", "prior", "logdet", "entropy")}
        latents = terms["latents"]
        for k, v in enumerate(latents[1:], start=1):
            metrics[f"z2_block{k}"] = (v.detach() ** 2).mean()
        bound = terms["neg_elbo"].sum() / per_token
        transport = self.displacement(latents)
        metrics.update(bound=bound.detach(), transport=transport.detach(),
                       displacement=((latents[-1] - latents[0]).detach() ** 2).mean())
        loss = bound + self.transport.weight * transport if self.transport.weight > 0 else bound
        return loss, metrics

    forward = loss  # the trainer (and DDP) call model(x)

    @torch.no_grad()
    def nll(self, x: Tensor, samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """An upper bound on -log p(x) in nats per sequence (B,): the ELBO, or with samples > 1 the
        importance-weighted bound -log (1/S) sum_s exp(ELBO_s)."""
        bounds = torch.stack([self.elbo_terms(x, generator)["neg_elbo"] for _ in range(samples)])
        return -(torch.logsumexp(-bounds, dim=0) - math.log(samples))

    # ---- encode, decode, sample -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """z = f(u) with u = mu_x (default) or u ~ q(.|x)."""
        return self.flow(self.draw_u(x, generator, deterministic=not sample)[0])[0]

    @torch.no_grad()
    def decode(self, z: Tensor, use_cache: bool = True) -> Tensor:
        """Tokens from latents: the exact inverse, then the tied decoder's argmax."""
        return self.codebook.decode(self.inverse(z, use_cache=use_cache))

    def prior_sample(self, n: int, seq_len: int | None = None, tau: float = 1.0,
                     generator: torch.Generator | None = None) -> Tensor:
        """z ~ N(0, tau^2 I): (n, seq_len, d)."""
        device = self.codebook.mu.device
        return tau * torch.randn(n, seq_len or self.seq_len, self.d, device=device, generator=generator)

    @torch.no_grad()
    def sample(self, n: int, seq_len: int | None = None, tau: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """z ~ N(0, tau^2 I) -> exact inverse -> decode."""
        return self.decode(self.prior_sample(n, seq_len, tau, generator))
