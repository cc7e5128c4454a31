"""The one training loop. Every model plugs in by its forward pass: model(x, noise=None) -> (loss, metrics),
and may define before_step(step, seed), called on every process before each training step.

AdamW with warmup and cosine decay, gradient clipping, optional bf16 autocast, torch.compile and an EMA of the
weights, skipping of non-finite losses (counted; the run stops after `max_nonfinite` in a row and keeps its
last good checkpoint), periodic validation, metrics as JSON lines (and TensorBoard on request), a tqdm bar,
atomic checkpoints and exact resume (the data order, schedule, noise and RNG states are restored).

Under torchrun the global batch is the config's whatever the number of processes N: every process draws the
same global batch of windows (from a generator seeded by train.seed) and trains on its own slice of it, with
gradient accumulation when `micro_batch_size` is smaller than that slice. The models' noise (the flow's u, the
generator's u, MDLM's times and masks) is a function of the global sample index: each step draws a noise seed
from the same generator, and every process and micro-batch draws the noise of the whole global batch and keeps
its slice (nn/noise.py). Losses are means over tokens, micro-batches are equal in size and DDP averages the
gradients, so N processes and any micro-batch size take the same steps as one process with the whole batch
(up to the order of float sums). Only dropout draws from the per-process torch RNG.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import TrainConfig
from ..data import DataBundle, eval_windows, random_windows
from ..errors import ConfigError, RunError, TrainingError
from ..io import write_text_atomic
from ..nn.noise import BatchNoise
from . import distributed
from .checkpoint import (has_file, latest_checkpoint, list_checkpoints, load_state, load_weights,
                         save_checkpoint)
from .ema import EMA


def lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at the end of the run: at
    cfg.max_steps, or, with a time budget (cfg.max_minutes), at whichever of the two budgets runs out first
    (the decay follows the larger of the fractions of steps and of time used)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.max_minutes is not None:
        progress = max(progress, elapsed / (60 * cfg.max_minutes))
    progress = min(1.0, progress)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices of linear layers only (not on norms, biases, codebooks, positions)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


def takes_noise(model: nn.Module) -> bool:
    """Whether the model's forward accepts the trainer's `noise` (a model without noise may omit it)."""
    params = inspect.signature(model.forward).parameters
    return "noise" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@torch.no_grad()
def validation_metrics(model: nn.Module, tokens, seq_len: int, batch_size: int, max_batches: int | None,
                       seed: int, info: distributed.Dist | None = None) -> dict[str, float]:
    """The training loss and metrics averaged (per token) over the first `max_batches` batches of evaluation
    windows. Batch i's noise is seeded by (seed, i) alone, so the figure does not depend on the number of
    processes: under torchrun the batches are shared out between them and the sums gathered. The training RNG
    is left untouched."""
    info = info or distributed.Dist()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    count = 0
    for i, x in enumerate(eval_windows(tokens, seq_len, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        if i % info.world != info.rank:
            continue
        kwargs = {"noise": BatchNoise(seed * 1_000_003 + i)} if takes_noise(model) else {}
        loss, metrics = model(x.to(device), **kwargs)
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * x.numel()
        count += x.numel()
    model.train(was_training)
    total: dict[str, float] = {}
    n = 0
    for part_sums, part_count in distributed.gather_objects((sums, count), info):
        for k, v in part_sums.items():
            total[k] = total.get(k, 0.0) + v
        n += part_count
    return {f"val_{k}": v / max(n, 1) for k, v in total.items()}


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, data: DataBundle, run_dir: Path, *,
                 progress: bool = True, tensorboard: bool = False):
        self.cfg, self.data, self.run_dir = cfg, data, Path(run_dir)
        self.dist, self.device = distributed.setup(cfg.device)
        if cfg.batch_size % self.dist.world:
            raise ConfigError(f"config key train.batch_size: {cfg.batch_size} is not divisible by the "
                              f"{self.dist.world} processes")
        self.local_batch = cfg.batch_size // self.dist.world
        self.micro = cfg.micro_batch_size or self.local_batch
        if self.local_batch % self.micro:
            raise ConfigError(f"config key train.micro_batch_size: {self.micro} must divide the per-process "
                              f"batch {self.local_batch} (train.batch_size {cfg.batch_size} over "
                              f"{self.dist.world} processes)")
        self.accum = self.local_batch // self.micro
        self.model = model.to(self.device)
        self.takes_noise = takes_noise(self.model)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema else None
        if self.dist.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net: nn.Module = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.net = self.model
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                     betas=tuple(cfg.betas))
        self.step, self.elapsed, self.nonfinite_total, self.nonfinite_run = 0, 0.0, 0, 0
        self.saved_step: int | None = None
        self.data_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every process
        torch.manual_seed(cfg.seed + 1000 * self.dist.rank)  # dropout only (model noise: see _train_step)
        self.progress = progress and self.dist.main
        self.tb = None
        if tensorboard and self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the optional extra: pip install 'onestep-lm[tensorboard]'")
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    # ---- state ------------------------------------------------------------------------------------------
    def _rng_state(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def state(self) -> dict:
        """Everything --resume needs besides the weights (every process must call it: RNG states are gathered)."""
        rngs = distributed.gather_objects(self._rng_state(), self.dist)
        return {"step": self.step, "elapsed": self.elapsed, "optimizer": self.opt.state_dict(),
                "data_gen": self.data_gen.get_state(), "torch_rng": rngs[0]["cpu"], "rng_by_rank": rngs,
                "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
                "world": self.dist.world, "ema_updates": self.ema.updates if self.ema else None}

    def resume(self) -> bool:
        """Continue from the newest valid checkpoint of the run folder; False when there is none. The main
        process picks it (damaged ones are skipped with a warning naming them) and every process loads it."""
        found = (latest_checkpoint(self.run_dir), len(list_checkpoints(self.run_dir))) if self.dist.main else None
        path, n_found = distributed.broadcast_object(found, self.dist)
        if path is None and n_found:
            raise RunError(f"all {n_found} checkpoints in {self.run_dir / 'checkpoints'} are damaged; refusing to "
                           "start the run over on top of them (move them away to start from step 0)")
        if path is None:
            return False
        self.model.load_state_dict(load_weights(path))
        state = load_state(path)
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.nonfinite_total, self.nonfinite_run = state["nonfinite_total"], state["nonfinite_run"]
        self.data_gen.set_state(state["data_gen"])
        rngs = state.get("rng_by_rank")
        if rngs is not None and len(rngs) == self.dist.world:
            self._set_rng_state(rngs[self.dist.rank])
        elif self.dist.main:
            torch.set_rng_state(state["torch_rng"])
        if self.ema is not None:
            if has_file(path, "ema.safetensors"):
                self.ema.load(load_weights(path, "ema.safetensors"), state.get("ema_updates") or 0)
            else:
                self.ema = EMA(self.model, self.cfg.ema)
                if self.dist.main:
                    warnings.warn(f"checkpoint {path} holds no EMA weights; the EMA starts from its weights",
                                  stacklevel=2)
        self.saved_step = self.step
        if self.dist.main:
            self._truncate_log(self.step)
        return True

    def _truncate_log(self, step: int) -> None:
        """Drop metric lines written after the checkpoint we resume from (a killed run may have logged them)."""
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except ValueError:  # a line cut short by the kill
                    pass
            write_text_atomic(path, "".join(line + "\n" for line in keep))

    def save(self) -> None:
        """A checkpoint of the current step (written by the main process; every process must call this)."""
        if self.saved_step == self.step:
            return
        state = self.state()
        if self.dist.main:
            weights = self.model.state_dict()
            if all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
                extra = {"ema.safetensors": self.ema.weights(self.model)} if self.ema is not None else None
                save_checkpoint(self.run_dir, self.step, weights, state, self.cfg.keep_last, extra=extra)
            else:
                warnings.warn(f"step {self.step}: the weights are not finite; no checkpoint written (the last "
                              f"good one is kept)", stacklevel=2)
        distributed.barrier(self.dist)
        self.saved_step = self.step

    # ---- the loop ---------------------------------------------------------------------------------------
    def _autocast(self):
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _global_batch(self) -> tuple[torch.Tensor, int]:
        """This process's slice of the step's global batch of windows, and the step's noise seed (both drawn
        from the data generator, the same on every process)."""
        x = random_windows(self.data.splits["train"].tokens, self.data.seq_len, self.cfg.batch_size, self.data_gen)
        noise_seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.data_gen))
        r = self.dist.rank
        return x[r * self.local_batch:(r + 1) * self.local_batch].to(self.device), noise_seed

    def _local_batch(self) -> torch.Tensor:
        return self._global_batch()[0]

    def _train_step(self) -> tuple[float | None, dict]:
        """One optimizer step over the global batch; (None, {}) when the loss or the gradient norm was not
        finite on any process (the step is skipped everywhere, the weights untouched)."""
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.cfg, self.elapsed)
        prepare = getattr(self.model, "before_step", None)
        if prepare is not None:  # e.g. the generator's prior-pair pool (models/generator.py)
            prepare(self.step, self.cfg.seed)
        x, noise_seed = self._global_batch()
        offset = self.dist.rank * self.local_batch
        sums, keys = None, None
        for i, micro in enumerate(x.split(self.micro)):
            last = i == self.accum - 1
            ctx = self.net.no_sync() if self.dist.active and not last else contextlib.nullcontext()
            noise = BatchNoise(noise_seed, offset + i * self.micro, self.cfg.batch_size)
            with ctx:
                with self._autocast():
                    loss, metrics = self.net(micro, noise=noise) if self.takes_noise else self.net(micro)
                (loss / self.accum).backward()
            keys = ["loss", *metrics]
            values = torch.stack([torch.as_tensor(v, device=self.device).detach().float().reshape(())
                                  for v in (loss, *metrics.values())])
            sums = values if sums is None else sums + values
        means = distributed.mean(sums / self.accum, self.dist)
        for p in getattr(self.model, "frozen_parameters", lambda step: [])(self.step):
            p.grad = None  # progressive freezing (model.flow.freeze_schedule): no update, momentum or decay
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if not (torch.isfinite(means[0]) and torch.isfinite(grad_norm)):
            self.opt.zero_grad(set_to_none=True)
            return None, {}
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        out = dict(zip(keys, means.tolist()))
        out["grad_norm"] = float(grad_norm)
        return out.pop("loss"), out

    def _out_of_time(self) -> bool:
        """Whether the time budget is spent; the processes first agree on the elapsed time (the slowest's),
        so that they stop together and follow the same time-based learning-rate schedule."""
        if self.cfg.max_minutes is None:
            return False
        self.elapsed = distributed.maximum(self.elapsed, self.dist, self.device)
        return self.elapsed >= 60 * self.cfg.max_minutes

    def fit(self) -> dict:
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * self.data.seq_len
        log_path = self.run_dir / "metrics.jsonl"
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.progress, desc="train",
                   dynamic_ncols=True)
        last, stopped = {}, "max_steps"
        self.model.train()
        while self.step < cfg.max_steps:
            if self._out_of_time():
                stopped = "max_minutes"
                break
            t0 = time.perf_counter()
            loss, metrics = self._train_step()
            self.elapsed += time.perf_counter() - t0
            if loss is None:
                self.nonfinite_total += 1
                self.nonfinite_run += 1
                if self.nonfinite_run >= cfg.max_nonfinite:
                    bar.close()
                    kept = latest_checkpoint(self.run_dir) if self.dist.main else None
                    raise TrainingError(
                        f"{self.nonfinite_run} non-finite losses in a row at step {self.step} "
                        f"({self.nonfinite_total} in all); stopping. "
                        + (f"The last good checkpoint is kept: {kept}" if kept is not None else
                           "No checkpoint was written before it")
                        + " (lower train.lr or enable train.grad_clip)")
                continue
            self.nonfinite_run = 0
            self.step += 1
            bar.update(1)
            last = {"step": self.step, "loss": loss}
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                last.update(lr=self.opt.param_groups[0]["lr"], elapsed_s=round(self.elapsed, 3),
                            tokens_per_s=round(tokens_per_step * self.step / max(self.elapsed, 1e-9), 1),
                            nonfinite=self.nonfinite_total, **metrics)
                bar.set_postfix(loss=f"{loss:.4f}")
            if cfg.eval_every and self.step % cfg.eval_every == 0 and "val" in self.data.splits:
                last.update(self.validate())
            if len(last) > 2:
                self._log(log_path, last)
            if self.step % cfg.checkpoint_every == 0:
                self.save()
        bar.close()
        if "val" in self.data.splits and "val_loss" not in last:
            val = self.validate()
            last.update(val)
            self._log(log_path, {"step": self.step, **val})
        self.save()
        if self.tb is not None:
            self.tb.close()
        return {**last, "step": self.step, "stopped": stopped, "elapsed_s": round(self.elapsed, 3),
                "tokens_per_s": round(tokens_per_step * self.step / max(self.elapsed, 1e-9), 1),
                "nonfinite": self.nonfinite_total, "processes": self.dist.world}

    def validate(self) -> dict[str, float]:
        """Validation metrics (on the EMA weights when train.ema is set); every process must call this."""
        if "val" not in self.data.splits:
            return {}
        ctx = self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()
        with ctx:
            return validation_metrics(self.model, self.data.splits["val"].tokens, self.data.seq_len,
                                      self.cfg.batch_size, self.cfg.eval_batches, self.cfg.seed, self.dist)

    def _log(self, path: Path, record: dict) -> None:
        if not self.dist.main:
            return
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
