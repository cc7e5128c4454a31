"""The comparison report (`onestep-lm report`): one table over models and sampler settings, two plots, JSON.

For each run: the validation likelihood in bits per character (from RUN/eval.json, computed when missing;
"<=" marks a bound), and for each sampler setting (evaluation/sample_eval.py) the judge's NLL and perplexity,
unigram entropy, word validity, distinct-n, repetition and copying, and (evaluation/speed.py) latency at
batch 1 and throughput at batch 64. The data's own figures (validation windows of the same length) are a
row of the table. Plots:
    quality_vs_time.png        judge perplexity against latency, one point per sampler setting
    perplexity_vs_entropy.png  judge perplexity against unigram entropy over a temperature sweep per sampler
                               (tau for the flow's exact inverse), the data's entropy marked
Written to OUT: report.md, report.json and the two PNGs. Every figure states n and the seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..io import read_json, write_json, write_text_atomic  # noqa: E402
from ..runs import Run, open_run  # noqa: E402
from .judges import load_judge  # noqa: E402
from .likelihood import evaluate_likelihood, write_eval  # noqa: E402
from .sample_eval import (evaluate_samples, sampler_settings, sweep_settings,  # noqa: E402
                          write_sample_eval)
from .speed import bench_speed, format_speed  # noqa: E402

DEFAULT_SWEEP = (0.5, 0.8, 1.0)


def run_names(dirs: list[Path]) -> dict[str, str]:
    """Short unique names of run folders: the folder name, with its parent's when two share a name."""
    names = {}
    for d in dirs:
        name = d.name
        if sum(x.name == d.name for x in dirs) > 1:
            name = f"{d.parent.name}/{d.name}"
        names[str(d)] = name
    return names


def likelihood_of(run: Run, progress: bool = False) -> dict | None:
    """Validation likelihood from eval.json (computed and saved when missing); None for a generator, whose
    samples have no likelihood of their own (its flow's bound is in the flow's row)."""
    if run.kind == "generator":
        return None
    path = run.dir / "eval.json"
    if path.is_file():
        val = read_json(path).get("splits", {}).get("val")
        if val and "bits_per_char" in val:
            return val
    result = evaluate_likelihood(run, split="val", progress=progress)
    write_eval(run, result)
    return result


