"""Samplers by name. Each turns a trained run into token sequences; categorical draws are made in float64.

    flow-inverse   z ~ N(0, tau^2 I), the flow's exact sequential inverse, then the tied decoder
"""

from __future__ import annotations

import torch

from .errors import ConfigError
from .runs import Run

SAMPLERS = {"flow": ("flow-inverse",)}


def default_sampler(kind: str) -> str:
    return SAMPLERS[kind][0]


def sample_tokens(run: Run, n: int, sampler: str | None = None, seed: int = 0, seq_len: int | None = None,
                  tau: float = 1.0) -> torch.Tensor:
    """n sequences of token ids (n, seq_len) from the named sampler; the same seed gives the same sequences."""
    sampler = sampler or default_sampler(run.kind)
    if sampler not in SAMPLERS[run.kind]:
        raise ConfigError(f"sampler {sampler!r} is not available for a {run.kind} run; "
                          f"available: {', '.join(SAMPLERS[run.kind])}")
    if n < 1:
        raise ConfigError(f"number of samples must be >= 1, got {n}")
    generator = torch.Generator(device=run.device).manual_seed(seed)
    if sampler == "flow-inverse":
        return run.model.sample(n, seq_len, tau=tau, generator=generator)
    raise ConfigError(f"unknown sampler {sampler!r}")


def categorical(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """argmax at temperature 0, else a draw from softmax(logits / temperature) made in float64 (float32 Gumbel
    noise is truncated and silently lowers the entropy of the samples)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
