"""Samplers by name. Each turns a trained run into token sequences; categorical draws are made in float64.

    flow-inverse   z ~ N(0, tau^2 I), the flow's exact sequential inverse, then the tied decoder
                   (on a generator run: the generator's own flow, for side-by-side comparison)
    flow-jacobi    the same z and decoder, the inverse by parallel Jacobi sweeps in each block until no entry
                   moves by more than `tol` (at most `max_sweeps` per block; T sweeps are exact)
    onestep        z ~ N(0, tau^2 I), logits = G(z) in one forward pass, argmax or a float64 draw
    ar             token by token with a KV cache; temperature, optional top-k / top-p
    mdlm           masked diffusion, `steps` ancestral steps from all-mask (cached when nothing changed)
"""

from __future__ import annotations

import torch

from .errors import ConfigError
from .nn.draws import categorical  # noqa: F401  (re-exported: samplers draw through it)
from .runs import Run

SAMPLERS = {"flow": ("flow-inverse", "flow-jacobi"), "generator": ("onestep", "flow-inverse", "flow-jacobi"),
            "ar": ("ar",), "mdlm": ("mdlm",)}
DEFAULT_TEMPERATURE = {"onestep": 0.0, "ar": 1.0, "mdlm": 1.0}  # one-step: argmax; baselines: ancestral draws


def default_sampler(kind: str) -> str:
    return SAMPLERS[kind][0]


def sample_tokens(run: Run, n: int, sampler: str | None = None, seed: int = 0, seq_len: int | None = None,
                  tau: float = 1.0, temperature: float | None = None, steps: int | None = None,
                  top_k: int | None = None, top_p: float | None = None, tol: float = 1e-4,
                  max_sweeps: int | None = None, info: dict | None = None) -> torch.Tensor:
    """n sequences of token ids (n, seq_len) from the named sampler; the same seed gives the same sequences.
    flow-jacobi adds the sweeps each block made to `info` (under "sweeps", block K first) when it is given."""
    sampler = sampler or default_sampler(run.kind)
    if sampler not in SAMPLERS[run.kind]:
        raise ConfigError(f"sampler {sampler!r} is not available for a {run.kind} run; "
                          f"available: {', '.join(SAMPLERS[run.kind])}")
    if n < 1:
        raise ConfigError(f"number of samples must be >= 1, got {n}")
    generator = torch.Generator(device=run.device).manual_seed(seed)
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE.get(sampler, 0.0)
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if steps is not None and steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if sampler == "flow-inverse":
        return run.flow.sample(n, seq_len, tau=tau, generator=generator)
    if sampler == "flow-jacobi":
        if tol < 0 or (max_sweeps is not None and max_sweeps < 1):
            raise ConfigError(f"flow-jacobi needs tol >= 0 and max_sweeps >= 1; got tol {tol}, max_sweeps "
                              f"{max_sweeps}")
        u, sweeps = run.flow.inverse_jacobi(run.flow.prior_sample(n, seq_len, tau, generator), tol, max_sweeps)
        if info is not None:
            info["sweeps"] = sweeps
        return run.flow.codebook.decode(u)
    if sampler == "onestep":
        return run.model.sample(n, seq_len, tau=tau, temperature=temperature, generator=generator)
    if sampler == "ar":
        return run.model.sample(n, seq_len, generator=generator, temperature=temperature, top_k=top_k, top_p=top_p)
    if sampler == "mdlm":
        return run.model.sample(n, seq_len, steps=steps, generator=generator, temperature=temperature)
    raise ConfigError(f"unknown sampler {sampler!r}")
