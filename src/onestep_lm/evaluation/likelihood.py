"""Likelihood of a whole split: every token scored exactly once (non-overlapping windows, the tail included).

Reported: bits per token, bits per character of the underlying text, per-token perplexity, the number of
tokens and characters scored, and whether the figure is an upper bound (flow and MDLM) or exact (AR). For a
flow, the ELBO's terms are reported too, and with `samples` > 1 the importance-weighted bound.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from ..data import eval_windows, prepare_data
from ..errors import DataError
from ..io import read_json, write_json
from ..runs import Run

LN2 = math.log(2)


@torch.no_grad()
def evaluate_likelihood(run: Run, split: str = "val", samples: int = 1, seed: int = 0,
                        batch_size: int | None = None, progress: bool = True) -> dict:
    data = prepare_data(run.config.data, tokenizer=run.tokenizer)
    if split not in data.splits:
        raise DataError(f"split {split!r} is not available for data source {run.config.data.source!r}; "
                        f"available: {', '.join(data.splits)}")
    tokens = data.splits[split].tokens
    chars = data.splits[split].chars
    batch_size = batch_size or run.config.train.batch_size
    device = run.device
    generator = torch.Generator(device=device).manual_seed(seed)
    model = run.model.eval()
    total = torch.zeros((), dtype=torch.float64)
    terms = {k: torch.zeros((), dtype=torch.float64) for k in ("decoder", "prior", "logdet", "entropy")}
    count = 0
    started = time.perf_counter()
    n_batches = math.ceil(len(tokens) / data.seq_len / batch_size)
    for x in tqdm(eval_windows(tokens, data.seq_len, batch_size), total=n_batches, disable=not progress,
                  desc=f"eval {split}", dynamic_ncols=True):
        x = x.to(device)
        if run.kind == "flow" and samples == 1:  # the plain ELBO, term by term
            t = model.elbo_terms(x, generator)
            nll = t["neg_elbo"]
            for k in terms:
                terms[k] += t[k].double().sum().cpu()
        else:
            nll = model.nll(x, samples=samples, generator=generator)
        total += nll.double().sum().cpu()
        count += x.numel()
    bits = total.item() / LN2
    result = {
        "kind": run.kind, "split": split, "bound": bool(model.bound),
        "bits_per_token": bits / count, "bits_per_char": bits / chars, "perplexity": 2 ** (bits / count),
        "tokens": count, "chars": chars, "iw_samples": samples, "seed": seed,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if run.kind == "flow" and samples == 1:
        result["terms_bits_per_token"] = {k: v.item() / LN2 / count for k, v in terms.items()}
    return result


def format_likelihood(result: dict) -> str:
    rel = "<=" if result["bound"] else "="
    return (f"{result['kind']} {result['split']}: bits/token {rel} {result['bits_per_token']:.4f}, "
            f"bits/char {rel} {result['bits_per_char']:.4f}, perplexity {rel} {result['perplexity']:.3f} "
            f"({result['tokens']:,} tokens, {result['chars']:,} chars)")


def write_eval(run: Run, result: dict) -> None:
    """Merge the result into the run's eval.json (one entry per split, plus the newest at the top level)."""
    path = run.dir / "eval.json"
    existing = read_json(path) if path.is_file() else {}
    existing.update(result)
    existing.setdefault("splits", {})[result["split"]] = dict(result)
    write_json(path, existing)
