"""`onestep-lm run`: the main job. Train the flow (Stage A), train the one-step generator on it (Stage B),
evaluate both, sample with each sampler, and write a report folder:

    OUT/flow/          the flow's run folder
    OUT/generator/     the generator's run folder
    OUT/report.md      the configuration, the figures and a table of samples
    OUT/results.json   every figure of the report
    OUT/*.png          training curves of both stages, histogram of encoded z against the N(0, 1) density,
                       teacher agreement by position
    OUT/judge/         the judge, an AR model (model.ar) trained on the training split with the train.ar
                       settings and the train.judge overrides on top (shakespeare.yaml: longer than the baselines)
    OUT/comparison/    `onestep-lm report` on the flow and the generator under that judge (evaluation/report.py):
                       likelihood, judged samples, entropy, copying, speed; report.md, report.json, two PNGs
The judge is `train` by default (the stage above); or an AR run folder or hf:PATH_OR_NAME to judge with (no
judge stage then); or `none` (no judge stage and no comparison).
An existing OUT is refused unless --resume is given; with --resume, finished stages are kept and an
interrupted one continues from its newest checkpoint.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from .config import Config, config_from_dict, load_config
from .data import prepare_data
from .errors import DataError, RunError
from .evaluation.generator import evaluate_generator
from .evaluation.latents import encoded_latents, latent_stats
from .evaluation.likelihood import evaluate_likelihood, write_eval
from .evaluation.plots import plot_agreement_by_position, plot_latent_histogram, plot_training_curves
from .io import read_json, write_json, write_text_atomic
from .runs import check_new_run_dir, open_run, train_stage
from .sampling import sample_tokens


def default_config_path() -> Path:
    """The shipped CPU demo config (configs/shakespeare.yaml, packaged with the library)."""
    return Path(str(resources.files("onestep_lm") / "configs" / "shakespeare.yaml"))


def judge_config(cfg: Config) -> Config:
    """The judge's config: an AR model (model.ar) with train.judge's overrides on top of train.ar's."""
    raw = cfg.to_dict()
    raw["train"]["ar"] = {**raw["train"]["ar"], **raw["train"]["judge"]}
    return config_from_dict(raw)


def _stage(name: str, cfg: Config, out: Path, progress: bool) -> Path:
    """Train one stage (flow, generator or judge) into OUT/name; a finished one is kept, an interrupted one
    continues (only a --resume run can hold either: a new OUT is refused unless empty)."""
    if name == "judge":
        return train_stage("ar", judge_config(cfg), out / name, progress=progress)
    return train_stage(name, cfg, out / name, progress=progress, flow_dir=out / "flow")


def run_pipeline(config: str | Path | None = None, out: str | Path = "runs/demo", resume: bool = False,
                 overrides: list[str] | tuple[str, ...] = (), progress: bool = True, n_samples: int = 8,
                 judge: str = "train", judged_samples: int = 64) -> Path:
    out = Path(out)
    if not resume:
        check_new_run_dir(out)
    elif not out.is_dir():
        raise RunError(f"nothing to resume: {out} does not exist")
    cfg = load_config(config if config is not None else default_config_path(), overrides)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")

    flow_dir = _stage("flow", cfg, out, progress)
    gen_dir = _stage("generator", cfg, out, progress)
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
    if judge != "none":
        from .evaluation.report import build_report

        spec = str(_stage("judge", cfg, out, progress)) if judge == "train" else judge
        comparison = build_report([flow_dir, gen_dir], out / "comparison", judge=spec, n=judged_samples,
                                  progress=progress)
        compared = read_json(comparison.parent / "report.json")
        results["comparison"] = {"judge": spec, "report": str(comparison.relative_to(out)),
                                 "rows": compared["rows"], "data": compared["data"]}
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
    if "comparison" in results:
        c = results["comparison"]
        lines += ["## Samples under a judge", "",
                  f"Judge: {c['judge']}. The full comparison (every sampler setting, entropy, copying, speed, two "
                  f"plots): [{c['report']}]({c['report']}).", "",
                  "| model | sampler setting | judge bits/char | judge perplexity | unigram entropy (nats) |",
                  "|---|---|---|---|---|"]
        for row in c["rows"]:
            sm = row["samples"]
            lines.append(f"| {row['model']} | {row['setting']} | {sm['judge']['bits_per_char']:.3f} | "
                         f"{sm['judge']['gen_perplexity']:.2f} | {sm['unigram_entropy_nats']:.3f} |")
        d = c["data"]
        lines += [f"| validation text | - | {d['judge']['bits_per_char']:.3f} | {d['judge']['gen_perplexity']:.2f} | "
                  f"{d['unigram_entropy_nats']:.3f} |", "",
                  f"{c['rows'][0]['samples']['n']} samples per setting, seed {c['rows'][0]['samples']['seed']}.", ""]
    lines += ["## Samples", ""]
    for sampler, texts in results["samples"].items():
        lines += [f"### {sampler} (seed 0)", ""]
        lines += ["```"] + [t.replace("```", "'''") + "\n---" for t in texts] + ["```", ""]
    lines += ["## Configuration", "", "```yaml", yaml.safe_dump(results["config"], sort_keys=False).rstrip(),
              "```", ""]
    return "\n".join(lines)
