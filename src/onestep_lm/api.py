"""The Python API: `onestep_lm.load(run_dir)` gives a model object with encode / decode / log_likelihood /
generate, whatever the kind of run (what a kind cannot do raises a clear error)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import DataError
from .runs import Run, open_run
from .sampling import sample_tokens


class LoadedModel:
    def __init__(self, run: Run):
        self.run = run
        self.tokenizer = run.tokenizer
        self.model = run.model
        self.seq_len = run.config.data.seq_len

    def __repr__(self) -> str:
        return f"LoadedModel(kind={self.run.kind!r}, dir={str(self.run.dir)!r})"

    def tokenize(self, texts: list[str] | str) -> list[torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for i, text in enumerate(texts):
            try:
                ids = self.tokenizer.encode(text)
            except DataError as e:
                raise DataError(f"text {i}: {e}") from None
            if not 1 <= len(ids) <= self.seq_len:
                raise DataError(f"text {i} has {len(ids)} tokens; this model takes 1 to {self.seq_len}")
            out.append(torch.tensor(ids, dtype=torch.long, device=self.run.device))
        return out

    @torch.no_grad()
    def encode(self, texts: list[str] | str, sample: bool = False, seed: int = 0):
        """Latents z = f(u) of each text (u = mu_x, or u ~ q(.|x) with sample=True): a (B, L, d) tensor when
        all texts have L tokens, else a list of (L_i, d) tensors."""
        flow = self.run.flow
        generator = torch.Generator(device=self.run.device).manual_seed(seed)
        zs = [flow.encode(x[None], sample=sample, generator=generator)[0] for x in self.tokenize(texts)]
        return torch.stack(zs) if len({z.shape for z in zs}) == 1 else zs

    @torch.no_grad()
    def decode(self, z) -> list[str]:
        """Texts from latents: the flow's exact inverse, then the tied decoder."""
        flow = self.run.flow
        zs = [z] if isinstance(z, torch.Tensor) and z.dim() == 2 else list(z)
        return [self.tokenizer.decode(flow.decode(zi[None].to(self.run.device).float())[0].tolist()) for zi in zs]

    @torch.no_grad()
    def log_likelihood(self, texts: list[str] | str, samples: int = 1, seed: int = 0) -> list[float]:
        """log2 p(text) per token for each text: exact for AR, a lower bound (ELBO) for flow and MDLM runs."""
        generator = torch.Generator(device=self.run.device).manual_seed(seed)
        return [-self.model.nll(x[None], samples=samples, generator=generator).item() / math.log(2) / len(x)
                for x in self.tokenize(texts)]

    @torch.no_grad()
    def generate(self, n: int = 1, seed: int = 0, sampler: str | None = None, **options) -> list[str]:
        tokens = sample_tokens(self.run, n, sampler=sampler, seed=seed, **options)
        return [self.tokenizer.decode(t.tolist()) for t in tokens]


def load(run_dir: str | Path, device: str = "cpu") -> LoadedModel:
    return LoadedModel(open_run(run_dir, device=device))
