"""Categorical draws for samplers, made in float64.

float32 Gumbel noise is truncated and silently lowers the entropy of the samples (Zheng et al. 2024), so
every draw here goes through float64 probabilities.
"""

from __future__ import annotations

import torch


def categorical(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """argmax at temperature 0, else one draw per row from softmax(logits / temperature) in float64."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
