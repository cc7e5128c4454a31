"""Metrics of a one-step generator (METHOD.md, "Teacher agreement").

- reconstruction_accuracy: token accuracy of argmax G(z) on encoded text of a split, z = f(u), u ~ q(.|x)
  (the pairs G trained on, but held out);
- teacher_agreement: on z ~ N(0, I), agreement of argmax G(z) with the exact inverse's decoding
  x* = argmax p(x | f^{-1}(z)); at 1.0 the generator samples exactly the flow's distribution;
- the statistics of encoded z of the split beside those of N(0, I).
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from ..data import eval_windows, prepare_data
from ..errors import DataError
from ..runs import Run
from .latents import encoded_latents, latent_stats


@torch.no_grad()
def evaluate_generator(run: Run, split: str = "val", prior_samples: int = 1024, seed: int = 0,
                       batch_size: int | None = None, progress: bool = True) -> dict:
    data = prepare_data(run.config.data, tokenizer=run.tokenizer)
    if split not in data.splits:
        raise DataError(f"split {split!r} is not available; available: {', '.join(data.splits)}")
    gen, device = run.model.eval(), run.device
    tokens = data.splits[split].tokens
    batch_size = batch_size or run.config.train.batch_size
    generator = torch.Generator(device=device).manual_seed(seed)
    started = time.perf_counter()
    correct, count = 0, 0
    for x in tqdm(eval_windows(tokens, data.seq_len, batch_size), disable=not progress, desc="reconstruction",
                  dynamic_ncols=True):
        x = x.to(device)
        z, _, _ = gen.encode(x, generator=generator)
        correct += (gen.logits(z).argmax(-1) == x).sum().item()
        count += x.numel()
    agreement, by_position = gen.teacher_agreement(prior_samples, generator=generator)
    z = encoded_latents(gen.flow, tokens, data.seq_len, batch_size, seed=seed, device=device)
    return {
        "kind": "generator", "split": split, "reconstruction_accuracy": correct / count, "tokens": count,
        "teacher_agreement": agreement, "teacher_agreement_by_position": by_position.tolist(),
        "prior_samples": prior_samples, "encoded_z": latent_stats(z), "seed": seed,
        "seconds": round(time.perf_counter() - started, 2),
    }


def format_generator(result: dict) -> str:
    s = result["encoded_z"]
    return (f"generator {result['split']}: reconstruction accuracy {result['reconstruction_accuracy']:.4f} "
            f"({result['tokens']:,} tokens); teacher agreement on z ~ N(0, I) {result['teacher_agreement']:.4f} "
            f"({result['prior_samples']} samples); encoded z mean {s['mean']:.3f} std {s['std']:.3f} "
            f"excess kurtosis {s['excess_kurtosis']:.3f}")
