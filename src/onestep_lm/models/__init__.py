"""Models. Each one exposes the same small surface:

- ``loss(x) -> (scalar loss, metrics)`` for the trainer (x: a (B, T) batch of token ids);
- ``nll(x, samples=1, generator=None) -> (B,)`` nats per sequence, exact or an upper bound (``bound``);
- ``kind`` (its name in configs and run folders) and ``bound`` (whether ``nll`` is an upper bound).
"""

from __future__ import annotations

from torch import nn

from pathlib import Path

from ..config import Config
from ..errors import RunError
from .ar import ARLM
from .flow_lm import FlowLM
from .mdlm import MDLM
from .generator import OneStepGenerator


def build_model(kind: str, cfg: Config, vocab_size: int, **context) -> tuple[nn.Module, dict]:
    """A freshly initialised model of the given kind, and what run.json should record about its making
    (for a generator: which flow it stands on). `context` holds what a kind needs beyond the config."""
    T = cfg.data.seq_len
    if kind == "flow":
        return FlowLM(vocab_size, T, cfg.model.flow), {}
    if kind == "generator":
        return _generator(cfg, vocab_size, **context)
    if kind == "ar":
        return ARLM(vocab_size, T, cfg.model.ar), {}
    if kind == "mdlm":
        return MDLM(vocab_size, T, cfg.model.mdlm), {}
    raise ValueError(f"unknown model kind {kind!r}")


def _generator(cfg: Config, vocab_size: int, flow_dir: str | Path, expected_flow_sha256: str | None = None):
    """A generator on the frozen flow of run folder `flow_dir`; refused when that flow's weights are not the
    ones the generator was trained on (expected_flow_sha256, from the generator's run.json)."""
    from ..runs import open_run  # runs builds models: imported here to keep the module graph one-way
    from ..train.checkpoint import weights_sha256

    flow_run = open_run(flow_dir)
    if flow_run.kind != "flow":
        raise RunError(f"{flow_dir} is a {flow_run.kind} run, not a flow run")
    sha = weights_sha256(flow_run.model.state_dict())
    if expected_flow_sha256 is not None and sha != expected_flow_sha256:
        raise RunError(f"this generator was trained on a flow with weights sha256 {expected_flow_sha256[:12]}..., "
                       f"but {flow_dir} now holds weights {sha[:12]}...; refusing to pair it with another flow")
    if flow_run.meta["vocab_size"] != vocab_size:
        raise RunError(f"the flow in {flow_dir} has a vocabulary of {flow_run.meta['vocab_size']}, "
                       f"the generator {vocab_size}")
    record = {"flow": {"path": str(Path(flow_dir).resolve()), "weights_sha256": sha}}
    return OneStepGenerator(flow_run.model, cfg.model.generator), record
