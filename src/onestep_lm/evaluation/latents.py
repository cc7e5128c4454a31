"""Statistics of encoded text in latent space: do held-out z = f(u(x)) look like N(0, I)?

If they do not (a shifted mean, a smaller spread, heavy tails), a generator trained on encoded text is
sampled at z ~ N(0, I) in a region where it never trained (METHOD.md, Stage A and "Prior pairs").
"""

from __future__ import annotations

import math

import torch

from ..data import eval_windows

NORMAL_REFERENCE = {"mean": 0.0, "std": 1.0, "excess_kurtosis": 0.0,
                    "frac_beyond_3sigma": math.erfc(3 / math.sqrt(2))}


@torch.no_grad()
def encoded_latents(flow, tokens, seq_len: int, batch_size: int, max_windows: int = 512, seed: int = 0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """z = f(u) with u ~ q(.|x) for up to `max_windows` full evaluation windows: (N, T, d)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    out, n = [], 0
    for x in eval_windows(tokens, seq_len, batch_size):
        if x.shape[1] != seq_len or n >= max_windows:
            break
        x = x[: max_windows - n].to(device)
        out.append(flow.encode(x, sample=True, generator=generator).cpu())
        n += len(x)
    return torch.cat(out)


def latent_stats(z: torch.Tensor) -> dict:
    """Mean, std, excess kurtosis and the fraction beyond 3 sigma of all coordinates, and the spread of the
    per-dimension means and stds; beside the same figures for N(0, 1)."""
    flat = z.double().reshape(-1)
    mean, std = flat.mean(), flat.std()
    kurt = (((flat - mean) / std) ** 4).mean() - 3
    per_dim = z.double().reshape(-1, z.shape[-1])
    return {
        "mean": mean.item(), "std": std.item(), "excess_kurtosis": kurt.item(),
        "frac_beyond_3sigma": (flat.abs() > 3).double().mean().item(),
        "max_abs_dim_mean": per_dim.mean(0).abs().max().item(),
        "min_dim_std": per_dim.std(0).min().item(), "max_dim_std": per_dim.std(0).max().item(),
        "coordinates": flat.numel(), "normal_reference": dict(NORMAL_REFERENCE),
    }


@torch.no_grad()
def transport_stats(flow, tokens, seq_len: int, batch_size: int, max_windows: int = 512, seed: int = 0,
                    device: torch.device | str = "cpu") -> dict:
    """How far the flow moves held-out text (u ~ q(.|x)): the mean (z - u)^2 per coordinate, and each block's own
    mean (v_k - v_{k-1})^2 per coordinate, over up to `max_windows` evaluation windows."""
    generator = torch.Generator(device=device).manual_seed(seed)
    end, blocks, n = 0.0, None, 0
    for x in eval_windows(tokens, seq_len, batch_size):
        if x.shape[1] != seq_len or n >= max_windows:
            break
        x = x[: max_windows - n].to(device)
        eps = torch.randn(*x.shape, flow.d, device=device, generator=generator)
        latents = flow.flow(flow.codebook.sample(x, eps)[0])[2]
        end += ((latents[-1] - latents[0]) ** 2).sum().item()
        steps = [((b - a) ** 2).sum().item() for a, b in zip(latents, latents[1:])]
        blocks = steps if blocks is None else [s + t for s, t in zip(blocks, steps)]
        n += len(x)
    coords = n * seq_len * flow.d
    return {"displacement_per_dim": end / coords, "block_displacement_per_dim": [b / coords for b in blocks],
            "windows": n, "seed": seed}
