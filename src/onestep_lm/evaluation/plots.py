"""PNG plots of runs: training curves and the histogram of encoded latents against the N(0, 1) density."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_figure(fig, ax, out: Path, grid: bool = True) -> Path:
    """What every plot ends with: grid, legend, tight layout, the PNG at 120 dpi, the figure closed."""
    if grid:
        ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_training_curves(runs: dict[str, Path], out: Path) -> Path:
    """Training loss (and validation bits per token where logged) against step, one line per run. A flow's
    curves are its bound (`bound`, without the transport penalty) where it was logged."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run_dir in runs.items():
        records = read_metrics(run_dir)
        key = "bound" if any("bound" in r for r in records) else "loss"
        steps = [r["step"] for r in records if key in r]
        ax.plot(steps, [r[key] for r in records if key in r], label=f"{name} train {key}")
        val = [(r["step"], r[f"val_{key}"]) for r in records if f"val_{key}" in r]
        if val:
            ax.plot(*zip(*val), "o--", label=f"{name} validation {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss, bits per token (flow: the bound)")
    return save_figure(fig, ax, out)


def plot_latent_histogram(z, out: Path, title: str = "encoded validation z") -> Path:
    flat = np.asarray(z, dtype=np.float64).reshape(-1)
    fig, ax = plt.subplots(figsize=(6, 4))
    lim = max(4.0, float(np.quantile(np.abs(flat), 0.999)))
    ax.hist(flat, bins=120, range=(-lim, lim), density=True, alpha=0.6, label=title)
    grid = np.linspace(-lim, lim, 400)
    ax.plot(grid, np.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi), "k-", label="N(0, 1) density")
    ax.set_xlabel("z (all coordinates)")
    ax.set_ylabel("density")
    return save_figure(fig, ax, out, grid=False)


def plot_agreement_by_position(by_position, out: Path) -> Path:
    """Teacher agreement of the one-step generator at each position, on z ~ N(0, I)."""
    values = np.asarray(by_position, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(np.arange(len(values)), values, "o-", ms=3)
    ax.axhline(values.mean(), color="k", ls="--", lw=1, label=f"mean {values.mean():.3f}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("position")
    ax.set_ylabel("agreement with the exact inverse")
    return save_figure(fig, ax, out)
