"""Models. Each one exposes the same small surface:

- ``loss(x) -> (scalar loss, metrics)`` for the trainer (x: a (B, T) batch of token ids);
- ``nll(x, samples=1, generator=None) -> (B,)`` nats per sequence, exact or an upper bound (``bound``);
- ``kind`` (its name in configs and run folders) and ``bound`` (whether ``nll`` is an upper bound).
"""

from __future__ import annotations

from torch import nn

from ..config import Config
from .flow_lm import FlowLM


def build_model(kind: str, cfg: Config, vocab_size: int, **context) -> tuple[nn.Module, dict]:
    """A freshly initialised model of the given kind, and what run.json should record about its making
    (for a generator: which flow it stands on). `context` holds what a kind needs beyond the config."""
    T = cfg.data.seq_len
    if kind == "flow":
        return FlowLM(vocab_size, T, cfg.model.flow), {}
    raise ValueError(f"unknown model kind {kind!r}")
