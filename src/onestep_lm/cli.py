"""The `onestep-lm` command line (also `python -m onestep_lm`). Argument parsing only: each subcommand calls
one function elsewhere. Errors a user can fix print one line and exit with status 2 (a traceback with --debug).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

from .errors import OnestepError


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (default: the built-in defaults)")
    p.add_argument("--out", type=Path, required=True, help="run folder to create (or continue with --resume)")
    p.add_argument("--data", type=Path, help="train on this plain-text file (split 90/5/5 by position)")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="write a checkpoint every N steps (override train.checkpoint_every)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set model.flow.blocks=6 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (optional extra)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config_for(args, kind: str):
    from .config import load_config
    from .runs import saved_config

    overrides = list(args.overrides)
    if args.data is not None:
        overrides += ["data.source=text", f"data.path={args.data}"]
    for flag, key in (("max_steps", "max_steps"), ("seed", "seed"), ("checkpoint_every", "checkpoint_every")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"train.{kind}.{key}={value}" if key == "max_steps" else f"train.{key}={value}")
    if args.resume and (args.out / "config.yaml").is_file():
        saved = saved_config(args.out)
        if args.config is not None and load_config(args.config).to_dict() != saved.to_dict():
            raise OnestepError(f"--config {args.config} differs from the config saved in {args.out}; "
                               "a resumed run keeps its config (change single keys with --set)")
        return load_config(None, overrides, base=saved)
    return load_config(args.config, overrides)


def cmd_train(args) -> None:
    from .runs import generator_setup, train_run

    cfg = _config_for(args, args.kind)
    context, tokenizer = {}, None
    if args.kind == "generator" and not args.resume:
        if args.flow is None:
            raise OnestepError("train generator needs --flow RUN, the trained flow's run folder")
        cfg, context, tokenizer = generator_setup(cfg, args.flow)
    summary = train_run(args.kind, cfg, args.out, resume=args.resume, progress=not args.no_progress,
                        tensorboard=args.tensorboard, context=context, tokenizer=tokenizer)
    if _rank() == 0:  # under torchrun, one summary
        print(json.dumps(summary))
    from .train import distributed

    distributed.finish()  # under torchrun: leave the process group together, before the interpreter exits


def cmd_eval(args) -> None:
    from .evaluation.generator import evaluate_generator, format_generator
    from .evaluation.likelihood import evaluate_likelihood, format_likelihood, write_eval
    from .runs import open_run

    run = open_run(args.run, device=args.device)
    if args.judge is not None:
        return _eval_samples(run, args)
    if args.samples is not None:
        raise OnestepError("--samples N is the number of judged samples and needs --judge; the importance "
                           "samples of a likelihood bound are --iw-samples")
    if run.kind == "generator":
        result = evaluate_generator(run, split=args.split, seed=args.seed, batch_size=args.batch_size,
                                    progress=not args.no_progress)
        text = format_generator(result)
    else:
        result = evaluate_likelihood(run, split=args.split, samples=args.iw_samples, seed=args.seed,
                                     batch_size=args.batch_size, progress=not args.no_progress)
        text = format_likelihood(result)
    write_eval(run, result)
    print(text)
    print(f"wrote {run.dir / 'eval.json'}")


def _eval_samples(run, args) -> None:
    from .evaluation.judges import load_judge
    from .evaluation.sample_eval import Setting, evaluate_samples, format_samples, write_sample_eval
    from .sampling import default_sampler

    sampler = args.sampler or default_sampler(run.kind)
    steps = args.steps if args.steps is not None or sampler != "mdlm" else (args.length or run.config.data.seq_len)
    setting = Setting(sampler, steps, args.temperature, args.tau)
    result = evaluate_samples(run, load_judge(args.judge, device=args.device), setting,
                              n=64 if args.samples is None else args.samples, seed=args.seed, length=args.length,
                              batch_size=args.batch_size or 64)
    write_sample_eval(run, result)
    print(format_samples(result))
    print(f"wrote {run.dir / 'eval.json'} (samples: {result['setting']!r})")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_bench_speed(args) -> None:
    from .evaluation.speed import bench_speed, format_speed
    from .io import write_json
    from .runs import open_run

    runs = [open_run(d, device=args.device) for d in args.runs]
    result = bench_speed(runs, batches=args.batch, length=args.length, rounds=args.rounds, warmup=args.warmup,
                         mdlm_steps=args.mdlm_steps, progress=not args.no_progress)
    print(format_speed(result))
    if args.out is not None:
        write_json(args.out, result)
        print(f"wrote {args.out}")


def cmd_report(args) -> None:
    from .evaluation.report import build_report

    path = build_report(args.runs, args.out, judge=args.judge, n=args.samples, seed=args.seed, sweep=args.sweep,
                        mdlm_steps=args.mdlm_steps, bench=args.bench, batches=args.batch, rounds=args.rounds,
                        device=args.device, progress=not args.no_progress)
    print(f"report: {path}")


def cmd_sample(args) -> None:
    from .io import write_text_atomic
    from .runs import open_run
    from .sampling import sample_tokens

    run = open_run(args.run, device=args.device)
    info: dict = {}
    tokens = sample_tokens(run, args.n, sampler=args.sampler, seed=args.seed, tau=args.tau,
                           temperature=args.temperature, steps=args.steps, top_k=args.top_k, top_p=args.top_p,
                           tol=args.tol, max_sweeps=args.max_sweeps, info=info)
    if "sweeps" in info:
        print(f"flow-jacobi: sweeps per block (block K first, at most {run.config.data.seq_len} each): "
              f"{info['sweeps']}", file=sys.stderr)
    texts = [run.tokenizer.decode(t.tolist()) for t in tokens]
    if args.out is not None:
        write_text_atomic(args.out, "".join(json.dumps({"text": t, "seed": args.seed, "index": i}) + "\n"
                                            for i, t in enumerate(texts)))
    for i, text in enumerate(texts):
        print(f"--- sample {i}\n{text}")


def cmd_run(args) -> None:
    from .pipeline import run_pipeline

    report = run_pipeline(config=args.config, out=args.out, resume=args.resume, overrides=args.overrides,
                          progress=not args.no_progress, judge=args.judge, judged_samples=args.samples)
    print(f"report: {report}")


def cmd_sweep(args) -> None:
    from .pipeline import default_config_path
    from .sweep import run_sweep

    path = run_sweep(args.config or default_config_path(), args.out, weights=args.weights,
                     fractions=args.prior_fractions, overrides=args.overrides, judge=args.judge, n=args.samples,
                     seed=args.seed, progress=not args.no_progress)
    print(f"sweep: {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onestep-lm", description="One-step language generation.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train a model",
        description="Train a model into a run folder. The same command runs on several processes under "
                    "`torchrun --nproc_per_node N -m onestep_lm train ...` (gloo on CPU, NCCL on GPU) with the "
                    "config's global batch and learning rate; only rank 0 writes. --resume continues a killed "
                    "run from its newest valid checkpoint.")
    kinds = train.add_subparsers(dest="kind", required=True)
    for kind, text in (("flow", "Stage A: the TarFlow text encoder"),
                       ("generator", "Stage B: the one-step generator on a trained flow (--flow)"),
                       ("ar", "baseline: autoregressive transformer"),
                       ("mdlm", "baseline: masked diffusion language model")):
        p = kinds.add_parser(kind, help=text)
        _add_train_args(p)
        if kind == "generator":
            p.add_argument("--flow", type=Path, help="the trained flow's run folder (not needed with --resume)")
        p.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="likelihood of a split; writes RUN/eval.json")
    ev.add_argument("--run", type=Path, required=True)
    ev.add_argument("--split", default="val", choices=("train", "val", "test"))
    ev.add_argument("--iw-samples", type=int, default=1,
                    help="importance samples of a likelihood bound (S > 1: the tighter IW bound)")
    ev.add_argument("--judge", help="instead of the likelihood, judge samples: an AR run folder, or "
                                    "hf:PATH_OR_NAME (a local transformers causal LM; extra onestep-lm[hf])")
    ev.add_argument("--samples", type=int, help="with --judge: the number of samples drawn and judged (default 64)")
    ev.add_argument("--sampler", help="with --judge: the sampler (default: the run's first, see `sample`)")
    ev.add_argument("--steps", type=int, help="with --judge: mdlm denoising steps (default: the sequence length)")
    ev.add_argument("--temperature", type=float, help="with --judge: softmax temperature (default as `sample`)")
    ev.add_argument("--tau", type=float, default=1.0, help="with --judge: prior scale, z ~ N(0, tau^2 I)")
    ev.add_argument("--length", type=int, help="with --judge: sample length (default: the run's seq_len)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_eval)

    sa = sub.add_parser("sample", help="draw texts from a run")
    sa.add_argument("--run", type=Path, required=True)
    sa.add_argument("-n", type=int, default=4)
    sa.add_argument("--sampler", help="onestep | flow-inverse | flow-jacobi (generator runs); flow-inverse | "
                                      "flow-jacobi (flow runs); ar (AR runs); mdlm (MDLM runs). Default: the "
                                      "first of these for the run")
    sa.add_argument("--tol", type=float, default=1e-4,
                    help="flow-jacobi: a block's sweeps stop when no entry moved by more than this")
    sa.add_argument("--max-sweeps", type=int, help="flow-jacobi: sweeps per block at most (default T: exact)")
    sa.add_argument("--tau", type=float, default=1.0, help="prior temperature: z ~ N(0, tau^2 I)")
    sa.add_argument("--temperature", type=float,
                    help="softmax temperature of the token draws (0: argmax; draws are float64). "
                         "Default 0 for onestep, 1 for ar and mdlm")
    sa.add_argument("--steps", type=int, help="mdlm: number of denoising steps (default: the sequence length)")
    sa.add_argument("--top-k", type=int, help="ar: keep the k most probable tokens")
    sa.add_argument("--top-p", type=float, help="ar: nucleus sampling")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--out", type=Path, help="also write the samples as JSON lines")
    sa.add_argument("--device", default="cpu")
    sa.set_defaults(func=cmd_sample)

    rn = sub.add_parser("run", help="the main job: train, evaluate, sample, report")
    rn.add_argument("--config", type=Path, help="YAML config (default: configs/shakespeare.yaml's settings)")
    rn.add_argument("--out", type=Path, default=Path("runs/demo"))
    rn.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    rn.add_argument("--resume", action="store_true")
    rn.add_argument("--judge", default="train",
                    help="train (default: train an AR judge as a stage, model.ar with train.judge overrides), an AR "
                         "run folder, hf:PATH_OR_NAME, or none (no comparison report)")
    rn.add_argument("--samples", type=int, default=64, help="samples judged per sampler setting (default 64)")
    rn.add_argument("--no-progress", action="store_true")
    rn.set_defaults(func=cmd_run)

    sw = sub.add_parser("sweep", help="the transport trade-off: flows at several transport weights, generators "
                                      "with and without prior pairs, one table and plot")
    sw.add_argument("--config", type=Path, help="YAML config (default: configs/shakespeare.yaml's settings)")
    sw.add_argument("--out", type=Path, required=True, help="the sweep's folder (finished stages are kept)")
    sw.add_argument("--weights", type=_float_list, required=True,
                    help="transport weights beta, comma-separated, e.g. 0,0.1,0.3,1")
    sw.add_argument("--prior-fractions", type=_float_list, default=[0.0],
                    help="prior-pair fractions of the generators trained on each flow, e.g. 0,0.5 (default 0)")
    sw.add_argument("--judge", help="also judge one-step samples: an AR run folder, or hf:PATH_OR_NAME")
    sw.add_argument("--samples", type=int, default=64, help="with --judge: samples judged per row")
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sw.add_argument("--no-progress", action="store_true")
    sw.set_defaults(func=cmd_sweep)

    be = sub.add_parser("bench", help="benchmarks")
    benches = be.add_subparsers(dest="bench_command", required=True)
    sp = benches.add_parser("speed", help="time whole-sequence generation of every sampler of the runs")
    sp.add_argument("--runs", type=Path, nargs="+", required=True)
    sp.add_argument("--batch", type=_int_list, default=[1, 64],
                    help="batch sizes: latency at the smallest, throughput at the largest (default 1,64)")
    sp.add_argument("--length", type=int, help="sequence length (default: the shortest seq_len of the runs)")
    sp.add_argument("--rounds", type=int, default=5, help="timed rounds (medians are reported)")
    sp.add_argument("--warmup", type=int, default=1, help="untimed calls of every setting first")
    sp.add_argument("--mdlm-steps", type=_int_list, help="MDLM step counts (default 1,4,16,... and the length)")
    sp.add_argument("--out", type=Path, help="write the results as JSON")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_bench_speed)

    rp = sub.add_parser("report", help="compare runs: likelihood, judged samples, entropy, copying, speed")
    rp.add_argument("--runs", type=Path, nargs="+", required=True)
    rp.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json and the plots")
    rp.add_argument("--judge", required=True, help="an AR run folder, or hf:PATH_OR_NAME")
    rp.add_argument("--samples", type=int, default=64, help="samples judged per sampler setting")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--sweep", type=_float_list, default=[0.5, 0.8, 1.0],
                    help="temperatures (tau for the flow's inverse) of the entropy frontier; empty: none")
    rp.add_argument("--mdlm-steps", type=_int_list, help="MDLM step counts (default 1,4,16,... and the length)")
    rp.add_argument("--bench", type=Path, help="use this `bench speed --out` JSON instead of timing again")
    rp.add_argument("--batch", type=_int_list, default=[1, 64])
    rp.add_argument("--rounds", type=int, default=3)
    rp.add_argument("--device", default="cpu")
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=cmd_report)
    return parser


def _rank() -> int:
    """This process's rank under torchrun (0 when run alone)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"onestep-lm: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    formatwarning = warnings.formatwarning
    if not args.debug:
        warnings.formatwarning = _one_line_warning  # e.g. a damaged checkpoint skipped: one line naming it
    try:
        args.func(args)
    except OnestepError as e:
        if args.debug:
            traceback.print_exc()
        where = f" (rank {_rank()})" if _rank() else ""
        print(f"onestep-lm: error{where}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder without write permission: the system's own message
        if args.debug:
            traceback.print_exc()
        print(f"onestep-lm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onestep-lm: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
    return 0


if __name__ == "__main__":
    sys.exit(main())
