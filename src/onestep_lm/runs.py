"""Run folders: what a training run writes, and how a finished run is opened again.

A run folder holds
    run.json        the model kind, sizes, parameter count, library version, data description
    config.yaml     the full resolved config
    tokenizer.json  the tokenizer (character vocabularies are built from the training split)
    metrics.jsonl   training metrics, one JSON object per line
    checkpoints/    atomic checkpoints (see train/checkpoint.py)
    eval.json       written by `onestep-lm eval`
A folder that already exists is never overwritten: training into it needs --resume.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .config import Config, load_config
from .data import DataBundle, load_tokenizer, prepare_data
from .errors import RunError
from .io import read_json, write_json
from .models import build_model
from .train import distributed
from .train.checkpoint import has_file, load_weights, require_checkpoint
from .train.trainer import Trainer


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_new_run_dir(out: Path) -> None:
    """Refuse to write into a folder that already holds something (a run, or any user file)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a run" if (out / "run.json").is_file() else "files"
        raise RunError(f"{out} already exists and holds {what}; pass --resume to continue a run, "
                       "or choose another --out")


def saved_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml)")
    return load_config(path)


def train_run(kind: str, cfg: Config, out: Path, *, resume: bool = False, progress: bool = True,
              tensorboard: bool = False, context: dict | None = None, tokenizer=None) -> dict:
    """Train a model of `kind` into the run folder `out` (or continue it with resume=True).

    `context` carries what some models need beyond the config (the generator: its frozen flow), and the
    fields of it that identify a dependency are recorded in run.json (see build_model)."""
    out = Path(out)
    context = context or {}
    info, _ = distributed.setup(cfg.train.for_model(kind).device)  # joins torchrun's group, if launched by it
    is_main = info.main  # only the main process writes into the run folder
    if resume:
        meta = _read_meta(out)
        if meta["kind"] != kind:
            raise RunError(f"{out} is a {meta['kind']} run; cannot resume it as {kind}")
        tokenizer = load_tokenizer(out / "tokenizer.json")
        context = {**_load_context(meta), **context}
    else:
        check_new_run_dir(out)
    distributed.barrier(info)  # every process has looked at --out before the main one writes into it
    data = prepare_data(cfg.data, tokenizer=tokenizer)
    torch.manual_seed(cfg.train.seed)
    model, record = build_model(kind, cfg, data.tokenizer.vocab_size, **context)
    n_params = count_parameters(model)
    # the trainer checks what depends on the number of processes before anything is written
    trainer = Trainer(model, cfg.train.for_model(kind), data, out, progress=progress, tensorboard=tensorboard)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            cfg.save(out / "config.yaml")
            data.tokenizer.save(out / "tokenizer.json")
            write_json(out / "run.json", {
                "kind": kind, "version": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "vocab_size": data.tokenizer.vocab_size, "seq_len": data.seq_len, "parameters": n_params,
                "data": _describe(data), **record})
        print(f"{kind}: {n_params:,} trainable parameters; vocabulary {data.tokenizer.vocab_size}; "
              f"T={data.seq_len}; run folder {out}", file=sys.stderr)
    if resume and not trainer.resume() and is_main:
        print(f"no valid checkpoint in {out}; starting from step 0", file=sys.stderr)
    summary = trainer.fit()
    if is_main:
        write_json(out / "train_summary.json", summary)
    return summary


def _describe(data: DataBundle) -> dict:
    return {name: {"tokens": int(len(s.tokens)), "chars": int(s.chars)} for name, s in data.splits.items()}


def _read_meta(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run folder (no run.json)")
    try:
        return read_json(path)
    except ValueError:
        raise RunError(f"{path} is damaged (not valid JSON)") from None


@dataclass
class Run:
    """A trained run, opened for evaluation or sampling."""

    dir: Path
    kind: str
    meta: dict
    config: Config
    tokenizer: object
    model: nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def flow(self) -> nn.Module:
        """The flow of a flow run, or the frozen flow a generator stands on."""
        if self.kind == "flow":
            return self.model
        if self.kind == "generator":
            return self.model.flow
        raise RunError(f"a {self.kind} run has no flow to encode or decode with")


def open_run(run_dir: str | Path, device: str | torch.device = "cpu", ema: bool | None = None) -> Run:
    """Load a run folder: its config, tokenizer and the newest valid checkpoint's weights. When the run was
    trained with an EMA (train.ema), its averaged weights are the ones loaded (ema=False: the raw weights)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder not found: {run_dir}")
    meta = _read_meta(run_dir)
    cfg = saved_config(run_dir)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    model, _ = build_model(meta["kind"], cfg, meta["vocab_size"], **_load_context(meta))
    checkpoint = require_checkpoint(run_dir)
    if ema is None:
        ema = cfg.train.for_model(meta["kind"]).ema is not None and has_file(checkpoint, "ema.safetensors")
    elif ema and not has_file(checkpoint, "ema.safetensors"):
        raise RunError(f"the checkpoint {checkpoint} holds no EMA weights (the run was trained without train.ema)")
    weights = load_weights(checkpoint, "ema.safetensors" if ema else "model.safetensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise RunError(f"the checkpoint in {run_dir} does not fit its config: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return Run(run_dir, meta["kind"], meta, cfg, tokenizer, model)


def _load_context(meta: dict) -> dict:
    """What build_model needs besides the config, recovered from run.json (e.g. a generator's flow)."""
    if "flow" in meta:
        return {"flow_dir": meta["flow"]["path"], "expected_flow_sha256": meta["flow"]["weights_sha256"]}
    return {}


def generator_setup(cfg: Config, flow_dir: str | Path) -> tuple[Config, dict, object]:
    """A generator trains on its flow's data and tokenizer: the config with the flow run's `data` and
    `model.flow` sections, the build context, and the flow's tokenizer."""
    flow_dir = Path(flow_dir)
    flow_cfg = saved_config(flow_dir)
    merged = Config(data=flow_cfg.data, model=cfg.model, train=cfg.train)
    merged.model.flow = flow_cfg.model.flow
    return merged.validate(), {"flow_dir": flow_dir}, load_tokenizer(flow_dir / "tokenizer.json")


def train_stage(kind: str, cfg: Config, run_dir: Path, *, progress: bool = True,
                flow_dir: Path | None = None) -> Path:
    """Train one stage of a larger job (`onestep-lm run`, `onestep-lm sweep`) into `run_dir`: kept as it is when
    its training has finished (train_summary.json), continued from its newest checkpoint when it was interrupted
    (run.json without a summary), else trained anew. A generator stands on the flow in `flow_dir`."""
    run_dir = Path(run_dir)
    if (run_dir / "train_summary.json").is_file():
        print(f"{run_dir}: already trained; kept", file=sys.stderr)
        return run_dir
    context, tokenizer = {}, None
    if kind == "generator":
        cfg, context, tokenizer = generator_setup(cfg, flow_dir)
    train_run(kind, cfg, run_dir, resume=(run_dir / "run.json").is_file(), progress=progress, context=context,
              tokenizer=tokenizer)
    return run_dir
