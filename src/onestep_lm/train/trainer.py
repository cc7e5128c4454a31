"""The one training loop. Every model plugs in by its forward pass: model(x) -> (loss, metrics).

AdamW with warmup and cosine decay, gradient clipping, optional bf16 autocast and torch.compile, skipping of
non-finite losses (counted; the run stops after `max_nonfinite` in a row and keeps its last good checkpoint),
periodic validation, metrics as JSON lines (and TensorBoard on request), a tqdm bar, atomic checkpoints and
exact resume (the data order, schedule and RNG state are restored). Under torchrun the global batch is the
config's whatever the number of processes: every process draws the same global batch of windows and trains on
its own slice of it, with gradient accumulation when `micro_batch_size` is smaller than that slice.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import TrainConfig
from ..data import DataBundle, eval_windows, random_windows
from ..errors import ConfigError, TrainingError
from . import distributed
from .checkpoint import latest_checkpoint, load_state, load_weights, save_checkpoint



def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices of linear layers only (not on norms, biases, codebooks, positions)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


@torch.no_grad()
def validation_metrics(model: nn.Module, tokens, seq_len: int, batch_size: int, max_batches: int | None,
                       seed: int) -> dict[str, float]:
    """The training loss and metrics averaged (per token) over the first `max_batches` batches of evaluation
    windows, with the model's noise seeded and the training RNG left untouched."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    count = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i, x in enumerate(eval_windows(tokens, seq_len, batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            loss, metrics = model(x.to(device))
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * x.numel()
            count += x.numel()
    model.train(was_training)
    return {f"val_{k}": v / max(count, 1) for k, v in sums.items()}


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, data: DataBundle, run_dir: Path, *,
                 progress: bool = True, tensorboard: bool = False):
        self.cfg, self.data, self.run_dir = cfg, data, Path(run_dir)
        self.dist, self.device = distributed.setup(cfg.device)
        if cfg.batch_size % self.dist.world:
            raise ConfigError(f"config key train.batch_size: {cfg.batch_size} is not divisible by the "
                              f"{self.dist.world} processes")
        self.local_batch = cfg.batch_size // self.dist.world
        micro = cfg.micro_batch_size or self.local_batch
        if self.local_batch % micro:
            raise ConfigError(f"config key train.micro_batch_size: {micro} must divide the per-process batch "
                              f"{self.local_batch}")
        self.accum = self.local_batch // micro
        self.model = model.to(self.device)
        self.net: nn.Module = DistributedDataParallel(self.model) if self.dist.active else self.model
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                     betas=tuple(cfg.betas))
        self.step, self.elapsed, self.nonfinite_total, self.nonfinite_run = 0, 0.0, 0, 0
        self.data_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every process
        torch.manual_seed(cfg.seed + 1000 * self.dist.rank)  # model noise, per process
        self.progress = progress and self.dist.main
        self.tb = None
        if tensorboard and self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the optional extra: pip install 'onestep-lm[tensorboard]'")
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    # ---- state ------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "elapsed": self.elapsed, "optimizer": self.opt.state_dict(),
                "data_gen": self.data_gen.get_state(), "torch_rng": torch.get_rng_state(),
                "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
                "world": self.dist.world}

    def resume(self) -> bool:
        """Continue from the newest valid checkpoint of the run folder; False when there is none."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return False
        self.model.load_state_dict(load_weights(path))
        state = load_state(path)
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.nonfinite_total, self.nonfinite_run = state["nonfinite_total"], state["nonfinite_run"]
        self.data_gen.set_state(state["data_gen"])
        if self.dist.main:
            torch.set_rng_state(state["torch_rng"])
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
            path.write_text("".join(line + "\n" for line in keep))

    def save(self) -> None:
        if self.dist.main:
            save_checkpoint(self.run_dir, self.step, self.model.state_dict(), self.state(), self.cfg.keep_last)
        distributed.barrier(self.dist)

    # ---- the loop ---------------------------------------------------------------------------------------
    def _autocast(self):
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _local_batch(self) -> torch.Tensor:
        x = random_windows(self.data.splits["train"].tokens, self.data.seq_len, self.cfg.batch_size, self.data_gen)
        r = self.dist.rank
        return x[r * self.local_batch:(r + 1) * self.local_batch].to(self.device)

    def _train_step(self) -> tuple[float | None, dict]:
        """One optimizer step over the global batch; (None, {}) when a loss was not finite (step skipped)."""
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        x = self._local_batch()
        total, metrics = 0.0, {}
        for i, micro in enumerate(x.chunk(self.accum)):
            sync = i == self.accum - 1 or not self.dist.active
            ctx = contextlib.nullcontext() if sync else self.net.no_sync()
            with ctx, self._autocast():
                loss, metrics = self.net(micro)
            bad = distributed.any_true(not torch.isfinite(loss).item(), self.dist, self.device)
            if bad:
                self.opt.zero_grad(set_to_none=True)
                return None, {}
            (loss / self.accum).backward()
            total += loss.item() / self.accum
        if self.cfg.grad_clip > 0:
            metrics["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total, metrics

    def fit(self) -> dict:
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * self.data.seq_len
        log_path = self.run_dir / "metrics.jsonl"
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.progress, desc="train",
                   dynamic_ncols=True)
        last, stopped = {}, "max_steps"
        self.model.train()
        while self.step < cfg.max_steps:
            if cfg.max_minutes is not None and self.elapsed >= 60 * cfg.max_minutes:
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
                    raise TrainingError(
                        f"{self.nonfinite_run} non-finite losses in a row at step {self.step}; stopping. The last "
                        f"good checkpoint is kept in {self.run_dir / 'checkpoints'} (lower train.lr or enable "
                        "train.grad_clip)")
                continue
            self.nonfinite_run = 0
            self.step += 1
            bar.update(1)
            last = {"step": self.step, "loss": loss}
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                last.update(lr=lr_at(self.step - 1, cfg), elapsed_s=round(self.elapsed, 3),
                            tokens_per_s=round(tokens_per_step * self.step / max(self.elapsed, 1e-9), 1),
                            nonfinite=self.nonfinite_total,
                            **{k: float(v) for k, v in metrics.items()})
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
                "tokens_per_s": round(tokens_per_step * self.step / max(self.elapsed, 1e-9), 1)}

    def validate(self) -> dict[str, float]:
        if not self.dist.main:
            return {}
        return validation_metrics(self.model, self.data.splits["val"].tokens, self.data.seq_len,
                                  self.local_batch, self.cfg.eval_batches, self.cfg.seed)

    def _log(self, path: Path, record: dict) -> None:
        if not self.dist.main:
            return
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
