"""An exponential moving average of a model's weights (config key train.ema, e.g. 0.999).

After every optimizer step, for each floating-point entry of the model's state_dict,
    ema <- d_t * ema + (1 - d_t) * weight,     d_t = min(decay, (1 + t) / (10 + t))
(t the number of updates so far: the average follows the weights closely early in a run, then settles at
`decay`). The average is kept in float32, saved in every checkpoint as `ema.safetensors` (hashed like the other
files) and restored by --resume; validation during training, `onestep-lm eval`, `sample` and the Python API
use it instead of the raw weights when train.ema is set.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ConfigError


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ConfigError(f"config key train.ema: {decay} must be null (no EMA) or a decay in (0, 1)")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                       if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - d)

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state_dict with the averaged values (in each entry's own dtype)."""
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v)
                for k, v in model.state_dict().items()}

    def load(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        missing = set(self.shadow) - set(weights)
        if missing:
            raise KeyError(f"EMA weights lack {sorted(missing)[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(weights[k].float())
        self.updates = updates

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Within the block the model holds the averaged weights; its own are put back after."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.weights(model))
        try:
            yield model
        finally:
            model.load_state_dict(backup)
