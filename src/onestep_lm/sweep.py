"""`onestep-lm sweep`: the transport trade-off (issue #8), measured and shown.

For every transport weight beta (config key model.flow.transport.weight) it trains a flow, and on that flow one
generator per prior-pair fraction (config key model.generator.prior.fraction); then per (beta, fraction):
    the flow's validation bound (bits per character, "<="), the mean displacement (z - u)^2 per coordinate and each
    block's share, the encoded-z statistics, the generator's reconstruction accuracy and teacher agreement, and,
    with --judge, one-step samples (temperature 0) under the judge with their unigram entropy beside the data's.
Everything else comes from the config (and --set overrides), the same for every row. The folder:

    OUT/beta{w}/flow/               the flow trained with weight w
    OUT/beta{w}/gen_prior{f}/       a generator on it, with prior-pair fraction f (row.json: its figures)
    OUT/sweep.md, sweep.json        the table
    OUT/sweep.png                   the flow's bound against teacher agreement, one point per row

Finished stages and rows are kept: running the command again (with more weights, say) trains only what is
missing, and a killed stage continues from its newest checkpoint. Two sweeps may share OUT when their weights
differ (e.g. one process per CPU core), and a last call with every weight collects them into one table.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import load_config  # noqa: E402
from .data import prepare_data  # noqa: E402
from .errors import ConfigError  # noqa: E402
from .evaluation.generator import evaluate_generator  # noqa: E402
from .evaluation.latents import transport_stats  # noqa: E402
from .evaluation.likelihood import evaluate_likelihood, write_eval  # noqa: E402
from .evaluation.plots import save_figure  # noqa: E402
from .io import read_json, write_json, write_text_atomic  # noqa: E402
from .runs import open_run, train_stage  # noqa: E402


def _label(value: float) -> str:
    return f"{value:g}"


def _flow_figures(flow_dir: Path, judge, n: int, seed: int, progress: bool) -> dict:
    path = flow_dir / "sweep_flow.json"
    figures = read_json(path) if path.is_file() else _measure_flow(flow_dir, progress)
    if judge is not None and "samples" not in figures:  # the teacher's own samples: what G tries to match
        from .evaluation.sample_eval import Setting, evaluate_samples

        result = evaluate_samples(open_run(flow_dir), judge, Setting("flow-inverse"), n=n, seed=seed,
                                  reference=False)
        figures["samples"] = {k: result[k] for k in ("setting", "n", "seed", "judge", "unigram_entropy_nats",
                                                      "word_validity", "examples") if k in result}
    write_json(path, figures)
    return figures


def _measure_flow(flow_dir: Path, progress: bool) -> dict:
    flow = open_run(flow_dir)
    likelihood = evaluate_likelihood(flow, split="val", progress=progress)
    write_eval(flow, likelihood)
    data = prepare_data(flow.config.data, tokenizer=flow.tokenizer)
    figures = {"bits_per_char": likelihood["bits_per_char"], "bits_per_token": likelihood["bits_per_token"],
               "bound": likelihood["bound"], "tokens": likelihood["tokens"],
               "train": read_json(flow_dir / "train_summary.json"),
               **transport_stats(flow.model, data.splits["val"].tokens, data.seq_len, flow.config.train.batch_size)}
    return figures


def _generator_figures(gen_dir: Path, judge, n: int, seed: int, progress: bool) -> dict:
    path = gen_dir / "row.json"
    row = read_json(path) if path.is_file() else {}
    gen = None
    if "teacher_agreement" not in row:
        gen = open_run(gen_dir)
        result = evaluate_generator(gen, split="val", seed=seed, progress=progress)
        write_eval(gen, result)
        row = {k: result[k] for k in ("reconstruction_accuracy", "teacher_agreement", "prior_samples",
                                       "encoded_z", "seed")}
        row["train"] = read_json(gen_dir / "train_summary.json")
        write_json(path, row)
    if judge is not None and "samples" not in row:
        from .evaluation.sample_eval import Setting, evaluate_samples

        gen = gen or open_run(gen_dir)
        result = evaluate_samples(gen, judge, Setting("onestep", temperature=0.0), n=n, seed=seed)
        row["samples"] = {k: result[k] for k in ("setting", "n", "seed", "judge", "unigram_entropy_nats",
                                                  "word_validity", "examples") if k in result}
        row["samples"]["data"] = {k: result["data"][k] for k in ("judge", "unigram_entropy_nats", "word_validity")
                                  if k in result["data"]}
        write_json(path, row)
    return row


def run_sweep(config: str | Path, out: str | Path, weights: list[float], fractions: list[float] = (0.0,),
              overrides: list[str] | tuple[str, ...] = (), judge: str | None = None, n: int = 64, seed: int = 0,
              progress: bool = True) -> Path:
    """Train and measure every (weight, fraction); write OUT/sweep.md, sweep.json and sweep.png."""
    if not weights:
        raise ConfigError("the sweep needs at least one transport weight (--weights)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    base = load_config(config, overrides)  # validated once before any training
    the_judge = None
    if judge is not None:
        from .evaluation.judges import load_judge

        the_judge = load_judge(judge)
    rows = []
    for w in weights:
        cfg = load_config(config, [*overrides, f"model.flow.transport.weight={w}"])
        flow_dir = out / f"beta{_label(w)}" / "flow"
        flow_dir.parent.mkdir(parents=True, exist_ok=True)
        train_stage("flow", cfg, flow_dir, progress=progress)
        flow = _flow_figures(flow_dir, the_judge, n, seed, progress)
        for f in fractions:
            gen_cfg = load_config(config, [*overrides, f"model.flow.transport.weight={w}",
                                           f"model.generator.prior.fraction={f}"])
            gen_dir = flow_dir.parent / f"gen_prior{_label(f)}"
            train_stage("generator", gen_cfg, gen_dir, progress=progress, flow_dir=flow_dir)
            rows.append({"weight": w, "kind": cfg.model.flow.transport.kind, "prior_fraction": f,
                         "flow": flow, "generator": _generator_figures(gen_dir, the_judge, n, seed, progress)})
    results = {"config": base.to_dict(), "weights": list(weights), "prior_fractions": list(fractions),
               "judge": judge, "rows": rows}
    write_json(out / "sweep.json", results)
    plot_tradeoff(rows, out / "sweep.png")
    write_text_atomic(out / "sweep.md", render_sweep(results))
    return out / "sweep.md"


def plot_tradeoff(rows: list[dict], path: Path) -> Path:
    """The flow's bound against teacher agreement: one point per row, one line per prior-pair fraction."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, f in enumerate(sorted({r["prior_fraction"] for r in rows})):
        pts = sorted((r["generator"]["teacher_agreement"], r["flow"]["bits_per_char"], r["weight"])
                     for r in rows if r["prior_fraction"] == f)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"prior-pair fraction {f:g}")
        for agreement, bpc, w in pts if i == 0 else []:
            ax.annotate(f"beta {w:g}", (agreement, bpc), textcoords="offset points", xytext=(-8, 6), fontsize=8,
                        ha="right")
    unpenalised = [r["flow"]["bits_per_char"] for r in rows if r["weight"] == 0]
    if unpenalised:
        ax.axhline(1.1 * unpenalised[0], color="gray", linestyle="--", linewidth=1,
                   label="bound of beta 0, +10%")
    ax.set_xlabel("teacher agreement on z ~ N(0, I)")
    ax.set_ylabel("flow bound, bits per character (<=)")
    ax.set_title("the transport trade-off")
    return save_figure(fig, ax, path)


