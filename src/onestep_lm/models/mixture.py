"""Mixture-CDF transforms: the scalar maps of the Mix-1 and Mix-d flow blocks (issue #7; blocks: mixture_blocks.py).

A scalar v is sent through the CDF of a 1-D Gaussian mixture, then through the inverse normal CDF:
    F(v) = sum_k w_k Phi((v - m_k) / s_k),      y = Phi^{-1}(F(v)),
    log|dy/dv| = log f(v) - log N(y; 0, 1),     f(v) = sum_k w_k N(v; m_k, s_k^2).
Everything runs in float32 and in log space: log F = logsumexp_k(log w_k + log Phi(z_k)) and the survival
function log(1 - F) = logsumexp_k(log w_k + log Phi(-z_k)) (torch.special.log_ndtr), so both tails keep their
relative precision. y is computed from the SMALLER tail, y = Phi^{-1}(F) when F < 1/2 and y = -Phi^{-1}(1 - F)
otherwise, so the upper tail is as accurate as the lower one; no NaN for any finite v (|v| = 1e4 included).

The clamp. The smaller tail probability p = min(F, 1 - F) is clamped to p >= DELTA = 1e-20 before Phi^{-1}, so
|y| <= Z_MAX = Phi^{-1}(1 - DELTA) = 9.26 (float32 represents p down to 1e-38, so the clamp is a choice, not a
necessity: it keeps y within the range where later blocks were trained). In the clamped region (mixture mass
at most DELTA per tail) the map is constant, its gradient is zero, and the log-det keeps the formula above with
the clamped y. The bound's effect is then bounded: the density the flow computes integrates to at most
    1 + (DELTA / phi(Z_MAX)) * (q(Z_MAX) + q(-Z_MAX))  <=  1 + (q(Z_MAX) + q(-Z_MAX)) / Z_MAX
per clamped scalar, where q is the density the later blocks and the prior give to y there; when the block is
the last one (q = N(0, 1)) the lost tail mass 2 * DELTA and the added mass cancel exactly, and the computed
density is exactly normalised. Points reach the clamp with model probability <= 2 * DELTA per scalar.

The inverse. Given y and the mixture, v solves Phi^{-1}(F(v)) = y, vectorised over all entries. The root is
kept in a bracket, initially [min_k(m_k - c s_k), max_k(m_k + c s_k)] with c = Z_MAX + 1 (F at the ends is
beyond the clamp, so the root of any |y| <= Z_MAX lies inside; a |y| beyond the clamp goes to the bracket end).
Two levels of a 16-point grid search (one vectorised evaluation each) narrow the bracket 256-fold; then
safeguarded Newton starts from the linear interpolation inside the remaining cell. Each Newton step evaluates
the forward map y(v) and its slope exp(log f(v) - log N(y)), shrinks the bracket to the side holding the root,
and moves to the Newton point, or to the bracket's midpoint (a bisection step) when the Newton point is not
finite, leaves the bracket or the step is not half the previous one (the rule of Numerical Recipes' rtsafe).
It stops when every entry's last step or bracket is below `tol` (default 1e-6, absolute), or after max_iter =
60 steps; then |v - v*| <= tol (Newton converges quadratically near the root), up to float32 resolution, for
the float32 root v* of the same forward function that training uses: typically 2 or 3 steps after the grid.
The error in y is amplified by 1 / (dy/dv) = phi(y) / f(v): where the mixture puts almost no density (between
tight, well-separated components) the round trip inverse(forward(v)) is only as accurate as float32 allows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DELTA = 1e-20  # the tail-probability clamp: min(F, 1 - F) >= DELTA
LOG_DELTA = math.log(DELTA)
Z_MAX = 9.262340089798409  # Phi^{-1}(1 - DELTA): the largest |y| a mixture transform produces
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def log_normal(x: Tensor) -> Tensor:
    """log N(x; 0, 1)."""
    return -0.5 * x * x - HALF_LOG_2PI


class _NdtriExp(torch.autograd.Function):
    """y = Phi^{-1}(exp(lp)) for lp <= log(1/2), clamped to lp >= LOG_DELTA, with the stable gradient
    dy/dlp = exp(lp - log N(y; 0, 1)) (zero inside the clamp)."""

    @staticmethod
    def forward(ctx, lp: Tensor) -> Tensor:
        inside = lp >= LOG_DELTA
        y = torch.special.ndtri(torch.exp(lp.clamp_min(LOG_DELTA)))
        ctx.save_for_backward(lp, y, inside)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        lp, y, inside = ctx.saved_tensors
        return torch.where(inside, grad * torch.exp(lp.clamp_min(LOG_DELTA) - log_normal(y)), 0.0)


def _standardise(v: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    return (v.unsqueeze(-1) - mean) * torch.exp(-log_scale)


def mixture_log_cdf_sf(v: Tensor, logw: Tensor, mean: Tensor, log_scale: Tensor,
                       z: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """log F(v) and log(1 - F(v)) of the mixture: v (...), logw/mean/log_scale (..., M) (broadcast), logw
    normalised over the last axis."""
    z = _standardise(v, mean, log_scale) if z is None else z
    return (torch.logsumexp(logw + torch.special.log_ndtr(z), dim=-1),
            torch.logsumexp(logw + torch.special.log_ndtr(-z), dim=-1))


def mixture_log_pdf(v: Tensor, logw: Tensor, mean: Tensor, log_scale: Tensor, z: Tensor | None = None) -> Tensor:
    """log f(v) of the mixture (same shapes as mixture_log_cdf_sf)."""
    z = _standardise(v, mean, log_scale) if z is None else z
    return torch.logsumexp(logw + log_normal(z) - log_scale, dim=-1)


def gaussianize_from_log_cdf(log_cdf: Tensor, log_sf: Tensor) -> Tensor:
    """y = Phi^{-1}(F) from log F and log(1 - F), through the smaller tail, with the DELTA clamp."""
    lower = log_cdf <= log_sf
    z = _NdtriExp.apply(torch.minimum(log_cdf, log_sf))  # <= 0
    return torch.where(lower, z, -z)


def mixture_gaussianize(v: Tensor, logw: Tensor, mean: Tensor, log_scale: Tensor,
                        with_logdet: bool = True) -> tuple[Tensor, Tensor | None]:
    """y = Phi^{-1}(F_mix(v)) and log|dy/dv| = log f(v) - log N(y; 0, 1), elementwise over v (...), in float32
    (the caller disables autocast). Mixture parameters (..., M), broadcast against v."""
    z = _standardise(v, mean, log_scale)
    y = gaussianize_from_log_cdf(*mixture_log_cdf_sf(v, logw, mean, log_scale, z))
    if not with_logdet:
        return y, None
    return y, mixture_log_pdf(v, logw, mean, log_scale, z) - log_normal(y)


@torch.no_grad()
def mixture_invert(y: Tensor, logw: Tensor, mean: Tensor, log_scale: Tensor, tol: float = 1e-6,
                   max_iter: int = 60, grid: int = 16, grid_levels: int = 2) -> Tensor:
    """v with Phi^{-1}(F_mix(v)) = y: a grid search narrows the bracket, then safeguarded Newton (see the
    module docstring for the bracket and the tolerance). y (...), mixture parameters (..., M) broadcast against
    y; all entries are solved at once."""
    y = y.float()
    logw, mean, log_scale = (p.float() for p in torch.broadcast_tensors(logw, mean, log_scale))
    shape = torch.broadcast_shapes(y.shape, logw.shape[:-1])
    y = y.expand(shape)
    spread = (Z_MAX + 1.0) * torch.exp(log_scale)
    lo = (mean - spread).amin(-1).expand(shape)
    hi = (mean + spread).amax(-1).expand(shape)
    g_lo, g_hi = torch.full_like(lo, -Z_MAX), torch.full_like(hi, Z_MAX)
    frac = torch.linspace(0, 1, grid + 1, device=y.device)
    params = (logw.unsqueeze(-2), mean.unsqueeze(-2), log_scale.unsqueeze(-2))
    for _ in range(grid_levels):  # each level cuts the bracket into `grid` cells and keeps the root's
        points = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * frac
        g = mixture_gaussianize(points, *params, with_logdet=False)[0]
        i = (g < y.unsqueeze(-1)).sum(-1, keepdim=True).clamp(1, grid)
        lo, hi = points.gather(-1, i - 1).squeeze(-1), points.gather(-1, i).squeeze(-1)
        g_lo, g_hi = g.gather(-1, i - 1).squeeze(-1), g.gather(-1, i).squeeze(-1)
    share = ((y - g_lo) / (g_hi - g_lo)).nan_to_num(0.5).clamp(0, 1)  # start by interpolating in the cell
    v = lo + share * (hi - lo)
    last = torch.full_like(v, float("inf"))  # the previous step's size
    for _ in range(max_iter):
        g, log_slope = mixture_gaussianize(v, logw, mean, log_scale)
        below = g < y
        lo = torch.where(below, v, lo)
        hi = torch.where(below, hi, v)
        nxt = v - (g - y) * torch.exp(-log_slope)
        newton = torch.isfinite(nxt) & (nxt >= lo) & (nxt <= hi) & ((nxt - v).abs() <= 0.5 * last)
        nxt = torch.where(newton, nxt, 0.5 * (lo + hi))
        last = (nxt - v).abs()
        v = nxt
        if bool(((last <= tol) | (hi - lo <= tol)).all()):
            break
    return v
