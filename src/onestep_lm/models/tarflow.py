"""TarFlow blocks: transformer autoregressive affine flows (METHOD.md, Stage A).

Block k reads its input v (B, T, d) in its own order (left-to-right, or right-to-left when `reverse`). A causal
transformer fed [start, v_0, ..., v_{T-2}] gives, for every position t, a log-scale a_t and a shift b_t from the
positions before t only (the learned start token means position 0 is transformed too):
    y_t = (v_t - b_t) * exp(-a_t),       log|det| = - sum_t sum_i a_{t,i}
The inverse is exact and sequential, v_t = y_t * exp(a_t) + b_t, one position at a time; a KV cache makes each
step one token's worth of work. The Jacobi inverse solves the same equations by parallel fixed-point sweeps,
v <- y * exp(a(v)) + b(v) at every position at once; after sweep s the first s positions (in block order) are
exact, so T sweeps give the exact inverse, and a block near the identity converges in a few. The output head is
zero-initialised (every block starts as the identity), the log-scale is soft-clipped, a = clip * tanh(a_raw /
clip), and the affine step and log-det run in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.transformer import KVCache, Transformer, init_weights


class CausalFlowBlock(nn.Module):
    """What every flow block shares: a causal transformer over [start, v_0, ..., v_{T-2}] in the block's order,
    giving each position t a state h_t from the positions before t; the teacher-forced forward pass; and the
    exact sequential inverse with a KV cache. A block type supplies
        _transform(w, h) -> (y, log|det| (B,))        the map of a whole sequence, in block order, float32
        _invert_position(y_t, h_t) -> v_t              its inverse given the states, elementwise over any
                                                       leading axes (one position, or all of them at once)
    """

    def __init__(self, d: int, seq_len: int, width: int, depth: int, heads: int, reverse: bool,
                 mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.d, self.reverse, self.width = d, reverse, width
        self.inp = nn.Linear(d, width)
        self.start = nn.Parameter(torch.randn(width) * 0.02)
        self.net = Transformer(width, depth, heads, seq_len, causal=True, mlp_ratio=mlp_ratio, dropout=dropout)

    def _in_order(self, v: Tensor) -> Tensor:
        return v.flip(1) if self.reverse else v

    def _states(self, w: Tensor) -> Tensor:
        """The state h_t of every position from [start, w_0, ..., w_{T-2}] (block order): (B, T, width)."""
        start = self.start.to(w.dtype).expand(w.shape[0], 1, -1)
        return self.net(torch.cat([start, self.inp(w[:, :-1])], dim=1))

    def forward(self, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """y = f_k(v), its log|det| per sequence (B,), and the transformer's hidden states (B, T, width), all in
        the natural position order (the state at t is computed from the positions before t in block order)."""
        w = self._in_order(v)
        h = self._states(w)
        y, logdet = self._transform(w, h)
        return self._in_order(y), logdet, self._in_order(h)

    @torch.no_grad()
    def inverse(self, y: Tensor, use_cache: bool = True) -> Tensor:
        """v = f_k^{-1}(y), position by position in the block's order."""
        w_y = self._in_order(y).float()
        B, T, _ = w_y.shape
        w = torch.empty_like(w_y)
        h_in = self.start.expand(B, 1, -1).to(w_y.dtype)
        cache = KVCache() if use_cache else None
        for t in range(T):
            if use_cache:
                h = self.net(h_in, start=t, cache=cache)[:, -1]
            else:  # recompute the whole prefix: the reference the cached path is tested against
                prefix = torch.cat([h_in, self.inp(w[:, :t])], dim=1) if t else h_in
                h = self.net(prefix)[:, -1]
            w[:, t] = self._invert_position(w_y[:, t], h)
            if use_cache:
                h_in = self.inp(w[:, t:t + 1])
        return self._in_order(w)

    @torch.no_grad()
    def inverse_jacobi(self, y: Tensor, tol: float = 1e-4, max_sweeps: int | None = None,
                       init: Tensor | None = None) -> tuple[Tensor, int]:
        """v = f_k^{-1}(y) by Jacobi sweeps: every position is inverted at once given the states computed from the
        previous sweep's v. Stops when no entry moved by more than `tol`, or after `max_sweeps` (default, and at
        most, T: the inverse is then exact up to float error). Starts from `init` (default y). Returns v and the
        number of sweeps made."""
        w_y = self._in_order(y).float()
        T = w_y.shape[1]
        max_sweeps = T if max_sweeps is None else min(max_sweeps, T)
        w = (w_y if init is None else self._in_order(init).float()).clone()
        sweeps = 0
        while sweeps < max_sweeps:
            new = self._invert_position(w_y, self._states(w))
            moved = (new - w).abs().max().item()
            w, sweeps = new, sweeps + 1
            if moved <= tol:
                break
        return self._in_order(w), sweeps


class AffineBlock(CausalFlowBlock):
    def __init__(self, d: int, seq_len: int, width: int, depth: int, heads: int, reverse: bool,
                 clip: float = 3.0, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__(d, seq_len, width, depth, heads, reverse, mlp_ratio, dropout)
        self.clip = clip
        self.head = nn.Linear(width, 2 * d)
        init_weights(self)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _scale_shift(self, h: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.head(h).float().chunk(2, dim=-1)
        return self.clip * torch.tanh(a / self.clip), b

    def _transform(self, w: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self._scale_shift(h)
        return (w.float() - b) * torch.exp(-a), -a.sum(dim=(1, 2))

    def _invert_position(self, y_t: Tensor, h_t: Tensor) -> Tensor:
        a, b = self._scale_shift(h_t)
        return y_t * torch.exp(a) + b