def build_report(run_dirs: list[str | Path], out: str | Path, judge: str, n: int = 64, seed: int = 0,
                 sweep: list[float] | tuple[float, ...] = DEFAULT_SWEEP, mdlm_steps: list[int] | None = None,
                 bench: str | Path | dict | None = None, batches: list[int] = (1, 64), rounds: int = 3,
                 device: str = "cpu", progress: bool = False) -> Path:
    """Evaluate, time and compare the runs; write OUT/report.md, report.json and the plots. Returns report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dirs = [Path(d) for d in run_dirs]
    names = run_names(dirs)
    runs = [open_run(d, device=device) for d in dirs]
    the_judge = load_judge(judge, device=device)
    L = min(r.config.data.seq_len for r in runs)

    if isinstance(bench, (str, Path)):
        speed = read_json(bench)
    elif isinstance(bench, dict):
        speed = bench
    else:
        speed = bench_speed(runs, batches=list(batches), length=L, rounds=rounds, mdlm_steps=mdlm_steps,
                            names=names)
    by_setting = {(str(Path(s["run"]).resolve()), s["setting"]): s for s in speed["settings"]}

    rows, sweeps, data_ref, likelihoods = [], [], None, {}
    for run in runs:
        name = names[str(run.dir)]
        likelihoods[name] = likelihood_of(run, progress)
        done = {}
        for setting in sampler_settings(run.kind, L, mdlm_steps):
            r = evaluate_samples(run, the_judge, setting, n=n, seed=seed, length=L)
            write_sample_eval(run, r)
            done[setting.label] = r
            data_ref = data_ref or r["data"]
            timing = by_setting.get((str(run.dir.resolve()), setting.label), {})
            rows.append({"model": name, "kind": run.kind, "setting": setting.label, "sampler": setting.sampler,
                         "steps": setting.steps, "likelihood": likelihoods[name], "samples": r,
                         "latency_s": timing.get("latency_s"),
                         "throughput_seq_per_s": timing.get("throughput_seq_per_s"),
                         "flops_per_sample": timing.get("flops_per_sample")})
        frontier = sweep_settings(run.kind, L, list(sweep))
        swept = {(f.sampler, f.steps) for f in frontier}  # the main settings of a swept sampler join its line
        frontier += [s for s in sampler_settings(run.kind, L, mdlm_steps)
                     if (s.sampler, s.steps) in swept and s.label not in {f.label for f in frontier}]
        for setting in frontier:
            r = done.get(setting.label) or evaluate_samples(run, the_judge, setting, n=n, seed=seed, length=L)
            done[setting.label] = r
            value = setting.tau if setting.sampler == "flow-inverse" else r["temperature"]
            sweeps.append({"model": name, "sampler": setting.sampler, "steps": setting.steps,
                           "temperature_or_tau": value, "setting": setting.label,
                           "gen_perplexity": r["judge"]["gen_perplexity"],
                           "unigram_entropy_nats": r["unigram_entropy_nats"]})

    caption = (f"{n} samples of {L} tokens per setting, seed {seed}; judge {the_judge.name}; data reference: "
               f"{n} validation windows of {L} tokens")
    plots = {"quality_vs_time": plot_quality_vs_time(rows, data_ref, caption, out / "quality_vs_time.png").name,
             "perplexity_vs_entropy": plot_frontier(sweeps, data_ref, caption,
                                                    out / "perplexity_vs_entropy.png").name}
    results = {"judge": the_judge.describe(), "n": n, "seed": seed, "length": L, "caption": caption,
               "runs": {names[str(r.dir)]: {"dir": str(r.dir), "kind": r.kind} for r in runs},
               "likelihood": likelihoods, "rows": rows, "data": data_ref, "sweep": sweeps,
               "sweep_values": list(sweep), "speed": speed, "plots": plots}
    write_json(out / "report.json", results)
    write_text_atomic(out / "report.md", render_markdown(results))
    return out / "report.md"


# ---- markdown --------------------------------------------------------------------------------------------
def _f(x, spec=".3f", prefix=""):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else prefix + format(x, spec)


def table_row(label: str, setting: str, likelihood: dict | None, s: dict, latency, throughput) -> str:
    bpc = _f(likelihood["bits_per_char"], ".4f", "<= " if likelihood["bound"] else "") if likelihood else "n/a"
    j, c = s["judge"], s["copying"]
    return (f"| {label} | {setting} | {bpc} | {_f(j['bits_per_token'], '.4f')} | {_f(j['gen_perplexity'], '.2f')} | "
            f"{_f(s['unigram_entropy_nats'])} | {_f(s.get('word_validity'))} | {_f(s['distinct_2'])} | "
            f"{_f(s['repetition_rate'])} | {_f(c['ngram_overlap_8'])} | {_f(c['longest_shared_mean'], '.1f')} / "
            f"{c['longest_shared_max']} | {_f(latency and latency * 1e3, '.1f')} | {_f(throughput, '.1f')} |")


def render_markdown(results: dict) -> str:
    speed = results["speed"]
    lb, tb = min(speed["batches"]), max(speed["batches"])
    lines = ["# Comparison report", "", results["caption"] + ".", "",
             "Likelihood: validation bits per character (\"<=\": an upper bound, the ELBO of a flow or MDLM; AR is "
             "exact; a generator's samples have no likelihood of their own). Judge: NLL of the samples re-tokenised "
             "by the judge, bits per judge token, and generative perplexity. Entropy: mean per-sample unigram "
             "entropy (nats). Word validity: interior whitespace-separated words found in the training text "
             "(character data). Copying: fraction of 8-grams found in the training split; longest substring "
             "shared with it (mean / max over samples, tokens).", "",
             f"| model | sampler | bits/char | judge bits/token | judge PPL | entropy | word validity | distinct-2 | "
             f"repetition | 8-grams in train | longest shared | latency ms (batch {lb}) | seq/s (batch {tb}) |",
             "|" + "---|" * 13]
    for row in results["rows"]:
        lines.append(table_row(row["model"], row["setting"], row["likelihood"], row["samples"], row["latency_s"],
                               row["throughput_seq_per_s"]))
    if results["data"]:
        lines.append(table_row("data", "validation windows", None, results["data"], None, None))
    lines += ["", f"![sample quality against sampling time]({results['plots']['quality_vs_time']})", "",
              f"![judge perplexity against entropy]({results['plots']['perplexity_vs_entropy']})", "",
              f"Temperature sweep (tau for the flow's exact inverse): {', '.join(map(str, results['sweep_values']))}; "
              f"{results['n']} samples per point, seed {results['seed']}.", "", "## Speed", "",
              f"Run on {speed['date']}; load average {speed['machine'].get('loadavg_1m_start', 'n/a')} at the start.",
              "", "```", format_speed(speed), "```", "", "## Examples (first sample of each setting)", ""]
    for row in results["rows"]:
        text = row["samples"]["examples"][0].replace("```", "'''")
        lines += [f"**{row['model']}: {row['setting']}**", "", "```", text, "```", ""]
    return "\n".join(lines)


# ---- plots -----------------------------------------------------------------------------------------------
def plot_quality_vs_time(rows: list[dict], data: dict | None, caption: str, out: Path) -> Path:
    """Judge perplexity against latency (batch 1), one point per setting; MDLM step counts joined by a line."""
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict = {}
    for row in rows:
        if row["latency_s"] is None:
            continue
        groups.setdefault((row["model"], row["sampler"]), []).append(row)
    for (model, sampler), items in groups.items():
        xs = [r["latency_s"] for r in items]
        ys = [r["samples"]["judge"]["gen_perplexity"] for r in items]
        ax.plot(xs, ys, "o-" if len(items) > 1 else "o", label=f"{model}: {sampler}")
        for r, x, y in zip(items, xs, ys):
            ax.annotate(r["setting"].replace(f"{sampler} ", ""), (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    if data:
        ax.axhline(data["judge"]["gen_perplexity"], color="k", ls="--", lw=1, label="real validation text")
    ax.set_xscale("log")
    ax.set_xlabel("latency for one sequence, s (log)")
    return _finish(fig, ax, caption, out)


def plot_frontier(sweeps: list[dict], data: dict | None, caption: str, out: Path) -> Path:
    """Judge perplexity against unigram entropy, one line per sampler over its temperature sweep."""
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict = {}
    for s in sweeps:
        groups.setdefault((s["model"], s["sampler"]), []).append(s)
    for (model, sampler), items in groups.items():
        items = sorted(items, key=lambda s: s["temperature_or_tau"])
        xs = [s["unigram_entropy_nats"] for s in items]
        ys = [s["gen_perplexity"] for s in items]
        ax.plot(xs, ys, "o-", label=f"{model}: {sampler}")
        key = "tau" if sampler == "flow-inverse" else "T"
        for s, x, y in zip(items, xs, ys):
            ax.annotate(f"{key}={s['temperature_or_tau']:g}", (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    if data:
        ax.axvline(data["unigram_entropy_nats"], color="k", ls="--", lw=1, label="entropy of real text")
        ax.plot([data["unigram_entropy_nats"]], [data["judge"]["gen_perplexity"]], "k*", ms=12,
                label="real validation text")
    ax.set_xlabel("mean per-sample unigram entropy, nats")
    return _finish(fig, ax, caption, out)


def _finish(fig, ax, caption: str, out: Path) -> Path:
    """What both plots share: a log judge-perplexity axis, the caption (n, seed), grid, legend, the PNG."""
    ax.set_yscale("log")
    ax.set_ylabel("judge perplexity of samples (log)")
    ax.set_title(caption, fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
