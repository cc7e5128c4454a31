"""`onestep-lm run`: the main job. Train the flow (Stage A), train the one-step generator on it (Stage B),
evaluate both, sample with each sampler, and write a report folder:

    OUT/flow/          the flow's run folder
    OUT/generator/     the generator's run folder
    OUT/report.md      the configuration, the figures and a table of samples
    OUT/results.json   every figure of the report
    OUT/*.png          training curves of both stages, histogram of encoded z against the N(0, 1) density,
                       teacher agreement by position
An existing OUT is refused unless --resume is given; with --resume, finished stages are kept and an
interrupted one continues from its newest checkpoint.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import yaml

from .config import Config, load_config
from .data import prepare_data
from .errors import DataError, RunError
from .evaluation.generator import evaluate_generator
from .evaluation.latents import encoded_latents, latent_stats
from .evaluation.likelihood import evaluate_likelihood, write_eval
from .evaluation.plots import plot_agreement_by_position, plot_latent_histogram, plot_training_curves
from .io import read_json, write_json, write_text_atomic
from .runs import check_new_run_dir, generator_setup, open_run, train_run
from .sampling import sample_tokens


def default_config_path() -> Path:
    """The shipped CPU demo config (configs/shakespeare.yaml, packaged with the library)."""
    return Path(str(resources.files("onestep_lm") / "configs" / "shakespeare.yaml"))


def _stage(kind: str, cfg: Config, out: Path, resume: bool, progress: bool) -> Path:
    """Train one stage into OUT/kind, continuing or skipping it when resuming."""
    run_dir = out / kind
    if (run_dir / "train_summary.json").is_file():  # written when a stage's training has finished
        print(f"{kind}: already trained in {run_dir}", file=sys.stderr)
        return run_dir
    context, tokenizer = {}, None
    if kind == "generator":
        cfg, context, tokenizer = generator_setup(cfg, out / "flow")
    train_run(kind, cfg, run_dir, resume=resume and (run_dir / "run.json").is_file(), progress=progress,
              context=context, tokenizer=tokenizer)
    return run_dir


def run_pipeline(config: str | Path | None = None, out: str | Path = "runs/demo", resume: bool = False,
                 overrides: list[str] | tuple[str, ...] = (), progress: bool = True, n_samples: int = 8) -> Path:
    out = Path(out)
    if not resume:
        check_new_run_dir(out)
    elif not out.is_dir():
        raise RunError(f"nothing to resume: {out} does not exist")
    cfg = load_config(config if config is not None else default_config_path(), overrides)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")

    flow_dir = _stage("flow", cfg, out, resume, progress)
    gen_dir = _stage("generator", cfg, out, resume, progress)
    flow, gen = open_run(flow_dir), open_run(gen_dir)
    results: dict = {"config": cfg.to_dict(), "flow": {"run": str(flow_dir)}}
    for split in ("val", "test"):
        try:
            ev = evaluate_likelihood(flow, split=split, progress=progress)
        except DataError:  # a source without a test split (Tiny Shakespeare's standard split has none)
            if split == "val":
                raise
            continue
        write_eval(flow, ev)
        results["flow"][split] = ev
    results["flow"]["train"] = read_json(flow_dir / "train_summary.json")

    data = prepare_data(cfg.data, tokenizer=flow.tokenizer)
    z = encoded_latents(flow.model, data.splits["val"].tokens, data.seq_len, cfg.train.batch_size)
    results["flow"]["encoded_z"] = latent_stats(z)
    gen_eval = evaluate_generator(gen, split="val", progress=progress)
    write_eval(gen, gen_eval)
    results["generator"] = {"run": str(gen_dir), "train": read_json(gen_dir / "train_summary.json"), **gen_eval}

    decode = flow.tokenizer.decode
    results["samples"] = {
        "flow-inverse": [decode(s.tolist()) for s in sample_tokens(flow, n_samples, "flow-inverse", seed=0)],
        "onestep (temperature 0)": [decode(s.tolist()) for s in sample_tokens(gen, n_samples, "onestep", seed=0)],
        "onestep (temperature 1)": [decode(s.tolist()) for s in
                                    sample_tokens(gen, n_samples, "onestep", seed=0, temperature=1.0)],
    }

    plots = {"training_curves": plot_training_curves({"flow": flow_dir, "generator": gen_dir},
                                                     out / "training_curves.png").name,
             "latent_histogram": plot_latent_histogram(z, out / "latent_histogram.png").name,
             "agreement_by_position": plot_agreement_by_position(
                 gen_eval["teacher_agreement_by_position"], out / "agreement_by_position.png").name}
    results["plots"] = plots
    write_json(out / "results.json", results)
    write_text_atomic(out / "report.md", render_report(results))
    return out / "report.md"


def render_report(results: dict) -> str:
    flow = results["flow"]
    lines = ["# onestep-lm report", ""]
    lines += ["## Likelihood (upper bounds: the flow's figures are ELBOs, written <=)", "",
              "| model | split | bits/token | bits/char | perplexity | tokens |", "|---|---|---|---|---|---|"]
    for split in ("val", "test"):
        if split in flow:
            e = flow[split]
            rel = "<= " if e["bound"] else ""
            lines.append(f"| flow | {split} | {rel}{e['bits_per_token']:.4f} | {rel}{e['bits_per_char']:.4f} | "
                         f"{rel}{e['perplexity']:.3f} | {e['tokens']:,} |")
    if "terms_bits_per_token" in flow.get("val", {}):
        t = flow["val"]["terms_bits_per_token"]
        lines += ["", "ELBO terms on val (bits per token): " + ", ".join(f"{k} {v:.4f}" for k, v in t.items())]
    tr = flow["train"]
    lines += ["", f"Flow training: {tr['step']} steps in {tr['elapsed_s'] / 60:.1f} min, "
                  f"{tr['tokens_per_s']:,.0f} tokens/s.", ""]
    s = flow["encoded_z"]
    ref = s["normal_reference"]
    lines += ["## Encoded validation z against N(0, I)", "", "| statistic | encoded z | N(0, 1) |", "|---|---|---|"]
    for key in ("mean", "std", "excess_kurtosis", "frac_beyond_3sigma"):
        lines.append(f"| {key} | {s[key]:.4f} | {ref[key]:.4f} |")
    lines += ["", f"Per-dimension means up to {s['max_abs_dim_mean']:.3f} in absolute value; per-dimension stds "
                  f"from {s['min_dim_std']:.3f} to {s['max_dim_std']:.3f}.", ""]
    g = results["generator"]
    lines += ["## One-step generator", "", "| figure | value |", "|---|---|",
              f"| reconstruction accuracy (held-out val, z = f(u), u ~ q(.\\|x)) | {g['reconstruction_accuracy']:.4f} |",
              f"| teacher agreement (z ~ N(0, I), {g['prior_samples']} samples) | {g['teacher_agreement']:.4f} |",
              f"| training | {g['train']['step']} steps in {g['train']['elapsed_s'] / 60:.1f} min |", ""]
    lines += [f"![training curves]({results['plots']['training_curves']})", "",
              f"![latent histogram]({results['plots']['latent_histogram']})", "",
              f"![agreement by position]({results['plots']['agreement_by_position']})", ""]
    lines += ["## Samples", ""]
    for sampler, texts in results["samples"].items():
        lines += [f"### {sampler} (seed 0)", ""]
        lines += ["```"] + [t.replace("```", "'''") + "\n---" for t in texts] + ["```", ""]
    lines += ["## Configuration", "", "```yaml", yaml.safe_dump(results["config"], sort_keys=False).rstrip(),
              "```", ""]
    return "\n".join(lines)
