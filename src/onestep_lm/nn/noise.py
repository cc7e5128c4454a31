"""Training noise that depends on the global batch, not on how it is split over processes and micro-batches.

The models' own noise (the flow's u ~ q(.|x), MDLM's times and masks, the generator's u) is drawn through a
`BatchNoise` when the trainer gives one: every process and every micro-batch of one optimizer step holds a
BatchNoise with the same seed, draws the noise of the *whole* global batch and keeps the rows of its own slice.
The noise of the sample at global index i is then a function of (seed, i) only, so one process, N processes
and any micro-batch size train on identical noise (and a resumed run on the same noise as an unbroken one).

Drawing the global tensor on every process costs batch * T * d numbers per call, negligible next to the
model. Without a BatchNoise (evaluation, tests) the models draw from their `generator` argument or the global
torch RNG, as before.
"""

from __future__ import annotations

import torch
from torch import Tensor


class BatchNoise:
    """Noise for rows [start, start + rows) of a global batch of `total` rows, seeded with `seed`.

    Every holder of the same seed must make the same sequence of calls with the same per-row shapes (the
    models do: one call per noise tensor of their loss)."""

    def __init__(self, seed: int, start: int = 0, total: int | None = None):
        self.seed, self.start, self.total = int(seed), int(start), total
        self._generators: dict[str, torch.Generator] = {}

    def __repr__(self) -> str:
        return f"BatchNoise(seed={self.seed}, start={self.start}, total={self.total})"

    def generator(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def _global_rows(self, rows: int) -> int:
        total = rows if self.total is None else self.total
        if self.start + rows > total:
            raise ValueError(f"rows [{self.start}, {self.start + rows}) lie outside a global batch of {total}")
        return total

    def randn(self, rows: int, *shape: int, device: torch.device | str = "cpu") -> Tensor:
        """Standard normal noise (rows, *shape): this slice of the global batch's."""
        total = self._global_rows(rows)
        full = torch.randn(total, *shape, device=device, generator=self.generator(device))
        return full[self.start:self.start + rows]

    def rand(self, rows: int, *shape: int, device: torch.device | str = "cpu") -> Tensor:
        """Uniform [0, 1) noise (rows, *shape): this slice of the global batch's."""
        total = self._global_rows(rows)
        full = torch.rand(total, *shape, device=device, generator=self.generator(device))
        return full[self.start:self.start + rows]

    def shared_rand(self, *shape: int, device: torch.device | str = "cpu") -> Tensor:
        """Uniform [0, 1) noise shared by the whole global batch (the same on every process)."""
        return torch.rand(*shape, device=device, generator=self.generator(device))

    def index(self, rows: int, device: torch.device | str = "cpu") -> tuple[Tensor, int]:
        """The global indices of this slice's rows (rows,) and the global batch size."""
        total = self._global_rows(rows)
        return torch.arange(self.start, self.start + rows, device=device), total
