"""The autoregressive baseline: a causal transformer trained by next-token cross-entropy.

    log p(x) = sum_{t=0}^{T-1} log p_theta(x_t | x_{<t})

Every token is scored, the first included: the input at position 0 is a learned BOS vector (not a vocabulary
token), so the transformer reads [BOS, x_0, ..., x_{T-2}] and position t predicts x_t. `nll` is exact: the sum
of the T next-token cross-entropies, in nats per sequence.

The output head is untied from the token embedding (a plain Linear(width, V)): the input and output geometries
are free to differ, which costs V * width parameters and nothing else at these sizes.

Sampling is token by token with a key/value cache (one position's work per step); `use_cache=False`
recomputes the whole prefix at every step (the reference). Draws are made in float64 by
`onestep_lm.sampling.categorical`, after optional top-k / top-p filtering of the tempered logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BackboneConfig
from ..nn.draws import categorical
from ..nn.transformer import KVCache, Transformer, init_weights

LN2 = math.log(2)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top k, then every one outside the nucleus: the smallest set of the
    most probable tokens whose probability reaches top_p (the most probable token is always kept)."""
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = torch.softmax(sorted_logits.double(), dim=-1)
        mass_before = p.cumsum(-1) - p  # probability of the tokens ranked strictly above each one
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class ARLM(nn.Module):
    kind = "ar"
    bound = False  # nll() is the exact negative log-likelihood

    def __init__(self, vocab_size: int, seq_len: int, cfg: BackboneConfig):
        super().__init__()
        self.vocab_size, self.seq_len, self.width = vocab_size, seq_len, cfg.width
        self.embed = nn.Embedding(vocab_size, cfg.width)
        self.bos = nn.Parameter(torch.zeros(cfg.width))
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, seq_len, causal=True,
                                       mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)
        self.head = nn.Linear(cfg.width, vocab_size)
        init_weights(self)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.bos, std=0.02)

    # ---- the conditional p(x_t | x_{<t}) ------------------------------------------------------------------
    def inputs(self, x: Tensor) -> Tensor:
        """The embedded input [BOS, x_0, ..., x_{T-2}] (B, T, width): position t sees x_{<t} only."""
        bos = self.bos.expand(x.shape[0], 1, self.width)
        return torch.cat([bos, self.embed(x[:, :-1])], dim=1)

    def logits(self, x: Tensor) -> Tensor:
        """logits[:, t] = log p_theta(. | x_{<t}) up to a constant, for t = 0..T-1 (B, T, V)."""
        return self.head(self.transformer(self.inputs(x)))

    def token_nll(self, x: Tensor) -> Tensor:
        """-log p_theta(x_t | x_{<t}) in nats (B, T), computed in float32 whatever the autocast."""
        return F.cross_entropy(self.logits(x).float().transpose(1, 2), x, reduction="none")

    @torch.no_grad()
    def next_token_logits(self, prefix: Tensor) -> Tensor:
        """Logits (B, V) of the token after `prefix` (B, t), t >= 0, recomputing the whole prefix."""
        h = self.transformer(torch.cat([self.bos.expand(prefix.shape[0], 1, self.width),
                                        self.embed(prefix)], dim=1))
        return self.head(h[:, -1])

    # ---- the objective ----------------------------------------------------------------------------------
    def loss(self, x: Tensor, noise=None) -> tuple[Tensor, dict[str, Tensor]]:
        """Training loss: the mean next-token cross-entropy in bits per token; metrics: top-1 accuracy.
        `noise` (the trainer's BatchNoise) is unused: the AR loss has no noise."""
        logits = self.logits(x).float()
        nats = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")
        loss = nats.sum() / (x.numel() * LN2)
        return loss, {"accuracy": (logits.detach().argmax(-1) == x).float().mean()}

    forward = loss  # the trainer (and DDP) call model(x)

    @torch.no_grad()
    def nll(self, x: Tensor, samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """The exact -log p(x) in nats per sequence (B,); `samples` and `generator` are unused (no noise)."""
        return self.token_nll(x).sum(-1)

    # ---- sampling ---------------------------------------------------------------------------------------
    @staticmethod
    def pick(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """A token per row of logits (..., V): argmax at temperature 0, else a float64 draw from
        softmax(filter(logits / temperature))."""
        if temperature == 0:
            return categorical(logits, 0.0)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        return categorical(filter_logits(logits.double() / temperature, top_k, top_p), 1.0, generator)

    @torch.no_grad()
    def sample(self, n: int, seq_len: int | None = None, generator: torch.Generator | None = None,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               use_cache: bool = True, return_logits: bool = False):
        """n sequences (n, seq_len), token by token. With use_cache, each step runs the transformer on the one
        new position against the cached keys and values; without, on the whole prefix. With return_logits,
        also the logits each token was drawn from (n, seq_len, V)."""
        T = seq_len or self.seq_len
        if T > self.seq_len:
            raise ValueError(f"seq_len {T} is longer than the model's {self.seq_len}")
        x = torch.zeros(n, T, dtype=torch.long, device=self.bos.device)
        steps = []
        cache = KVCache() if use_cache else None
        if use_cache:
            h = self.transformer(self.bos.expand(n, 1, self.width), start=0, cache=cache)
        for t in range(T):
            logits_t = self.head(h[:, -1]) if use_cache else self.next_token_logits(x[:, :t])
            x[:, t] = self.pick(logits_t, temperature, top_k, top_p, generator)
            steps.append(logits_t)
            if use_cache and t + 1 < T:  # x_t sits at position t + 1 (the BOS holds position 0)
                h = self.transformer(self.embed(x[:, t:t + 1]), start=t + 1, cache=cache)
        return (x, torch.stack(steps, dim=1)) if return_logits else x
