"""Samplers by name. Each turns a trained run into token sequences; categorical draws are made in float64.

    flow-inverse   z ~ N(0, tau^2 I), the flow's exact sequential inverse, then the tied decoder
                   (on a generator run: the generator's own flow, for side-by-side comparison)
    onestep        z ~ N(0, tau^2 I), logits = G(z) in one forward pass, argmax or a float64 draw
"""

from __future__ import annotations

import torch

from .errors import ConfigError
from .nn.draws import categorical  # noqa: F401  (re-exported: samplers draw through it)
from .runs import Run

SAMPLERS = {"flow": ("flow-inverse",), "generator": ("onestep", "flow-inverse")}


def default_sampler(kind: str) -> str:
    return SAMPLERS[kind][0]


def sample_tokens(run: Run, n: int, sampler: str | None = None, seed: int = 0, seq_len: int | None = None,
                  tau: float = 1.0, temperature: float = 0.0) -> torch.Tensor:
    """n sequences of token ids (n, seq_len) from the named sampler; the same seed gives the same sequences."""
    sampler = sampler or default_sampler(run.kind)
    if sampler not in SAMPLERS[run.kind]:
        raise ConfigError(f"sampler {sampler!r} is not available for a {run.kind} run; "
                          f"available: {', '.join(SAMPLERS[run.kind])}")
    if n < 1:
        raise ConfigError(f"number of samples must be >= 1, got {n}")
    generator = torch.Generator(device=run.device).manual_seed(seed)
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if sampler == "flow-inverse":
        flow = run.model.flow if run.kind == "generator" else run.model
        return flow.sample(n, seq_len, tau=tau, generator=generator)
    if sampler == "onestep":
        return run.model.sample(n, seq_len, tau=tau, temperature=temperature, generator=generator)
    raise ConfigError(f"unknown sampler {sampler!r}")
