"""The `onestep-lm` command line (also `python -m onestep_lm`). Argument parsing only: each subcommand calls
one function elsewhere. Errors a user can fix print one line and exit with status 2 (a traceback with --debug).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from .errors import OnestepError


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (default: the built-in defaults)")
    p.add_argument("--out", type=Path, required=True, help="run folder to create (or continue with --resume)")
    p.add_argument("--data", type=Path, help="train on this plain-text file (split 90/5/5 by position)")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--checkpoint-every", type=int, help="override train.checkpoint_every")
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
        cfg, context, tokenizer = generator_setup(cfg, args.flow)
    summary = train_run(args.kind, cfg, args.out, resume=args.resume, progress=not args.no_progress,
                        tensorboard=args.tensorboard, context=context, tokenizer=tokenizer)
    print(json.dumps(summary))


def cmd_eval(args) -> None:
    from .evaluation.generator import evaluate_generator, format_generator
    from .evaluation.likelihood import evaluate_likelihood, format_likelihood, write_eval
    from .runs import open_run

    run = open_run(args.run, device=args.device)
    if run.kind == "generator":
        result = evaluate_generator(run, split=args.split, seed=args.seed, batch_size=args.batch_size,
                                    progress=not args.no_progress)
        text = format_generator(result)
    else:
        result = evaluate_likelihood(run, split=args.split, samples=args.samples, seed=args.seed,
                                     batch_size=args.batch_size, progress=not args.no_progress)
        text = format_likelihood(result)
    write_eval(run, result)
    print(text)
    print(f"wrote {run.dir / 'eval.json'}")


def cmd_sample(args) -> None:
    from .io import write_text_atomic
    from .runs import open_run
    from .sampling import sample_tokens

    run = open_run(args.run, device=args.device)
    tokens = sample_tokens(run, args.n, sampler=args.sampler, seed=args.seed, tau=args.tau,
                           temperature=args.temperature, steps=args.steps, top_k=args.top_k, top_p=args.top_p)
    texts = [run.tokenizer.decode(t.tolist()) for t in tokens]
    if args.out is not None:
        write_text_atomic(args.out, "".join(json.dumps({"text": t, "seed": args.seed, "index": i}) + "\n"
                                            for i, t in enumerate(texts)))
    for i, text in enumerate(texts):
        print(f"--- sample {i}\n{text}")


def cmd_run(args) -> None:
    from .pipeline import run_pipeline

    report = run_pipeline(config=args.config, out=args.out, resume=args.resume, overrides=args.overrides,
                          progress=not args.no_progress)
    print(f"report: {report}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onestep-lm", description="One-step language generation.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model")
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
    ev.add_argument("--samples", type=int, default=1, help="importance samples (S > 1: the tighter IW bound)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_eval)

    sa = sub.add_parser("sample", help="draw texts from a run")
    sa.add_argument("--run", type=Path, required=True)
    sa.add_argument("-n", type=int, default=4)
    sa.add_argument("--sampler", help="onestep | flow-inverse (generator runs); flow-inverse (flow runs); "
                                      "ar (AR runs); mdlm (MDLM runs). Default: the first of these for the run")
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
    rn.add_argument("--no-progress", action="store_true")
    rn.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except OnestepError as e:
        if args.debug:
            traceback.print_exc()
        print(f"onestep-lm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onestep-lm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