def render_sweep(results: dict) -> str:
    lines = ["# The transport trade-off", "",
             "The flow's bound is an upper bound on the NLL (<=). Displacement: mean (z - u)^2 per coordinate on "
             "validation text, u ~ q(.|x). Agreement: argmax G(z) against the exact inverse's decoding on "
             "z ~ N(0, I). Reconstruction: argmax G(z) against held-out text, z = f(u(x)).", "",
             "Judged samples: the flow's exact inverse (the teacher) and the generator (one step, argmax), each with "
             "its mean per-sample unigram entropy in nats.", "",
             "| beta | prior fraction | flow bpc | displacement | z mean | z std | max abs dim mean | min dim std | "
             "reconstruction | agreement | teacher: judge bits/char, entropy | one-step T=0: judge bits/char, "
             "entropy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    data = None
    for r in results["rows"]:
        fl, g = r["flow"], r["generator"]
        z = g["encoded_z"]
        s, t = g.get("samples"), fl.get("samples")
        judged = " | ".join(f"{x['judge']['bits_per_char']:.3f}, {x['unigram_entropy_nats']:.3f}" if x else "-"
                            for x in (t, s))
        data = (s or {}).get("data") or data
        lines.append(f"| {r['weight']:g} | {r['prior_fraction']:g} | <= {fl['bits_per_char']:.4f} | "
                     f"{fl['displacement_per_dim']:.4f} | {z['mean']:.4f} | {z['std']:.4f} | "
                     f"{z['max_abs_dim_mean']:.3f} | {z['min_dim_std']:.3f} | {g['reconstruction_accuracy']:.4f} | "
                     f"{g['teacher_agreement']:.4f} | {judged} |")
    if data:
        lines += ["", f"Validation text under the same judge: {data['judge']['bits_per_char']:.3f} bits per "
                      f"character, unigram entropy {data['unigram_entropy_nats']:.3f} nats."]
    if results["judge"]:
        n = next((r["generator"]["samples"]["n"] for r in results["rows"] if "samples" in r["generator"]), "?")
        lines += [f"Judge: {results['judge']}; {n} samples per row, seed {results['rows'][0]['generator']['seed']}."]
    lines += ["", "![bound against teacher agreement](sweep.png)", ""]
    return "\n".join(lines)
