"""Stage B: the one-step generator. With the flow frozen, G learns z -> x in one bidirectional pass.

For a training x: u ~ q(.|x) (fresh noise at every visit; or u = mu_x with deterministic_u), z = f(u), and
    L_rec   = cross-entropy(G(z), x)
    L_align = sum over pairs (l, j) of || P_j(g_l) - stopgrad(normalise(target_j)) ||^2   (mean over positions)
    L       = L_rec + lambda * L_align
where target_j is either the state the exact inverse reaches after j blocks, v_{K-j} (align_target=latents),
or the hidden states of flow block K-j+1 (align_target=hidden): generator layers are paired with flow blocks
in reverse order, since G runs z -> x and the flow u -> z. Sampling: z ~ N(0, tau^2 I), logits = G(z), tokens
= argmax or a float64 draw.

Prior pairs (config key model.generator.prior, issue #8). Encoded text covers the region of z-space that
f(u(x)) reaches, which is not exactly N(0, I), and G is sampled on N(0, I). So a share `fraction` of every batch's
rows can be prior pairs instead: u* = f^{-1}(z) for z ~ N(0, tau^2 I), with target x* = decode(u*), the teacher's
own sample. They come from a pool of `pool` pairs, refilled by the exact inverse (sequential, or Jacobi sweeps)
every `refresh_every` training steps (the trainer calls before_step). The pool stores u*, so a prior row goes
through the flow like a data row (z = f(u*), which recovers z up to the inverse's tolerance, and the alignment
targets along the way). The pool of refill r is drawn from a generator seeded by (train.seed, r) alone: every
process builds the same pool, and a resumed run rebuilds the one it had. Prior rows are the rows of the global
batch with index < round(fraction * batch), each with a pool entry drawn from the step's noise; evaluation
(model.eval()) uses data pairs only.

The flow is a frozen submodule: it is left out of the generator's state_dict (checkpoints hold G alone), and
the run records which flow it stands on by path and weight hash.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import GeneratorConfig
from ..nn.draws import categorical
from ..nn.noise import BatchNoise
from ..nn.transformer import Transformer, init_weights
from .flow_lm import FlowLM

LN2 = math.log(2)


class OneStepGenerator(nn.Module):
    kind = "generator"
    bound = False

    def __init__(self, flow: FlowLM, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.flow = flow.requires_grad_(False).eval()
        self.vocab_size, self.seq_len, self.d = flow.vocab_size, flow.seq_len, flow.d
        K = len(flow.blocks)
        self.inp = nn.Linear(self.d, cfg.width)
        self.net = Transformer(cfg.width, cfg.depth, cfg.heads, self.seq_len, causal=False,
                               mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, positions=cfg.positions)
        self.head = nn.Linear(cfg.width, self.vocab_size)
        self.pairs = cfg.pairs(K) if cfg.align_lambda > 0 else []
        target_dim = self.d if cfg.align_target == "latents" else flow.blocks[0].inp.out_features
        self.align = nn.ModuleList(nn.Linear(cfg.width, target_dim) for _ in self.pairs)
        for module in (self.inp, self.net, self.head, self.align):  # not the frozen flow
            init_weights(module)
        self._pool: tuple[Tensor, Tensor] | None = None  # prior pairs (u*, x*), rebuilt from (seed, refill)
        self._pool_refill: int | None = None

    # ---- the frozen flow is not part of the generator's weights -------------------------------------------
    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("flow.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        full = {**{f"flow.{k}": v for k, v in self.flow.state_dict().items()}, **state_dict}
        return super().load_state_dict(full, strict=strict, assign=assign)

    def train(self, mode: bool = True):
        super().train(mode)
        self.flow.eval()
        return self

    # ---- G ------------------------------------------------------------------------------------------------
    def logits(self, z: Tensor, hidden: bool = False):
        """G(z): (B, T, V) logits (and every layer's states when hidden=True)."""
        out = self.net(self.inp(z.to(self.inp.weight.dtype)), hidden=hidden)
        h, states = out if hidden else (out, None)
        logits = self.head(h).float()
        return (logits, states) if hidden else logits

    @torch.no_grad()
    def encode(self, x: Tensor, deterministic: bool = False, generator: torch.Generator | None = None,
               noise: BatchNoise | None = None):
        """z = f(u) for text x, with the flow's latents and block hidden states (the alignment targets). The
        noise of u comes from `noise` (the trainer's, see nn/noise.py), else `generator`."""
        z, _, latents, hidden = self.flow.flow(self.flow.draw_u(x, generator, noise, deterministic)[0])
        return z, latents, hidden

    # ---- prior pairs --------------------------------------------------------------------------------------
    @torch.no_grad()
    def prior_pairs(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n prior pairs: u* = f^{-1}(z), z ~ N(0, tau^2 I), and x* = decode(u*), inverted 256 at a time."""
        p, us = self.cfg.prior, []
        for start in range(0, n, 256):
            z = self.flow.prior_sample(min(256, n - start), tau=p.tau, generator=generator)
            us.append(self.flow.inverse_jacobi(z, p.tol, p.max_sweeps)[0] if p.inverse == "jacobi"
                      else self.flow.inverse(z))
        u = torch.cat(us)
        return u, self.flow.codebook.decode(u)

    def before_step(self, step: int, seed: int) -> None:
        """Called by the trainer before every training step: refill the prior-pair pool when it is due."""
        p = self.cfg.prior
        if p.fraction <= 0:
            return
        refill = step // p.refresh_every
        if refill != self._pool_refill:
            generator = torch.Generator(device=self.head.weight.device).manual_seed(seed * 1_000_003 + refill)
            self._pool = self.prior_pairs(p.pool, generator)
            self._pool_refill = refill

    def _mix_prior(self, x: Tensor, u: Tensor, noise: BatchNoise | None) -> tuple[Tensor, Tensor, Tensor]:
        """Replace the prior rows of the batch by pool pairs: (u, targets, mask of the prior rows (B,))."""
        rows = x.shape[0]
        if noise is not None:
            index, total = noise.index(rows, device=x.device)
            draw = noise.shared_rand(total, device=x.device)[index]
        else:
            index, total = torch.arange(rows, device=x.device), rows
            draw = torch.rand(rows, device=x.device)
        prior = index < round(self.cfg.prior.fraction * total)
        pool_u, pool_x = self._pool
        pick = (draw * pool_u.shape[0]).long().clamp_max(pool_u.shape[0] - 1)
        u = torch.where(prior[:, None, None], pool_u[pick].to(u.dtype), u)
        return u, torch.where(prior[:, None], pool_x[pick], x), prior

    def loss(self, x: Tensor, noise: BatchNoise | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        use_prior = self.training and self.cfg.prior.fraction > 0
        if use_prior and self._pool is None:
            raise RuntimeError("prior pairs are on (model.generator.prior.fraction > 0) but the pool is empty: "
                               "call before_step(step, seed) first (the trainer does)")
        u = self.flow.draw_u(x, noise=noise, deterministic=self.cfg.deterministic_u)[0]
        target, prior = x, None
        if use_prior:
            u, target, prior = self._mix_prior(x, u, noise)
        with torch.no_grad():  # the flow is frozen
            z, _, latents, flow_hidden = self.flow.flow(u)
        logits, states = self.logits(z, hidden=True)
        ce = F.cross_entropy(logits.reshape(-1, self.vocab_size), target.reshape(-1)) / LN2
        hits = (logits.argmax(-1) == target).float().detach()
        metrics = {"ce_bits": ce.detach(), "accuracy": hits.mean()}
        if prior is not None:
            metrics["prior_accuracy"] = hits[prior].mean() if prior.any() else torch.zeros(())
            metrics["data_accuracy"] = hits[~prior].mean() if (~prior).any() else torch.zeros(())
        loss = ce
        if self.pairs:
            align = self.alignment_loss(states, latents, flow_hidden)
            metrics["align"] = align.detach()
            loss = ce + self.cfg.align_lambda * align
        return loss, metrics

    forward = loss

    def alignment_loss(self, states: list[Tensor], latents: list[Tensor], flow_hidden: list[Tensor]) -> Tensor:
        K = len(latents) - 1
        total = torch.zeros((), device=states[0].device)
        for proj, (layer, j) in zip(self.align, self.pairs):
            target = latents[K - j] if self.cfg.align_target == "latents" else flow_hidden[K - j]
            target = F.layer_norm(target.float(), target.shape[-1:]).detach()
            total = total + ((proj(states[layer - 1]).float() - target) ** 2).mean()
        return total / len(self.pairs)

    # ---- sampling and metrics -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, seq_len: int | None = None, tau: float = 1.0, temperature: float = 0.0,
               generator: torch.Generator | None = None) -> Tensor:
        """One forward pass: z ~ N(0, tau^2 I), tokens = argmax G(z) (temperature 0) or a float64 draw."""
        device = self.head.weight.device
        z = tau * torch.randn(n, seq_len or self.seq_len, self.d, device=device, generator=generator)
        return categorical(self.logits(z), temperature, generator)

    @torch.no_grad()
    def teacher_agreement(self, n: int, generator: torch.Generator | None = None,
                          batch_size: int = 256) -> tuple[float, Tensor]:
        """On z ~ N(0, I): mean agreement of argmax G(z) with the exact inverse's decoding, and the agreement
        at each position (T,)."""
        device = self.head.weight.device
        hits = torch.zeros(self.seq_len, dtype=torch.float64)
        for start in range(0, n, batch_size):
            z = torch.randn(min(batch_size, n - start), self.seq_len, self.d, device=device, generator=generator)
            teacher = self.flow.decode(z)
            hits += (self.logits(z).argmax(-1) == teacher).double().sum(0).cpu()
        by_position = hits / n
        return by_position.mean().item(), by_position
